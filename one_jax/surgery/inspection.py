"""What `python -m one_jax.surgery inspect` prints: a checkpoint's model and its parameters
per part."""
import json
import os
from typing import Dict

import numpy as np

from one_jax.storage import checkpoints
from one_jax.surgery import layout


def parameter_counts(state, info) -> Dict[str, int]:
  """Parameters per part: trunk, branch i (each; with its own trunk where the branches start
  at the input), the method's parts (ONE's gate, OKDDip's attention), total."""
  model = layout.view(state, info, "the model")
  counts = {} if model.spec.independent else {"trunk": 0}
  for b in range(model.num_branches):
    counts[f"branch {b}"] = 0
  for (tree, path), x in model.leaves.items():
    if tree != layout.PARAMS:
      continue
    if path[0] == "trunk" and (tree, path) in model.slotted:   # DML: a trunk per branch
      for b in range(model.num_branches):
        counts[f"branch {b}"] += x[b].size
    elif path[0] == "trunk":
      counts["trunk"] += x.size
    elif path[0] == "branches":
      for b in range(model.num_branches):
        counts[f"branch {b}"] += x[b].size
    else:
      counts[path[0]] = counts.get(path[0], 0) + x.size
  counts["total"] = sum(counts.values())
  return counts


def describe_checkpoint(path: str) -> str:
  """The text `inspect` prints."""
  state, meta = checkpoints.restore_raw(path)
  model = layout.view(state, meta["model"], path)
  lines = [f"checkpoint: {os.path.abspath(path)}",
           f"model:      {model.spec.describe()}",
           f"step:       {int(np.asarray(state.get('step', meta.get('step', 0))))}",
           f"epoch:      {meta.get('epoch', 'unknown')}"]
  if model.has_gate:
    offsets = model.leaves[(layout.OFFSET, ("gate", "log_weight"))]
    lines.append("gate offset: " + " ".join(f"{o:.4f}" for o in offsets))
  if model.temporal_count is not None:
    lines.append(f"temporal mean: {int(model.temporal_count)} updates (its own copy of the "
                 "parameters and statistics, not counted below)")
  lines.append("parameters:")
  for part, count in parameter_counts(state, model.spec).items():
    lines.append(f"  {part:<10} {count:>12,}")
  if layout.OPT in state:
    subtrees = ", ".join("/".join(t[1:]) or "(root)" for t in model.opt_trees) or "none"
    lines.append(f"optimizer state: present (parameter-structured subtrees: {subtrees})")
  else:
    lines.append("optimizer state: absent")
  if "surgery" in meta:
    lines.append(f"surgery:    {json.dumps(meta['surgery'])}")
  return "\n".join(lines)

"""Two-stage cooperative networks: prepare stage 2's starting checkpoint from stage-1 runs.

A configs/step2.py variant names its sources (config.source / config.sources) and a surgery
(config.surgery). Before training, `prepare(config, workdir)` checks that the surgery's output
is the variant's model, performs the surgery into WORKDIR/init and points config.init_from at
it; a restarted run finds its own checkpoints and resumes instead. A start that fails before
its first checkpoint removes WORKDIR/init again (`discard_unused_init`), and one that finds an
init but no checkpoint does the surgery anew. Everything else is the ordinary training loop.
"""
import os
import shutil
from typing import List

import jax
import ml_collections
import numpy as np

from jax.experimental import multihost_utils

from one_jax import surgery, validate
from one_jax.architectures import model_spec, models
from one_jax.storage import checkpoints

SURGERIES = ("", "expand", "merge")
INIT_SUBDIR = "init"


def source_paths(config) -> List[str]:
  """config.sources ('a,b,c') or config.source, checked to exist (one-line errors)."""
  raw = config.get("sources", "") or config.get("source", "")
  paths = validate.comma_list(raw)
  if not paths:
    raise ValueError(f"variant {config.get('variant', '')!r} needs its stage-1 checkpoints: set "
                     "--config.source=RUN_DIR (or --config.sources=A,B,C for a merge)")
  for p in paths:
    if not os.path.exists(p):
      raise ValueError(f"source checkpoint {p} does not exist: train it first (see the README's "
                       "two-stage walk-through) or fix the path")
  return paths


SYMMETRY_BREAKS = ("params", "momentum")


def _noisy_slots(leaf, first_slot, scale, rng):
  """Gaussian noise of `scale` x the slot's std on slots >= first_slot (a draw per slot)."""
  leaf = np.array(leaf, copy=True)
  for b in range(first_slot, leaf.shape[0]):
    std = float(np.std(leaf[b])) or 1.0
    leaf[b] = leaf[b] + scale * std * rng.standard_normal(leaf[b].shape).astype(leaf.dtype)
  return leaf


def _momentum_buffers(tree, path=()):
  """Paths of the momentum traces (optax 'trace' subtrees) in a state-dict optimizer state."""
  if not isinstance(tree, dict):
    return []
  if "trace" in tree and isinstance(tree["trace"], dict) and "branches" in tree["trace"]:
    return [path + ("trace",)]
  return [p for k, v in tree.items() for p in _momentum_buffers(v, path + (k,))]


def perturb_branches(state, first_slot: int, scale: float, seed: int, target: str = "params"):
  """Breaks the symmetry of copied branches (slots >= first_slot), which otherwise receive
  identical updates for ever.

  target='params' adds the noise to the branch parameters (the outputs change slightly);
  'momentum' adds it to their momentum buffers only, so the model computes exactly what it
  did (the ensemble is unchanged) and the copies part from the first update on.
  """
  if target not in SYMMETRY_BREAKS:
    raise ValueError(f"symmetry_break={target!r} is unknown: use 'params' or 'momentum'")
  rng = np.random.default_rng(seed)
  noisy = lambda leaf: _noisy_slots(leaf, first_slot, scale, rng)  # noqa: E731
  if target == "params":
    params = state["params"]
    return dict(state, params=dict(params, branches=jax.tree.map(noisy, params["branches"])))
  paths = _momentum_buffers(state.get("opt_state"))
  if not paths:
    raise ValueError("symmetry_break='momentum' needs the source's optimizer state, which this "
                     "expansion has none of: use --config.symmetry_break=params")
  opt_state = state["opt_state"]
  for path in paths:
    opt_state = _replace_path(opt_state, path, lambda trace: dict(
        trace, branches=jax.tree.map(noisy, trace["branches"])))
  return dict(state, opt_state=opt_state)


def _replace_path(tree, path, fn):
  if not path:
    return fn(tree)
  return dict(tree, **{path[0]: _replace_path(tree[path[0]], path[1:], fn)})


def fits_config(config):
  """check(state, info) for the surgery's output: refuses (ValueError) a model whose variables
  are not those of the config's model, before anything is written."""
  spec = model_spec.ModelSpec.from_config(config)
  want = {k: jax.tree.map(np.shape, v) for k, v in spec.abstract_variables().items()}

  def check(state, info):
    got = {k: jax.tree.map(np.shape, v) for k, v in models.variables_in(state).items()}
    if got != want:
      made = checkpoints.spec_of({"model": info}, "the surgery's output")
      raise ValueError(
          f"the {config.surgery} of {', '.join(source_paths(config))} gives a {made.describe()}, "
          f"but variant {config.get('variant', '')!r} trains a {spec.describe()}: use stage-1 "
          "checkpoints of that depth and class count (`python -m one_jax.surgery inspect` "
          "shows theirs), or set --config.depth / num_classes / num_branches to match "
          "(nothing was written)")
  return check


def prepare(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """Returns the config to train with: init_from set to the surgery's output when needed."""
  op = config.get("surgery", "")
  if op not in SURGERIES:
    raise ValueError(f"surgery={op!r} is unknown: use one of 'expand', 'merge' or ''")
  if config.get("eval_only", False) and not config.init_from and config.get("source", ""):
    config = _unlocked(config, init_from=source_paths(config)[0])
  if not op:
    return config
  ckpt_dir = os.path.join(workdir, checkpoints.CHECKPOINT_SUBDIR)
  init_dir = os.path.join(workdir, INIT_SUBDIR)
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    return _unlocked(config, init_from=init_dir)  # resuming: the run's own checkpoints
  # No checkpoint yet: the surgery is (re)done. An init left by a start that failed before its
  # first checkpoint (with other sources, say) is replaced, never trained from.
  paths = source_paths(config)
  if jax.process_index() == 0 and os.path.lexists(init_dir):
    shutil.rmtree(init_dir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("one_jax two_stage init cleared")
  os.makedirs(workdir, exist_ok=True)
  # Both operations through surgery's file layer: the same checks, the same staged output.
  common = dict(seed=config.seed, reset_optimizer=config.reset_optimizer, into_run=True,
                check=fits_config(config))
  if op == "expand":
    def noise(state, old_branches):
      if config.symmetry_noise <= 0:
        return state
      return perturb_branches(state, old_branches, config.symmetry_noise, config.seed,
                              config.symmetry_break)
    surgery.run_expand(paths[0], init_dir, config.num_branches, mode=config.expand_mode,
                       sources=[int(s) for s in validate.comma_list(config.expand_from)] or None,
                       then=noise, record={"symmetry_noise": config.symmetry_noise,
                                           "symmetry_break": config.symmetry_break}, **common)
  else:
    # Sources without a gate (baselines) get freshly initialised gate columns: all-zero
    # columns would give the gate no gradient at all.
    surgery.run_merge(paths, init_dir, trunk_from=surgery.parse_trunk_from(config.trunk_from),
                      fresh_gate="init", **common)
  return _unlocked(config, init_from=init_dir)


def discard_unused_init(workdir: str, remove_workdir: bool = False) -> None:
  """Removes WORKDIR/init when the run that prepared it failed before its first checkpoint
  (so that nothing a refused start wrote stays behind), and then WORKDIR itself when
  remove_workdir and it is empty."""
  ckpt_dir = os.path.join(workdir, checkpoints.CHECKPOINT_SUBDIR)
  if os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir)):
    return
  if jax.process_index() == 0:
    shutil.rmtree(os.path.join(workdir, INIT_SUBDIR), ignore_errors=True)
    if remove_workdir:
      try:
        os.rmdir(workdir)  # only when empty
      except OSError:
        pass


def _unlocked(config, **updates):
  config = ml_collections.ConfigDict(config.to_dict())
  config.update(updates)
  return config

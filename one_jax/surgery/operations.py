"""The surgery operations: expand, merge, transplant, extract (DESIGN.md section 6).

Each is a pure function on checkpoint states (the `state` item of a one_jax checkpoint:
{'params', 'batch_stats', ['gate_offset'], ['opt_state'], 'step'}) and model infos
(meta['model']), returning the new (state, info); files.py writes them.
"""
import dataclasses
import collections
import functools
from typing import List, Mapping, Optional, Sequence, Union

import numpy as np

from one_jax import validate
from one_jax.architectures import models
from one_jax.surgery import layout


# The operations.


def expand(state, info, num_branches: int, *, mode: str = "copy",
           sources: Optional[Sequence[int]] = None, rng=None, fresh_gate: str = "zero",
           reset_optimizer: bool = False):
  """m -> n branches: the m kept as they are, the n - m new ones copies or fresh.

  copy: new slot m + j copies branch sources[j] (default 0, 1, 2, ... cycling) with its gate
  column, statistics and momentum; each branch used k + 1 times gets offset - log(k + 1) on
  every copy, so the gate gives the copies together the weight the branch had and the
  ensemble output is unchanged on every input. OKDDip's leader stays last: the new slots go
  before it (peers), and copy mode copies peers by default. FFL's fusion module grows with
  the copies' channel blocks and zero weights from them: its fused output is unchanged too. fresh: new slots from a fresh
  initialisation
  (rng: a PRNG key or an int seed, default 0), with fresh gate columns and zero momentum.
  A baseline is expanded as a 1-branch model with fresh gate columns (in copy mode all equal,
  so its output is kept). fresh_gate: 'zero' or 'init' (see layout.FRESH_GATE). A model
  without a gate (CL-ILR: the ensemble is the branches' mean) keeps its branches exactly; its
  ensemble then counts each copy as a branch.
  """
  model = layout.view(state, info, "the model")
  m = model.num_branches
  if not validate.is_int(num_branches):
    raise layout.SurgeryError(f"expand: --branches={num_branches!r} is not an integer")
  n = int(num_branches)
  if n < m:
    raise layout.SurgeryError(f"expand: --branches={n} is fewer than the model's {m} branches: expand "
                       "only adds branches (extract a branch, or transplant, to reduce)")
  if mode not in ("copy", "fresh"):
    raise layout.SurgeryError(f"expand: --mode={mode!r} is unknown: use copy or fresh")
  _check_fresh_gate("expand", fresh_gate)
  out = model.spec.with_branches(n)
  fresh = layout.fresh_model(out, rng) if mode == "fresh" or fresh_gate == "init" else None
  column = functools.partial(_fresh_column, fresh, fresh_gate)
  kept: List[layout.Slot] = [(model, b) for b in range(m)]
  # OKDDip's last branch is the leader: new peers go before it.
  with_leader = model.spec.branched and model.spec.method == "okddip"
  place = (lambda new: kept[:-1] + new + kept[-1:]) if with_leader else (lambda new: kept + new)
  if mode == "fresh":
    if sources is not None:
      raise layout.SurgeryError("expand: --from chooses the branches that copy mode copies: drop it, or "
                         "use --mode=copy")
    slots = place([(fresh, b) for b in range(m, n)])
    gate = [(model, b) if model.has_gate else column(b) for b in range(m)]
    state = layout.assemble(out, trunk=model, slots=slots,
                            gate=gate + [column(b) for b in range(m, n)],
                            reset_optimizer=reset_optimizer)
    return _grown_fusion(state, model, slots), out.to_dict()

  peers = m - 1 if with_leader else m
  sources = [j % peers for j in range(n - m)] if sources is None else list(sources)
  if len(sources) != n - m:
    raise layout.SurgeryError(f"expand: --from lists {len(sources)} branches but {m} -> {n} adds "
                       f"{n - m}: give one source branch per new slot")
  for s in sources:
    layout.check_index("expand", "--from", s, m, "the model")
  slots = place([(model, s) for s in sources])  # a copy takes its source's gate column too
  gate = slots if model.has_gate else [column(0)] * n  # a baseline's copies: equal columns
  state = layout.assemble(out, trunk=model, slots=slots, gate=gate, reset_optimizer=reset_optimizer)
  if not out.has_gate:   # a mean ensemble (CL-ILR) now weighs each copy as a branch
    return _grown_fusion(state, model, slots), out.to_dict()
  # Each source and its copies share its gate weight: a - log(k + 1) on k + 1 equal activations.
  origin = list(range(m)) + sources
  uses = collections.Counter(origin)
  old = (model.leaves[(layout.OFFSET, ("gate", "log_weight"))] if model.has_gate
         else np.zeros([m], np.float32))
  state["gate_offset"]["log_weight"] = np.asarray(
      [old[s] - np.log(uses[s]) for s in origin], old.dtype)
  return state, out.to_dict()


def merge(states: Sequence[Mapping], infos: Sequence[Mapping], *,
          slots: Optional[Sequence[int]] = None, trunk_from: Union[int, str] = 0,
          fresh_gate: str = "zero", rng=None, reset_optimizer: bool = False,
          method: Optional[str] = None):
  """k models (baselines or branched models of one method, all their branches in order) ->
  one branched model of that method (ONE for baselines alone).

  slots[i] is the output slot of the i-th source branch (default: in order). The trunk
  (params, batch_stats, momentum) comes from source trunk_from, or 'mean' averages all
  sources' trunks (momentum counted as zero for a source without). Each slot's gate column
  comes from its source where that has a gate, else is fresh (fresh_gate 'zero': zero dense
  column and initial BatchNorm; 'init': from a fresh initialisation with rng, see layout.FRESH_GATE).
  Step counters of the optimizer state and 'step' come from the trunk's source
  (source 0 for 'mean'). method: the output's method (default: the branched sources', else
  'one'); baselines merge into any method (into OKDDip: the last slot is the leader, the
  projections fresh from rng), a branched source only into its own, an OKDDip model into none.
  """
  if not states or len(states) != len(infos):
    raise layout.SurgeryError("merge: give at least one source (--src), each with its model info")
  whats = [f"source {i}" for i in range(len(states))]
  layout.check_same_architecture([layout.check_info(i, w) for i, w in zip(infos, whats)], whats, "merge")
  views = [layout.view(s, i, w) for s, i, w in zip(states, infos, whats)]
  if method is not None and method not in models.ENSEMBLES:
    raise layout.SurgeryError(f"merge: --method={method!r} is unknown: use one of "
                              f"{', '.join(models.ENSEMBLES)}")
  _refuse_fusion("merge", [v.spec.method for v in views] + [method])
  for v, what in zip(views, whats):
    if v.spec.branched and v.spec.method == "okddip":
      raise layout.SurgeryError(f"merge: {what} is an OKDDip model, whose last branch is its "
                                "group leader, which a merge would put among peers: extract its "
                                "branches and merge those, or transplant branches into it")
  methods = sorted({v.spec.method for v in views if v.spec.branched} | ({method} - {None}))
  if len(methods) > 1:
    raise layout.SurgeryError(f"merge: {'the sources and --method' if method else 'the sources'}"
                              f" name different methods ({' and '.join(methods)}), whose parts "
                              "besides the branches differ: merge models of one method, or "
                              "baselines into any (--method)")
  branches = [(v, b) for v in views for b in range(v.num_branches)]
  total = len(branches)
  order = list(range(total)) if slots is None else list(slots)
  if (not all(validate.is_int(s) for s in order)
      or sorted(order) != list(range(total))):
    raise layout.SurgeryError(f"merge: --slots={','.join(map(str, order))} is not an ordering of the "
                       f"{total} source branches: give each of 0..{total - 1} once")
  if trunk_from == "mean":
    trunk = views
  else:
    _check_trunk_from(trunk_from, len(views))
    trunk = views[int(trunk_from)]
  _check_fresh_gate("merge", fresh_gate)
  if not reset_optimizer:
    layout.check_opt_compatible("merge", views, whats)
  plan = [branches[order.index(slot)] for slot in range(total)]
  out = dataclasses.replace(views[0].spec.with_branches(total), method=(methods or ["one"])[0])
  # A fresh model gives the 'init' gate columns and OKDDip's projections, which baselines lack.
  fresh = (layout.fresh_model(out, rng) if fresh_gate == "init" or out.method == "okddip"
           else None)
  gate = [(m, b) if m.has_gate else _fresh_column(fresh, fresh_gate, k)
          for k, (m, b) in enumerate(plan)]
  return layout.assemble(out, trunk=trunk, slots=plan, gate=gate, reset_optimizer=reset_optimizer,
                         fresh=fresh), out.to_dict()


def _grown_fusion(state, model: layout.Model, slots):
  """An FFL model's fusion module, a PCL model's fusion classifier, grown to the new slots
  (layout.grow_fusion: the copies' channel blocks, zero output weights from them, so the fused
  output is unchanged)."""
  if models.ENSEMBLES.get(model.spec.method) not in models.FUSIONS:
    return state
  return layout.grow_fusion(state, model, slots)


_A_MODEL_OF = {"ffl": "an FFL", "pcl": "a PCL"}


def _refuse_fusion(op, methods):
  """FFL's fusion module and PCL's fusion classifier read every branch's features, so their
  shapes follow the branch count: merge, which would have to join several of them or invent
  one, is refused with one line (methods: of the sources and the output; None for a baseline
  or no choice)."""
  fused = [m for m in methods if m is not None and models.ENSEMBLES[m] in models.FUSIONS]
  if fused:
    raise layout.SurgeryError(
        f"{op}: {_A_MODEL_OF.get(fused[0], fused[0])} model's fusion part reads every "
        "branch's features and "
        "has no form for other sources' branches: expand, extract or transplant its branches "
        f"instead (or {op} baselines into another method)")


def _check_fresh_gate(op, fresh_gate):
  if fresh_gate not in layout.FRESH_GATES:
    raise layout.SurgeryError(f"{op}: --fresh_gate={fresh_gate!r} is unknown: use zero or init")


def _fresh_column(fresh: Optional[layout.Model], fresh_gate: str, k: int) -> layout.Slot:
  """The gate-plan entry of a fresh column: none ('zero'), or column k of a fresh model."""
  return (fresh, k) if fresh_gate == "init" else (None, 0)


def parse_trunk_from(text: str) -> Union[int, str]:
  """--trunk_from / config.trunk_from: 'mean' or a source index ('2' -> 2), else a one-line
  ValueError. (The index's range is checked by merge, which knows the sources.)"""
  text = str(text).strip()
  if text == "mean":
    return text
  if not text.isdigit():
    raise ValueError(f"trunk_from={text!r} is invalid: give the index of the source whose "
                     "trunk is kept (e.g. 0) or 'mean'")
  return int(text)


def _check_trunk_from(trunk_from, k):
  if not validate.is_int(trunk_from) or not 0 <= trunk_from < k:
    raise layout.SurgeryError(f"merge: --trunk_from={trunk_from!r} is invalid: use a source index "
                       f"0..{k - 1} or 'mean'")


def transplant(dst_state, dst_info, src_state, src_info, *, branch: int, slot: int,
               reset_optimizer: bool = False):
  """Branch `branch` of X (src; a baseline's only branch is 0) into slot `slot` of Y (dst).

  Only that slot changes: its parameters, statistics and momentum; trunk and gate stay Y's.
  """
  whats = ["the destination model (--into)", "the source model (--src)"]
  layout.check_same_architecture([layout.check_info(dst_info, whats[0]), layout.check_info(src_info, whats[1])],
                           whats, "transplant")
  dst, src = layout.view(dst_state, dst_info, whats[0]), layout.view(src_state, src_info, whats[1])
  if not dst.spec.branched:
    raise layout.SurgeryError("transplant: the destination model (--into) is a baseline with one branch: "
                       "transplant into a ONE model, or merge the two models instead")
  layout.check_index("transplant", "--branch", branch, src.num_branches, "the source model (--src)")
  layout.check_index("transplant", "--slot", slot, dst.num_branches, "the destination model (--into)")
  if not reset_optimizer:
    layout.check_opt_compatible("transplant", [dst, src], whats)
  kept = [(dst, b) for b in range(dst.num_branches)]
  plan = kept[:slot] + [(src, int(branch))] + kept[slot + 1:]
  state = layout.assemble(dst.spec, trunk=dst, slots=plan, gate=kept, reset_optimizer=reset_optimizer)
  return state, dst.spec.to_dict()


EXTRACT_WEIGHTS = ("deployed", "live", "temporal_mean")


def extract(state, info, *, branch: int, reset_optimizer: bool = False,
            weights: str = "deployed"):
  """Branch `branch` with the trunk as its family's baseline state (the deployable student).

  weights: which network of a PCL model: 'temporal_mean' (its temporal mean's branch, without
  optimizer state: the mean never had momentum), 'live' (the trained model's), or 'deployed'
  (the default: the temporal mean for PCL, the live model for every other method)."""
  model = layout.view(state, info, "the model")
  if not model.spec.branched:
    raise layout.SurgeryError(f"extract: the model is already a single-branch baseline "
                       f"({model.spec.describe()}): use it as it is")
  if weights not in EXTRACT_WEIGHTS:
    raise layout.SurgeryError(f"extract: --weights={weights!r} is unknown: use one of "
                              f"{', '.join(EXTRACT_WEIGHTS)}")
  layout.check_index("extract", "--branch", branch, model.num_branches, "the model")
  if weights == "temporal_mean" or weights == "deployed" and model.spec.temporal_mean:
    model = layout.temporal_as_live(model, "the model")
  out = model.spec.with_branches(None)
  return layout.assemble(out, trunk=model, slots=[(model, int(branch))], gate=None,
                   reset_optimizer=reset_optimizer), out.to_dict()

"""Surgery on files: restore with Orbax, run an operation, stage the new checkpoint.

Everything is validated before anything is written, and the output is complete or absent
(storage/staging.py).
"""
import os
from typing import Any, Callable, Dict, Optional, Sequence, Union

import numpy as np

from one_jax.storage import checkpoints, staging, workdirs
from one_jax.surgery import operations


# Orbax layer: restore, edit, save a new checkpoint. Validated before anything is written.


def _check_dst(dst: str, sources: Sequence[str] = (), into_run: bool = False) -> str:
  """into_run: the destination may lie in a run directory (only two_stage, which writes the
  WORKDIR/init of the run it prepares). A symlink is resolved first: the checks are of the
  path that would be written."""
  dst = staging.resolve(dst)
  if not into_run:
    workdirs.check_destination(dst, sources)
  return staging.check_free(dst)


def _restore(path: str):
  state, meta = checkpoints.restore_raw(path)
  return state, meta


def _save(dst, state, info, trunk_meta, surgery: Dict[str, Any], check=None) -> str:
  if check is not None:  # the caller's last word before anything is written
    check(state, info)
  meta = {"model": info, "step": int(np.asarray(state["step"])), "surgery": surgery}
  if trunk_meta.get("epoch") is not None:
    meta["epoch"] = trunk_meta["epoch"]
  return checkpoints.save_standalone(dst, state, meta)


def _source(path, meta):
  return {"path": os.path.abspath(path), "step": meta.get("step"), "epoch": meta.get("epoch"),
          "model": meta["model"]}


def run_expand(src: str, dst: str, num_branches: int, *, mode: str = "copy",
               sources: Optional[Sequence[int]] = None, seed: int = 0, fresh_gate: str = "zero",
               reset_optimizer: bool = False, into_run: bool = False, check=None,
               then: Optional[Callable[[Dict[str, Any], int], Dict[str, Any]]] = None,
               record: Optional[Dict[str, Any]] = None) -> str:
  """into_run, check: as in run_merge. then(state, old_branches) edits the expanded state
  before the check (two_stage's symmetry noise); record goes into the meta's 'surgery' entry."""
  dst = _check_dst(dst, [src], into_run=into_run)
  state, meta = _restore(src)
  new_state, info = operations.expand(state, meta["model"], num_branches, mode=mode,
                                      sources=sources, rng=seed, fresh_gate=fresh_gate,
                                      reset_optimizer=reset_optimizer)
  if then is not None:
    new_state = then(new_state, checkpoints.spec_of(meta, src).num_branches)
  return _save(dst, new_state, info, meta, {
      "operation": "expand", "mode": mode, "num_branches": int(num_branches),
      "from": None if sources is None else [int(s) for s in sources], "seed": int(seed),
      "fresh_gate": fresh_gate, "reset_optimizer": bool(reset_optimizer),
      "sources": [_source(src, meta)], **(record or {})}, check=check)


def run_merge(srcs: Sequence[str], dst: str, *, slots: Optional[Sequence[int]] = None,
              trunk_from: Union[int, str] = 0, fresh_gate: str = "zero", seed: int = 0,
              reset_optimizer: bool = False, into_run: bool = False, check=None,
              method: Optional[str] = None) -> str:
  """into_run: see _check_dst. check(state, info): raises to refuse the merged model before
  anything is written. method: the output's (operations.merge)."""
  dst = _check_dst(dst, srcs, into_run=into_run)
  restored = [_restore(s) for s in srcs]
  new_state, info = operations.merge([s for s, _ in restored], [m["model"] for _, m in restored],
                                     slots=slots, trunk_from=trunk_from, fresh_gate=fresh_gate,
                                     rng=seed, reset_optimizer=reset_optimizer, method=method)
  trunk_meta = restored[0 if trunk_from == "mean" else int(trunk_from)][1]
  return _save(dst, new_state, info, trunk_meta, {
      "operation": "merge", "trunk_from": trunk_from, "method": info.get("method", "one"),
      "slots": None if slots is None else [int(s) for s in slots], "fresh_gate": fresh_gate,
      "seed": int(seed),
      "reset_optimizer": bool(reset_optimizer),
      "sources": [_source(p, m) for p, (_, m) in zip(srcs, restored)]}, check=check)


def run_transplant(src: str, branch: int, into: str, slot: int, dst: str, *,
                   reset_optimizer: bool = False) -> str:
  dst = _check_dst(dst, [src, into])
  src_state, src_meta = _restore(src)
  dst_state, dst_meta = _restore(into)
  new_state, info = operations.transplant(dst_state, dst_meta["model"], src_state,
                                          src_meta["model"], branch=branch, slot=slot,
                                          reset_optimizer=reset_optimizer)
  return _save(dst, new_state, info, dst_meta, {
      "operation": "transplant", "branch": int(branch), "slot": int(slot),
      "reset_optimizer": bool(reset_optimizer),
      "sources": [_source(into, dst_meta), _source(src, src_meta)]})


def run_extract(src: str, branch: int, dst: str, *, reset_optimizer: bool = False,
                weights: str = "deployed") -> str:
  dst = _check_dst(dst, [src])
  state, meta = _restore(src)
  new_state, info = operations.extract(state, meta["model"], branch=branch,
                                       reset_optimizer=reset_optimizer, weights=weights)
  return _save(dst, new_state, info, meta, {
      "operation": "extract", "branch": int(branch), "reset_optimizer": bool(reset_optimizer),
      "weights": weights, "sources": [_source(src, meta)]})

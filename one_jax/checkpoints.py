"""Orbax checkpoints: the training state of a run, standalone model checkpoints, load_model.

Every checkpoint one_jax writes (training, surgery, conversion) has one layout: an Orbax
CheckpointManager directory whose step folders hold two items,

  state: {'params', 'batch_stats', ['gate_offset'], ['opt_state'], 'step'}   (a plain pytree)
  meta:  JSON {'model': {'kind', 'depth', 'num_classes', ['num_branches']}, 'epoch', ...}

A training workdir keeps them under WORKDIR/checkpoints. The optimizer state is stored as
flax.serialization.to_state_dict(opt_state): nested dicts that surgery can edit without
knowing the optimizer, and that training restores onto its own optimizer's structure.
"""
import os
from typing import Any, Dict, Optional, Tuple

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from one_jax import models

CHECKPOINT_SUBDIR = "checkpoints"
BEST_METRIC = "test/top1/ensemble"


class CheckpointError(ValueError):
  """A checkpoint is missing, unreadable or of the wrong kind (the message says which)."""


# ----------------------------------------------------------------------------- model info


def model_info(model) -> Dict[str, Any]:
  """What is needed to rebuild the module: kind, depth, classes (and branches)."""
  if isinstance(model, models.OneResNet):
    return {"kind": "one_resnet", "depth": model.depth, "num_classes": model.num_classes,
            "num_branches": model.num_branches, "block": models.block_type(model.depth)}
  if isinstance(model, models.CifarResNet):
    return {"kind": "cifar_resnet", "depth": model.depth, "num_classes": model.num_classes,
            "block": models.block_type(model.depth)}
  raise TypeError(f"cannot checkpoint a {type(model).__name__}: use OneResNet or CifarResNet")


def model_from_info(info: Dict[str, Any], **overrides):
  """Inverse of model_info; overrides (branch_impl, axis_name, ...) go to the constructor."""
  if info["kind"] == "one_resnet":
    return models.OneResNet(depth=info["depth"], num_branches=info["num_branches"],
                            num_classes=info["num_classes"], **overrides)
  if info["kind"] == "cifar_resnet":
    overrides.pop("branch_impl", None)
    overrides.pop("active_branches", None)
    return models.CifarResNet(depth=info["depth"], num_classes=info["num_classes"], **overrides)
  raise CheckpointError(f"unknown model kind {info['kind']!r} in checkpoint metadata")


def variables_of(state) -> Dict[str, Any]:
  """The flax variables (params, batch_stats, gate_offset) of a checkpoint state."""
  return {k: state[k] for k in ("params", "batch_stats", "gate_offset") if k in state}


# ----------------------------------------------------------------------------- locating


def _is_step_dir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "state")) and os.path.isdir(os.path.join(path, "meta"))


def resolve(path: str) -> Tuple[str, Optional[int]]:
  """Finds the manager root and step of PATH: a workdir, a checkpoints dir, or a step dir.

  Returns (root, step) where step is None for "the latest in root".
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(path):
    raise CheckpointError(f"checkpoint {path} does not exist: pass a run's workdir, a "
                          "checkpoint directory written by one_jax, or one of its step folders")
  if os.path.isdir(os.path.join(path, CHECKPOINT_SUBDIR)):
    path = os.path.join(path, CHECKPOINT_SUBDIR)
  if _is_step_dir(path):
    parent, name = os.path.split(path)
    if name.isdigit():
      return parent, int(name)
  if os.path.isdir(path) and any(n.isdigit() and _is_step_dir(os.path.join(path, n))
                                 for n in os.listdir(path)):
    return path, None
  raise CheckpointError(f"{path} is not a one_jax checkpoint (no step folders with 'state' and "
                        "'meta'): pass a run's workdir or a directory written by one_jax "
                        "(main, surgery or convert)")


# ----------------------------------------------------------------------------- manager


def _preservation(keep: int):
  policies = [checkpoint_managers.LatestN(n=keep)]
  policies.append(checkpoint_managers.BestN(
      get_metric_fn=lambda m: m[BEST_METRIC], n=1, keep_checkpoints_without_metrics=False))
  return checkpoint_managers.AnyPreservationPolicy(policies)


def manager(directory: str, *, keep: int = 3, read_only: bool = False,
            async_save: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager that keeps the last `keep` checkpoints plus the best one."""
  options = ocp.CheckpointManagerOptions(
      preservation_policy=None if read_only else _preservation(keep),
      read_only=read_only, create=not read_only, enable_async_checkpointing=async_save,
      best_fn=None)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("state", "meta"))


def _to_host(tree):
  return jax.tree.map(np.asarray, tree)


def save(mngr: ocp.CheckpointManager, step: int, state: Dict[str, Any], meta: Dict[str, Any],
         metrics: Optional[Dict[str, float]] = None, force: bool = True) -> None:
  """Saves state (opt_state as a state dict) and meta at `step` (atomically, by Orbax)."""
  state = dict(state)
  if "opt_state" in state and not isinstance(state["opt_state"], dict):
    state["opt_state"] = flax.serialization.to_state_dict(state["opt_state"])
  state["step"] = np.asarray(step, np.int64)
  if metrics is not None and BEST_METRIC not in metrics:
    metrics = None
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)),
            metrics=metrics, force=force)


def restore_raw(path: str, step: Optional[int] = None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Restores (state, meta) of a checkpoint as raw numpy pytrees, without knowing its structure."""
  root, resolved_step = resolve(path)
  step = resolved_step if step is None else step
  mngr = manager(root, read_only=True)
  try:
    if step is None:
      step = mngr.latest_step()
    if step is None:
      raise CheckpointError(f"{root} holds no complete checkpoint")
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                          meta=ocp.args.JsonRestore()))
  except CheckpointError:
    raise
  except Exception as e:  # Orbax raises many kinds; the user needs the path and the cause.
    raise CheckpointError(f"cannot read checkpoint step {step} in {root}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
  finally:
    mngr.close()
  meta = dict(restored["meta"])
  if "model" not in meta:
    raise CheckpointError(f"checkpoint step {step} in {root} has no model metadata: it was not "
                          "written by one_jax")
  meta.setdefault("step", int(step))
  return _to_host(restored["state"]), meta


def save_standalone(path: str, state: Dict[str, Any], meta: Dict[str, Any]) -> str:
  """Writes a one-step checkpoint directory at PATH (refusing to overwrite anything).

  Used by surgery and conversion. The directory appears only when complete: it is written
  under a temporary name beside PATH and renamed at the end.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path):
    raise CheckpointError(f"destination {path} already exists: choose a new --dst (nothing "
                          "was written)")
  parent = os.path.dirname(path)
  if not os.path.isdir(parent):
    raise CheckpointError(f"the parent directory of {path} does not exist: create it first")
  tmp = f"{path}.tmp-{os.getpid()}"
  step = int(np.asarray(state.get("step", 0)))
  mngr = manager(tmp, async_save=False)
  try:
    save(mngr, step, state, meta)
    mngr.wait_until_finished()
  finally:
    mngr.close()
  os.rename(tmp, path)
  return path


def load_model(path: str, step: Optional[int] = None, **model_overrides):
  """(model, variables) of any one_jax checkpoint: a workdir (its latest), surgery or convert output."""
  state, meta = restore_raw(path, step)
  model = model_from_info(meta["model"], **model_overrides)
  return model, jax.tree.map(jax.numpy.asarray, variables_of(state))

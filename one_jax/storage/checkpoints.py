"""Orbax checkpoints: the training state of a run, standalone model checkpoints, load_model.

Every checkpoint one_jax writes (training, surgery, conversion) has one layout: an Orbax
CheckpointManager directory whose step folders hold two items,

  state: {'params', 'batch_stats', ['gate_offset'], ['opt_state'], 'step'}   (a plain pytree)
  meta:  JSON {'model': ModelSpec.to_dict() ({'kind', 'depth', 'num_classes', ['num_branches'],
                  'block'}), 'epoch', ...}

A training workdir keeps them under WORKDIR/checkpoints. The optimizer state is stored as
flax.serialization.to_state_dict(opt_state): nested dicts that surgery can edit without
knowing the optimizer, and that training restores onto its own optimizer's structure.
"""
import hashlib
import os
import sys
from typing import Any, Dict, Optional, Tuple

from absl import logging
import flax.serialization
import flax.traverse_util
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from one_jax.architectures import model_spec, models
from one_jax.storage import staging

CHECKPOINT_SUBDIR = "checkpoints"
BEST_METRIC = "test/top1/ensemble"


class _QuietReadOnly:
  """Drops Orbax's warnings that a read-only manager is read-only (every restore logs them)."""

  def filter(self, record) -> bool:
    text = str(record.msg)
    return not ("read_only=True" in text or "Given directory is read only" in text)


def _without_closed_loop_noise(previous):
  """When a restore fails (a damaged file), TensorStore reads still in flight finish after
  Orbax has closed its event loop, and each prints 'RuntimeError: Event loop is closed' as an
  unraisable exception at some later moment. That is noise after an error already reported
  (CheckpointError); every other unraisable exception goes to the previous hook."""
  def hook(unraisable):
    if (isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"):
      return
    previous(unraisable)
  hook._one_jax_quiet = True  # pylint: disable=protected-access
  return hook


def quiet_orbax_noise():
  """Drops, for this process, Orbax's read-only notices (absl log filter) and TensorStore's
  late 'Event loop is closed' reports after a failed restore (sys.unraisablehook). The
  command-line tools call it first thing; importing this module changes neither. Idempotent."""
  absl_logger = logging.get_absl_logger()
  if not any(isinstance(f, _QuietReadOnly) for f in absl_logger.filters):
    absl_logger.addFilter(_QuietReadOnly())
  if not getattr(sys.unraisablehook, "_one_jax_quiet", False):
    sys.unraisablehook = _without_closed_loop_noise(sys.unraisablehook)


class CheckpointError(ValueError):
  """A checkpoint is missing, unreadable or of the wrong kind (the message says which)."""


# ----------------------------------------------------------------------------- model


def spec_of(meta: Dict[str, Any], source: str = "the checkpoint", **runtime) -> model_spec.ModelSpec:
  """The ModelSpec of a checkpoint's meta (its 'model' entry); runtime fields (branch_impl,
  conv_impl, compute_dtype, active_branches) as keyword arguments."""
  try:
    return model_spec.ModelSpec.from_dict(meta["model"], **runtime)
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"{source} has model metadata one_jax cannot build "
                          f"({' '.join(str(e).split())}): it was not written by this version "
                          "of one_jax, or its meta was edited") from None


# ----------------------------------------------------------------------------- locating


def is_step_dir(path: str) -> bool:
  """An Orbax step folder of a one_jax checkpoint (its 'state' and 'meta' items)."""
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
  if is_step_dir(path):
    parent, name = os.path.split(path)
    if name.isdigit():
      return parent, int(name)
  if os.path.isdir(path) and any(n.isdigit() and is_step_dir(os.path.join(path, n))
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
  """A CheckpointManager that keeps the last `keep` checkpoints plus the best one.

  Multi-process runs: a writing manager is created and saves in every process together (its
  arrays are host numpy, the same everywhere, which Orbax writes from process 0). A read-only
  manager belongs to its process alone: reading needs no other process, so every process
  may restore whatever it needs, the same checkpoint restores on any number of processes, and
  no barrier waits for processes that take another path (e.g. found no checkpoint yet).
  """
  processes = (ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                                 active_processes={jax.process_index()})
               if read_only else ocp.options.MultiprocessingOptions())
  options = ocp.CheckpointManagerOptions(
      preservation_policy=None if read_only else _preservation(keep),
      read_only=read_only, create=not read_only, enable_async_checkpointing=async_save,
      best_fn=None,
      # A save killed before its commit leaves STEP.orbax-checkpoint-tmp, never taken as a
      # step (latest_step skips it); a writing manager deletes such leftovers when it starts.
      cleanup_tmp_directories=not read_only, multiprocessing_options=processes)
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
  meta = dict(meta, state_digest=state_digest(state))
  if metrics is not None and BEST_METRIC not in metrics:
    metrics = None
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)),
            metrics=metrics, force=force)


def restore_raw(path: str, step: Optional[int] = None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Restores (state, meta) of a checkpoint as raw numpy pytrees, without knowing its structure."""
  root, resolved_step = resolve(path)
  step = resolved_step if step is None else step
  mngr = None
  try:
    mngr = manager(root, read_only=True)
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
    if mngr is not None:
      mngr.close()
  meta = dict(restored["meta"])
  if "model" not in meta:
    raise CheckpointError(f"checkpoint step {step} in {root} has no model metadata: it was not "
                          "written by one_jax")
  meta.setdefault("step", int(step))
  state = _to_host(restored["state"])
  if "state_digest" in meta and state_digest(state) != meta["state_digest"]:
    raise CheckpointError(f"checkpoint step {step} in {root} is corrupt: its arrays do not match "
                          "the digest written with them (the files changed after the save)")
  return state, meta


def state_digest(state: Dict[str, Any]) -> str:
  """A hash of every array of a state (path, dtype, shape, bytes): detects damaged files.

  Written into the meta by `save`, checked by `restore_raw` (checkpoints written before the
  digest existed are read without the check).
  """
  h = hashlib.blake2b(digest_size=16)
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  for path, leaf in sorted(((jax.tree_util.keystr(p), x) for p, x in leaves),
                           key=lambda item: item[0]):
    x = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{path}|{x.dtype.str}|{x.shape}|".encode())
    h.update(x.tobytes())
  return h.hexdigest()


def restore_latest(directory: str, *, fallback: bool = False):
  """(step, state, meta, unreadable_steps) of the newest readable checkpoint in directory.

  None when there is no complete checkpoint (none written yet, or only a save that was
  killed before its commit). An unreadable latest checkpoint is an error that names it and
  the way on; with fallback=True the steps before it are tried in turn (newest first) and the
  unreadable ones are returned, for `set_aside`. Never a silent restart from scratch.
  """
  if not os.path.isdir(directory):
    return None
  mngr = manager(directory, read_only=True)
  try:
    steps = sorted(mngr.all_steps(), reverse=True)
  finally:
    mngr.close()
  unreadable = []
  for i, step in enumerate(steps):
    try:
      state, meta = restore_raw(directory, step)
      return step, state, meta, unreadable
    except CheckpointError as e:
      if not fallback:
        way = (f"resume from step {steps[i + 1]}, the one before it, with "
               f"--config.resume_fallback=True (step {step} is then moved to "
               f"{corrupt_dir(directory)}, not deleted), or" if i + 1 < len(steps) else
               "there is no earlier checkpoint to fall back to:")
        raise CheckpointError(f"the latest checkpoint is unreadable ({e}): {way} start a new run "
                              "with a new --workdir") from e
      logging.warning("checkpoint step %d in %s is unreadable (%s); trying the one before",
                      step, directory, e)
      unreadable.append(step)
  if unreadable:
    raise CheckpointError(f"no checkpoint in {directory} is readable (steps "
                          f"{', '.join(map(str, unreadable))}): start a new run with a new "
                          "--workdir")
  return None


def corrupt_dir(directory: str) -> str:
  """Where unreadable steps of a training checkpoint directory are moved (beside it)."""
  return os.path.join(os.path.dirname(os.path.abspath(directory)), "corrupt_checkpoints")


def set_aside(directory: str, step: int) -> str:
  """Moves the step folder out of the manager's sight (never deletes it); returns where to."""
  dest_root = corrupt_dir(directory)
  os.makedirs(dest_root, exist_ok=True)
  dest, n = os.path.join(dest_root, str(step)), 2
  while os.path.exists(dest):
    dest, n = os.path.join(dest_root, f"{step}-{n}"), n + 1
  os.rename(os.path.join(os.path.abspath(directory), str(step)), dest)
  return dest


def save_standalone(path: str, state: Dict[str, Any], meta: Dict[str, Any]) -> str:
  """Writes a one-step checkpoint directory at PATH (refusing to overwrite anything).

  Used by surgery, conversion and step-2 preparation. The directory appears only when
  complete (one_jax.storage.staging: written in a staging folder beside PATH, removed on any failure
  or signal, renamed onto PATH without ever replacing anything). Symlinks in PATH are resolved.
  """
  path = staging.check_free(path)
  # In a multi-process run every process saves the same state together (Orbax writes it from
  # process 0 and commits once all are done) into one staging folder, named by process 0;
  # process 0 owns it and renames the checkpoint, and the others wait for that.
  multi = jax.process_count() > 1
  stage_name = None
  if multi:
    pid, token = (int(x) for x in multihost_utils.broadcast_one_to_all(
        np.asarray([os.getpid(), np.random.randint(0, 2**31 - 1)], np.int32)))
    stage_name = f"{os.path.basename(path)}.tmp-{pid}-{token % 16**8:08x}"
  with staging.staged(path, stage_name=stage_name, commit=jax.process_index() == 0) as tmp:
    if multi:
      multihost_utils.sync_global_devices(f"one_jax save_standalone {path} staged")
    step = int(np.asarray(state.get("step", 0)))
    mngr = manager(tmp, async_save=False)
    try:
      save(mngr, step, state, meta)
      mngr.wait_until_finished()
    finally:
      mngr.close()
    if multi:
      multihost_utils.sync_global_devices(f"one_jax save_standalone {path} written")
  if multi:
    multihost_utils.sync_global_devices(f"one_jax save_standalone {path}")
  return path


def check_finite(tree, source: str, consequence: str) -> None:
  """Refuses (CheckpointError) variables with a NaN or infinity: no trained model has them
  (training never saves a non-finite step), and they would make every number computed from
  them meaningless."""
  flat = flax.traverse_util.flatten_dict(tree, sep="/") if isinstance(tree, dict) else {}
  bad = [name for name, x in flat.items()
         if np.issubdtype(np.asarray(x).dtype, np.inexact) and not np.all(np.isfinite(x))]
  if bad:
    raise CheckpointError(
        f"{source} holds non-finite values (NaN or infinity) in {len(bad)} of its {len(flat)} "
        f"arrays, e.g. {bad[0]}: {consequence}; use a checkpoint of a healthy run (nothing was "
        "written)")


def load(path: str, step: Optional[int] = None, **runtime):
  """(ModelSpec, variables) of any one_jax checkpoint: a workdir (its latest), surgery or
  convert output; runtime fields of the spec (branch_impl, ...) as keyword arguments."""
  state, meta = restore_raw(path, step)
  spec = spec_of(meta, f"checkpoint {path}", **runtime)
  return spec, jax.tree.map(jax.numpy.asarray, models.variables_in(state))


def load_model(path: str, step: Optional[int] = None, **runtime):
  """(Flax module, variables) of any one_jax checkpoint (see `load`)."""
  spec, variables = load(path, step, **runtime)
  return spec.build(), variables

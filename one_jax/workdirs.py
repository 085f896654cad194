"""Workdir safety: a run directory belongs to one config, and another never overwrites it.

Writers other than the run itself (surgery, convert) never write into a run or a checkpoint
directory: `check_destination` refuses any destination with such an ancestor, or inside a
source it reads.

A workdir holds one run: WORKDIR/config.json (the config it was started with) and its
checkpoints. Starting again in the same directory resumes that run, and is refused when the
config differs in anything but the fields that are safe to change on resume (SAFE_TO_CHANGE).
`--config.new_run=True` starts a fresh run in the first free WORKDIR-2, WORKDIR-3, ... instead.
"""
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.traverse_util

from one_jax import run_lock

CONFIG_NAME = "config.json"
CHECKPOINT_SUBDIR = "checkpoints"  # == checkpoints.CHECKPOINT_SUBDIR (no JAX import here)

# Fields that do not change what the run computes up to the last checkpoint: how long it
# goes on, how it reports, how many checkpoints it keeps, where TFDS lives, how to resume.
# Where the train set lives and how many steps go in one dispatch give the same numbers
# (tests/test_dispatch.py), so they may change on resume too.
SAFE_TO_CHANGE = ("num_epochs", "progress_bar", "keep_checkpoints", "eval_batch_size",
                  "resume_fallback", "new_run", "data_dir", "adopt_checkpoints", "download",
                  "data_on_device", "steps_per_dispatch", "log_every_steps", "profile_steps")
_MAX_LISTED = 6


def _flat(tree: Dict[str, Any]) -> Dict[str, Any]:
  return flax.traverse_util.flatten_dict(tree, sep=".") if tree else {}


def as_json(config) -> Dict[str, Any]:
  """The config as written to config.json (tuples become lists, as they do on reading)."""
  return json.loads(config.to_json_best_effort())


def stored_config(workdir: str) -> Optional[Dict[str, Any]]:
  """WORKDIR/config.json, or None when there is none; a damaged one is a clear error."""
  path = os.path.join(workdir, CONFIG_NAME)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      stored = json.load(f)
    if not isinstance(stored, dict):
      raise ValueError("not a JSON object")
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is unreadable ({type(e).__name__}: {e}): restore it from a "
                     "checkpoint's meta, or pass a new --workdir") from None
  return stored


def differences(stored: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
  """'field: stored -> current' for every field that changed and is not safe to change.

  Fields the stored config lacks (added to one_jax after the run started) are not compared.
  A step-2 surgery variant derives init_from (WORKDIR/init) itself; its sources are compared.
  """
  stored, current = _flat(stored), _flat(current)
  ignore = set(SAFE_TO_CHANGE)
  if current.get("surgery") or stored.get("surgery"):
    ignore.add("init_from")
  diffs = []
  for key, old in stored.items():
    if key in ignore:
      continue
    if key not in current:
      diffs.append(f"{key}: {old!r} -> (absent)")
    elif current[key] != old:
      diffs.append(f"{key}: {old!r} -> {current[key]!r}")
  return diffs


def holds_run(workdir: str) -> bool:
  """True when WORKDIR has a config.json, a run's lock (a run is starting there) or a
  checkpoint directory with anything in it."""
  ckpt = os.path.join(workdir, CHECKPOINT_SUBDIR)
  return (os.path.exists(os.path.join(workdir, CONFIG_NAME))
          or os.path.exists(os.path.join(workdir, run_lock.LOCK_NAME))
          or (os.path.isdir(ckpt) and bool(os.listdir(ckpt))))


def new_run_dir(workdir: str) -> str:
  """The first of WORKDIR-2, WORKDIR-3, ... that does not exist (WORKDIR itself if free)."""
  workdir = os.path.normpath(workdir)
  if not os.path.exists(workdir):
    return workdir
  n = 2
  while os.path.exists(f"{workdir}-{n}"):
    n += 1
  return f"{workdir}-{n}"


def check_usable(workdir: str) -> None:
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir={workdir} is a file, not a directory: pass a directory path")


def checkpoint_config(workdir: str) -> Optional[Tuple[int, Dict[str, Any]]]:
  """(step, config) stored in the meta of the newest checkpoint whose meta is readable, or
  None. Reads the small JSON item only, never the arrays."""
  ckpt_dir = os.path.join(workdir, CHECKPOINT_SUBDIR)
  if not os.path.isdir(ckpt_dir):
    return None
  steps = sorted((int(n) for n in os.listdir(ckpt_dir)
                  if n.isdigit() and _is_step_dir(os.path.join(ckpt_dir, n))), reverse=True)
  if not steps:
    return None
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top  (only when needed)
  from one_jax import checkpoints  # pylint: disable=g-import-not-at-top
  mngr = checkpoints.manager(ckpt_dir, read_only=True)
  try:
    for step in steps:
      try:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      except Exception:  # pylint: disable=broad-except  (a damaged step: try the one before)
        continue
      if isinstance(meta, dict) and isinstance(meta.get("config"), dict):
        return step, dict(meta["config"])
  finally:
    mngr.close()
  return None


def _holds_checkpoints(workdir: str) -> bool:
  ckpt = os.path.join(workdir, CHECKPOINT_SUBDIR)
  return os.path.isdir(ckpt) and any(n.isdigit() for n in os.listdir(ckpt))


def check_config(config, workdir: str) -> None:
  """Refuses (ValueError, listing the differences) to train in a workdir of another config.

  The run's config is WORKDIR/config.json; when that is missing or unreadable, the config
  stored in its newest readable checkpoint. A workdir with checkpoints but neither is refused
  unless config.adopt_checkpoints (the user vouches that they belong to this config).
  """
  check_usable(workdir)
  try:
    stored, source = stored_config(workdir), CONFIG_NAME
  except ValueError as unreadable:
    stored, source = None, None
    damaged = unreadable
  else:
    damaged = None
  if stored is None:
    found = checkpoint_config(workdir)
    if found is not None:
      stored, source = found[1], f"the config of its checkpoint step {found[0]} ({CONFIG_NAME} " + (
          "is unreadable)" if damaged else "is missing)")
    elif config.get("adopt_checkpoints", False):
      return
    elif damaged is not None:
      raise damaged
    elif _holds_checkpoints(workdir):
      raise ValueError(
          f"{workdir} holds checkpoints but no {CONFIG_NAME} and no checkpoint with a readable "
          "config, so this config cannot be checked against the run's: if the checkpoints are "
          "of this config, add --config.adopt_checkpoints=True; otherwise pass a new --workdir "
          "(nothing was changed)")
    else:
      return
  diffs = differences(stored, as_json(config))
  if not diffs:
    return
  listed = "; ".join(diffs[:_MAX_LISTED])
  if len(diffs) > _MAX_LISTED:
    listed += f"; and {len(diffs) - _MAX_LISTED} more"
  if source != CONFIG_NAME:
    listed += f"; compared with {source}"
  raise ValueError(
      f"{workdir} holds a run with a different config ({listed}): to resume it, use its config "
      f"(only {', '.join(SAFE_TO_CHANGE)} may change); to start a new run, pass a new --workdir "
      f"or add --config.new_run=True (which would use {new_run_dir(workdir)}); nothing was "
      "changed")


def write_config(config, workdir: str) -> None:
  """WORKDIR/config.json, atomically (a crash leaves the old file or the new one)."""
  path = os.path.join(workdir, CONFIG_NAME)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


# ----------------------------------------------------------------------------- destinations


def _is_step_dir(path: str) -> bool:
  """An Orbax step folder of a one_jax checkpoint (its 'state' and 'meta' items)."""
  return os.path.isdir(os.path.join(path, "state")) and os.path.isdir(os.path.join(path, "meta"))


def _is_checkpoint_root(path: str) -> bool:
  """A checkpoint manager's directory: step folders named by their step number."""
  try:
    names = os.listdir(path)
  except OSError:
    return False
  return any(n.isdigit() and _is_step_dir(os.path.join(path, n)) for n in names)


def is_run_dir(path: str) -> bool:
  """A training run's directory: its config.json beside its checkpoint directory."""
  return (os.path.isfile(os.path.join(path, CONFIG_NAME))
          and os.path.isdir(os.path.join(path, CHECKPOINT_SUBDIR)))


def _what_is(path: str) -> Optional[str]:
  if is_run_dir(path):
    return "the run directory"
  if _is_step_dir(path):
    return "the checkpoint step"
  if _is_checkpoint_root(path):
    return "the checkpoint directory"
  return None


def check_destination(dst: str, sources: Sequence[str] = (), flag: str = "--dst") -> str:
  """Refuses (ValueError) a destination inside a run, a checkpoint or one of `sources`.

  A step folder written into RUN/checkpoints would become the run's latest checkpoint (resume
  and load_model would take it); anything written inside a source changes what was read.
  Returns the absolute destination.
  """
  dst = os.path.abspath(os.fspath(dst))
  real = os.path.realpath(dst)
  for src in sources:
    src_real = os.path.realpath(os.fspath(src))
    if real == src_real or real.startswith(src_real.rstrip(os.sep) + os.sep):
      raise ValueError(f"{flag} {dst} lies inside the source {src}: writing there would change "
                       f"the source; choose a {flag} outside it (nothing was written)")
  parent = os.path.dirname(real)
  while True:
    what = _what_is(parent)
    if what:
      raise ValueError(f"{flag} {dst} lies inside {what} {parent}: writing there could damage "
                       f"it (a new step folder becomes a run's latest checkpoint); choose a "
                       f"{flag} outside runs and checkpoint directories (nothing was written)")
    up = os.path.dirname(parent)
    if up == parent:
      return dst
    parent = up


def check_not_inside_a_run(workdir: str) -> None:
  """A new run's directory may not lie inside another run or a checkpoint directory."""
  check_destination(workdir, (), flag="--workdir")

"""Workdir safety: a run directory belongs to one config, and another never overwrites it.

Writers other than the run itself (surgery, convert) never write into a run or a checkpoint
directory: `check_destination` refuses any destination with such an ancestor, or inside a
source it reads.

A workdir holds one run: WORKDIR/config.json (the config it was started with) and its
checkpoints. Starting again in the same directory resumes that run, and is refused when the
config differs in anything but the fields that are safe to change on resume (SAFE_TO_CHANGE).
`--config.new_run=True` starts a fresh run in the first free WORKDIR-2, WORKDIR-3, ... instead.

A run never overwrites what it did not write: a workdir with results (metrics, summary) but no
checkpoint to continue from, a run's or anybody's, is refused (`check_results_have_checkpoint`).
Paths in the stored config are absolute (PATH_FIELDS), and the .npz a run trains on is recorded
(size and SHA-256, DATA_RECORD_NAME) so that a resume on another file is refused.
"""
import hashlib
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.traverse_util
import orbax.checkpoint as ocp

from one_jax import validate
from one_jax.storage import checkpoints, run_lock

CONFIG_NAME = "config.json"

# Fields that do not change what the run computes up to the last checkpoint: how long it
# goes on, how it reports, how many checkpoints it keeps, where TFDS lives, how to resume.
# Where the train set lives and how many steps go in one dispatch give the same numbers
# (tests/training/test_dispatch.py), so they may change on resume too.
SAFE_TO_CHANGE = ("num_epochs", "progress_bar", "keep_checkpoints", "eval_batch_size",
                  "resume_fallback", "new_run", "data_dir", "adopt_checkpoints", "download",
                  "data_on_device", "steps_per_dispatch", "log_every_steps", "profile_steps",
                  "compilation_cache_dir")
_MAX_LISTED = 6
# Config fields that name files or directories: stored absolute, compared as absolute paths
# (a relative one in an older run's config.json is read from the current directory).
PATH_FIELDS = ("npz_path", "data_dir", "init_from", "source", "sources")
DATA_RECORD_NAME = "data_record.json"
# What a run writes at the end of its epochs: a workdir holding any of these but no
# checkpoint would have them overwritten by a fresh start.
CSV_NAME = "metrics.csv"          # one row per epoch (one_jax.training.metric_writers)
JSONL_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.txt"
PLOT_NAME = "curves.png"
RESULT_NAMES = (CSV_NAME, JSONL_NAME, SUMMARY_NAME, PLOT_NAME)


def _flat(tree: Dict[str, Any]) -> Dict[str, Any]:
  return flax.traverse_util.flatten_dict(tree, sep=".") if tree else {}


def _absolute(field: str, value):
  if not isinstance(value, str) or not value:
    return value
  if field == "sources":
    return ",".join(os.path.abspath(p) for p in validate.comma_list(value))
  return os.path.abspath(value)


def as_json(config) -> Dict[str, Any]:
  """The config as written to config.json (tuples become lists, as they do on reading; the
  PATH_FIELDS absolute)."""
  stored = json.loads(config.to_json_best_effort())
  for field in PATH_FIELDS:
    if field in stored:
      stored[field] = _absolute(field, stored[field])
  return stored


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
  for field in PATH_FIELDS:
    for tree in (stored, current):
      if field in tree:
        tree[field] = _absolute(field, tree[field])
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
  """True when WORKDIR has a config.json, a run's lock (a run is starting there), a
  checkpoint directory with anything in it, or results a run writes (RESULT_NAMES)."""
  ckpt = os.path.join(workdir, checkpoints.CHECKPOINT_SUBDIR)
  return (os.path.exists(os.path.join(workdir, CONFIG_NAME))
          or os.path.exists(os.path.join(workdir, run_lock.LOCK_NAME))
          or (os.path.isdir(ckpt) and bool(os.listdir(ckpt)))
          or bool(_results(workdir)))


def _results(workdir: str) -> List[str]:
  return [n for n in RESULT_NAMES if os.path.lexists(os.path.join(workdir, n))]


def check_results_have_checkpoint(workdir: str) -> None:
  """Refuses a workdir holding results (metrics, summary, curves) but no checkpoint: a fresh
  start would overwrite them. (A run stopped before its first checkpoint has none of these
  and starts again.)"""
  results = _results(workdir)
  if not results or _holds_checkpoints(workdir):
    return
  listed = ", ".join(results)
  fresh = (f"or start a new run beside it with --config.new_run=True (it would use "
           f"{new_run_dir(workdir)}) or a new --workdir; nothing was changed")
  if os.path.exists(os.path.join(workdir, CONFIG_NAME)):
    raise ValueError(
        f"{workdir} holds an earlier run ({CONFIG_NAME}, {listed}) but no checkpoint to resume "
        f"from, so training would start again and overwrite its results: to resume, put its "
        f"checkpoints back into {os.path.join(workdir, checkpoints.CHECKPOINT_SUBDIR)}; {fresh}")
  raise ValueError(
      f"{workdir} is not a one_jax run but holds {listed}, which a run writes there: "
      f"{fresh}")


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
  ckpt_dir = os.path.join(workdir, checkpoints.CHECKPOINT_SUBDIR)
  if not os.path.isdir(ckpt_dir):
    return None
  steps = sorted((int(n) for n in os.listdir(ckpt_dir)
                  if n.isdigit() and checkpoints.is_step_dir(os.path.join(ckpt_dir, n))), reverse=True)
  if not steps:
    return None
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
  ckpt = os.path.join(workdir, checkpoints.CHECKPOINT_SUBDIR)
  return os.path.isdir(ckpt) and any(n.isdigit() for n in os.listdir(ckpt))


def check_config(config, workdir: str) -> None:
  """Refuses (ValueError, listing the differences) to train in a workdir of another config.

  The run's config is WORKDIR/config.json; when that is missing or unreadable, the config
  stored in its newest readable checkpoint. A workdir with checkpoints but neither is refused
  unless config.adopt_checkpoints (the user vouches that they belong to this config).
  """
  check_usable(workdir)
  check_results_have_checkpoint(workdir)
  _check_stored_config(config, workdir)
  check_data_record(config, workdir)


def _check_stored_config(config, workdir: str) -> None:
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


def _write_json(path: str, value) -> None:
  """Atomically (a crash leaves the old file or the new one)."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_config(config, workdir: str) -> None:
  """WORKDIR/config.json (paths absolute) and, for an .npz run, its data record."""
  _write_json(os.path.join(workdir, CONFIG_NAME), as_json(config))
  npz = config.get("npz_path", "")
  record_path = os.path.join(workdir, DATA_RECORD_NAME)
  if npz and not os.path.exists(record_path):   # the file the run started on
    _write_json(record_path, file_record(npz))


def file_record(path: str) -> Dict[str, Any]:
  """{'path' (absolute), 'size', 'sha256'} of a file."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return {"path": os.path.abspath(path), "size": os.path.getsize(path),
          "sha256": digest.hexdigest()}


def check_data_record(config, workdir: str) -> None:
  """Refuses to resume on an .npz other than the one the run trained on (its record)."""
  npz = config.get("npz_path", "")
  record_path = os.path.join(workdir, DATA_RECORD_NAME)
  if not npz or not os.path.isfile(npz) or not os.path.exists(record_path):
    return
  try:
    with open(record_path, encoding="utf-8") as f:
      recorded = json.load(f)
    size, sha = recorded["size"], recorded["sha256"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{record_path} is unreadable ({type(e).__name__}): restore it, or start a "
                     "new run with --config.new_run=True (nothing was changed)") from None
  if os.path.getsize(npz) != size or file_record(npz)["sha256"] != sha:
    raise ValueError(
        f"--config.npz_path={npz} ({os.path.abspath(npz)}) is not the file this run trained on "
        f"({recorded.get('path', '?')}, {size} bytes, SHA-256 {sha[:12]}...): pass that file, "
        "or start a new run with --config.new_run=True (nothing was changed)")


# ----------------------------------------------------------------------------- destinations


def _is_checkpoint_root(path: str) -> bool:
  """A checkpoint manager's directory: step folders named by their step number."""
  try:
    names = os.listdir(path)
  except OSError:
    return False
  return any(n.isdigit() and checkpoints.is_step_dir(os.path.join(path, n)) for n in names)


def is_run_dir(path: str) -> bool:
  """A training run's directory: its config.json beside its checkpoint directory."""
  return (os.path.isfile(os.path.join(path, CONFIG_NAME))
          and os.path.isdir(os.path.join(path, checkpoints.CHECKPOINT_SUBDIR)))


def _what_is(path: str) -> Optional[str]:
  if is_run_dir(path):
    return "the run directory"
  if checkpoints.is_step_dir(path):
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

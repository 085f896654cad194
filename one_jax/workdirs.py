"""Workdir safety: a run directory belongs to one config, and another never overwrites it.

A workdir holds one run: WORKDIR/config.json (the config it was started with) and its
checkpoints. Starting again in the same directory resumes that run, and is refused when the
config differs in anything but the fields that are safe to change on resume (SAFE_TO_CHANGE).
`--config.new_run=True` starts a fresh run in the first free WORKDIR-2, WORKDIR-3, ... instead.
"""
import json
import os
from typing import Any, Dict, List, Optional

CONFIG_NAME = "config.json"
CHECKPOINT_SUBDIR = "checkpoints"  # == checkpoints.CHECKPOINT_SUBDIR (no JAX import here)

# Fields that do not change what the run computes up to the last checkpoint: how long it
# goes on, how it reports, how many checkpoints it keeps, where TFDS lives, how to resume.
SAFE_TO_CHANGE = ("num_epochs", "progress_bar", "keep_checkpoints", "eval_batch_size",
                  "resume_fallback", "new_run", "data_dir")
_MAX_LISTED = 6


def _flat(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


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
  """True when WORKDIR has a config.json or a checkpoint directory with anything in it."""
  ckpt = os.path.join(workdir, CHECKPOINT_SUBDIR)
  return (os.path.exists(os.path.join(workdir, CONFIG_NAME))
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


def check_config(config, workdir: str) -> None:
  """Refuses (ValueError, listing the differences) to train in a workdir of another config."""
  check_usable(workdir)
  stored = stored_config(workdir)
  if stored is None:
    return
  diffs = differences(stored, as_json(config))
  if not diffs:
    return
  listed = "; ".join(diffs[:_MAX_LISTED])
  if len(diffs) > _MAX_LISTED:
    listed += f"; and {len(diffs) - _MAX_LISTED} more"
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

"""One live run per workdir: WORKDIR/run.lock, taken before the run writes anything.

Why a lock file and not `flock`: run directories often live on shared filesystems (NFS,
Lustre, GCS FUSE) where advisory locks are missing, local to one client, or silently
ignored. The lock is a file created with O_CREAT | O_EXCL, which is atomic on those
filesystems too, holding JSON that names its holder:

  {"host", "pid", "start_time" (of the process, from /proc), "heartbeat" (unix time), "token"}

A holder that died never blocks the next start, which checks whether it is gone:
  * same host: the pid is not running, or it is another process now (its start time differs);
  * another host (a machine that died): its heartbeat is older than STALE_AFTER_S. A live
    holder refreshes the heartbeat every HEARTBEAT_S from a daemon thread, so a lock of a live
    run on another machine is never older than that (clocks are assumed to agree within a
    minute).
A stale lock is moved aside (renamed to run.lock.stale-*, atomically: one of two racing
starts wins) and the start proceeds. All processes of a multi-process run are one holder:
process 0 takes the lock and tells the others the outcome.
"""
import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Dict, Optional

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0   # another host's lock older than this is a dead machine's
_WRITE_GRACE_S = 10.0   # a lock file still being written by its creator reads as empty


class RunLocked(ValueError):
  """The workdir is held by a live run (the message names host and pid)."""


def _process_start_time(pid: int) -> Optional[int]:
  """Start time of pid in clock ticks after boot (Linux /proc), None where unknown."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
      stat = f.read()
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime
  except (OSError, ValueError, IndexError):
    return None


def _pid_running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # running, as another user
    return True
  return True


def _read(path: str) -> Optional[Dict[str, Any]]:
  try:
    with open(path, encoding="utf-8") as f:
      holder = json.load(f)
    return holder if isinstance(holder, dict) else None
  except (OSError, ValueError):
    return None


def holder_alive(holder: Dict[str, Any], now: Optional[float] = None) -> bool:
  """Whether the process that wrote `holder` may still be running (see the module doc)."""
  now = time.time() if now is None else now
  if holder.get("host") == socket.gethostname():
    pid = holder.get("pid")
    if not isinstance(pid, int) or not _pid_running(pid):
      return False
    started = holder.get("start_time")
    return started is None or _process_start_time(pid) in (None, started)
  heartbeat = holder.get("heartbeat")
  return isinstance(heartbeat, (int, float)) and now - heartbeat < STALE_AFTER_S


def describe(holder: Dict[str, Any]) -> str:
  return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}"


class RunLock:
  """The lock of one workdir, held from `acquire` to `release` (a context manager)."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME)
    self.token = uuid.uuid4().hex
    self._created_workdir = False
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def _info(self) -> Dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "start_time": _process_start_time(os.getpid()), "heartbeat": time.time(),
            "token": self.token}

  def _create(self) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(self._info(), f)
      f.flush()
      os.fsync(f.fileno())
    return True

  def _move_aside_if_stale(self) -> None:
    """Raises RunLocked if the current lock's holder is alive; else moves the lock aside."""
    holder = _read(self.path)
    if holder is None:  # being written right now, or damaged
      try:
        age = time.time() - os.path.getmtime(self.path)
      except FileNotFoundError:
        return
      if age < _WRITE_GRACE_S:
        raise RunLocked(f"{self.workdir} is being started by another process ({self.path} was "
                        "just created): wait for it, or pass another --workdir")
    elif holder_alive(holder):
      raise RunLocked(f"{self.workdir} is in use by a live run ({describe(holder)}, "
                      f"{self.path}): wait for it to end or stop it, or pass another --workdir")
    aside = f"{self.path}.stale-{uuid.uuid4().hex[:8]}"
    try:
      os.rename(self.path, aside)  # atomic: of two starts that found it stale, one moves it
    except FileNotFoundError:
      return
    moved = _read(aside)
    if holder is not None and (moved or {}).get("token") != holder.get("token"):
      # Another start took the lock between our read and the rename: put it back.
      os.rename(aside, self.path)
      raise RunLocked(f"{self.workdir} was just taken by another start ({describe(moved or {})})"
                      ": pass another --workdir or wait for it")
    os.remove(aside)

  def acquire(self) -> "RunLock":
    self._created_workdir = not os.path.exists(self.workdir)
    os.makedirs(self.workdir, exist_ok=True)
    try:
      for _ in range(3):
        if self._create():
          break
        self._move_aside_if_stale()
      else:
        raise RunLocked(f"{self.workdir}: cannot take {self.path} (it keeps reappearing): pass "
                        "another --workdir")
    except BaseException:
      self._remove_workdir_if_new()
      raise
    self._thread = threading.Thread(target=self._beat, name="one_jax-run-lock", daemon=True)
    self._thread.start()
    return self

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      holder = _read(self.path)
      if holder is None or holder.get("token") != self.token:
        return  # no longer ours (moved aside after a long pause): never overwrite another's
      tmp = f"{self.path}.tmp-{os.getpid()}"
      try:
        with open(tmp, "w", encoding="utf-8") as f:
          json.dump(self._info(), f)
        os.replace(tmp, self.path)
      except OSError:
        pass  # a full or flaky disk: the next beat tries again

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    holder = _read(self.path)
    if holder is not None and holder.get("token") == self.token:
      os.remove(self.path)
    self._remove_workdir_if_new()

  def _remove_workdir_if_new(self) -> None:
    """A start that stopped before writing anything leaves no workdir behind."""
    if self._created_workdir:
      try:
        os.rmdir(self.workdir)  # only when empty
      except OSError:
        pass

  def __enter__(self) -> "RunLock":
    return self.acquire()

  def __exit__(self, *exc) -> bool:
    self.release()
    return False


def hold(workdir: str, process_index: int = 0, process_count: int = 1) -> Optional[RunLock]:
  """Takes the workdir's lock for the whole run (process 0 for all processes).

  Returns the lock to release (None in processes other than 0); raises RunLocked in every
  process when the workdir is held by another run.
  """
  lock, error = None, None
  if process_index == 0:
    try:
      lock = RunLock(workdir).acquire()
    except RunLocked as e:
      error = e
  if process_count > 1:
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not ok and error is None:
      error = RunLocked(f"{workdir} is in use by another run (process 0 says): pass another "
                        "--workdir")
  if error is not None:
    raise error
  return lock

"""Output that appears complete or not at all: every file or checkpoint written outside a run.

Surgery, conversion (both ways) and step-2 preparation write their output through `staged`:

  with staging.staged(dst) as tmp:      # tmp: where to write the file or directory
    write(tmp)
  # here dst exists, complete

The output is written into a staging folder beside the destination, DST.tmp-<pid>-<token>,
holding `owner.json` (host, pid, process start time) and the output itself (`out`). Then:

* success: `out` is renamed onto DST with a rename that refuses to replace anything
  (Linux renameat2 RENAME_NOREPLACE; elsewhere, or where the filesystem lacks it, the
  destination is claimed first with an exclusive create), so of two commands writing one
  destination one wins and the other says so; the staging folder is removed;
* any failure, Ctrl-C (SIGINT) or SIGTERM: the staging folder is removed and the error goes on
  (SIGTERM is raised as `Terminated`, a KeyboardInterrupt);
* a process killed outright (SIGKILL, a crash) leaves its staging folder, which the next
  command writing into the same directory removes once its owner is gone (the same test of
  liveness as the run lock's, run_lock.holder_alive; another host's is left for
  OTHER_HOST_STALE_S).

Destinations are resolved (symlinks followed, a dangling one to its target) before any check.
"""
import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import signal
import socket
import threading
import time
import uuid
from typing import Iterator, Optional

from one_jax.storage import run_lock

OWNER_NAME = "owner.json"
PAYLOAD_NAME = "out"
OTHER_HOST_STALE_S = 3600.0   # a staging folder of another host older than this is a dead one's
_STAGE = re.compile(r"^(?P<base>.+)\.tmp-(?P<pid>\d+)(?:-(?P<token>[0-9a-f]{8}))?$")


class DestinationTaken(ValueError):
  """The destination appeared while this command was writing (another command wrote it)."""


class Terminated(KeyboardInterrupt):
  """SIGTERM while output was being staged (the staging folder has been removed)."""


def resolve(path: str) -> str:
  """The absolute destination with symlinks resolved (a dangling link: its target)."""
  return os.path.realpath(os.path.abspath(os.fspath(path)))


def _owner() -> dict:
  pid = os.getpid()
  return {"one_jax_staging": 1, "host": socket.gethostname(), "pid": pid,
          "start_time": run_lock._process_start_time(pid),  # pylint: disable=protected-access
          "heartbeat": time.time()}


def _is_stale(stage: str, pid: int, now: float) -> bool:
  try:
    with open(os.path.join(stage, OWNER_NAME), encoding="utf-8") as f:
      owner = json.load(f)
  except (OSError, ValueError):
    owner = None
  if isinstance(owner, dict) and owner.get("one_jax_staging"):
    if owner.get("host") == socket.gethostname():
      return not run_lock.holder_alive(owner, now)
    heartbeat = owner.get("heartbeat")
    return not isinstance(heartbeat, (int, float)) or now - heartbeat > OTHER_HOST_STALE_S
  # An older one_jax's DST.tmp-<pid> (no owner file): this host's process, by its name.
  return not run_lock._pid_running(pid)  # pylint: disable=protected-access


def remove_stale(directory: str, base: Optional[str] = None) -> list:
  """Removes the staging folders (of `base`, or of every destination) in `directory` whose
  writer is gone; returns their paths. Folders of live writers are left alone."""
  removed, now = [], time.time()
  try:
    names = os.listdir(directory)
  except OSError:
    return removed
  for name in names:
    match = _STAGE.match(name)
    if not match or (base is not None and match["base"] != base):
      continue
    if match["token"] is None and base is None:
      continue  # an old-style name is only matched to the destination it was written for
    stage = os.path.join(directory, name)
    if match["pid"] == str(os.getpid()) and match["token"] is not None:
      continue  # this process's own
    if _is_stale(stage, int(match["pid"]), now):
      if os.path.isdir(stage) and not os.path.islink(stage):
        shutil.rmtree(stage, ignore_errors=True)
      else:
        with contextlib.suppress(OSError):
          os.remove(stage)
      removed.append(stage)
  return removed


def _renameat2_noreplace(src: str, dst: str) -> bool:
  """rename(src, dst) failing with EEXIST if dst exists; False where unsupported."""
  libc = _libc()
  fn = getattr(libc, "renameat2", None) if libc is not None else None
  if fn is None:
    return False
  at_fdcwd, rename_noreplace = -100, 1
  if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
    return False   # this filesystem or kernel: use the fallback
  raise OSError(err, os.strerror(err), dst)


def _libc():
  try:
    return ctypes.CDLL(None, use_errno=True)
  except OSError:
    return None


def rename_noreplace(src: str, dst: str) -> None:
  """Moves src to dst, never replacing anything at dst (FileExistsError if taken)."""
  try:
    if _renameat2_noreplace(src, dst):
      return
  except OSError as e:
    if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
      raise FileExistsError(errno.EEXIST, "destination exists", dst) from None
    raise
  if os.path.isdir(src):
    os.mkdir(dst)             # the claim: exclusive, so one of two racing writers gets it
    os.rename(src, dst)       # onto the empty directory just made
  else:
    os.link(src, dst)         # exclusive as well
    os.remove(src)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
  """SIGTERM raises Terminated (SIGINT already raises KeyboardInterrupt) in the main thread."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def on_term(signum, frame):  # pylint: disable=unused-argument
    raise Terminated("SIGTERM")

  previous = signal.signal(signal.SIGTERM, on_term)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def check_free(path: str, flag: str = "--dst") -> str:
  """The resolved destination, refused (ValueError) if it exists or its parent does not."""
  path = resolve(path)
  if os.path.lexists(path):
    raise DestinationTaken(f"{flag} {path} already exists: choose a new {flag} (nothing was "
                           "written)")
  if not os.path.isdir(os.path.dirname(path)):
    raise ValueError(f"the parent directory of {flag} {path} does not exist: create it first "
                     "(nothing was written)")
  return path


@contextlib.contextmanager
def staged(path: str, *, flag: str = "--dst", stage_name: Optional[str] = None,
           commit: bool = True) -> Iterator[str]:
  """Yields where to write the output of `path` (see the module doc).

  stage_name: the staging folder's name when several processes write one output together
  (process 0 passes commit=True and owns it; the others commit=False and only write into it).
  """
  path = check_free(path, flag)
  parent, base = os.path.split(path)
  if commit:
    remove_stale(parent, base)
  stage = os.path.join(parent, stage_name or f"{base}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  payload = os.path.join(stage, PAYLOAD_NAME)
  with _signals_raise():
    try:
      if commit:
        os.makedirs(stage, exist_ok=True)
        with open(os.path.join(stage, OWNER_NAME), "w", encoding="utf-8") as f:
          json.dump(_owner(), f)
      yield payload
      if commit:
        try:
          rename_noreplace(payload, path)
        except FileExistsError:
          raise DestinationTaken(
              f"{flag} {path} was created by another command while this one was writing it: "
              f"it was left as it is and this command's output was removed; choose a new "
              f"{flag}") from None
    finally:
      if commit:
        shutil.rmtree(stage, ignore_errors=True)

"""Preemption-safe training: SIGTERM / SIGINT stop a run at a step boundary, with a checkpoint.

`StopRequest` is a context manager that the training loop holds while it trains. The first
SIGTERM or SIGINT only sets a flag: the loop finishes the dispatch in flight, writes a checkpoint
(mid-epoch if need be, see one_jax.training.train) and raises `Interrupted`, which the command line turns
into a message saying how to resume and the exit status EXIT_INTERRUPTED. A second signal
stops at once (KeyboardInterrupt): the last checkpoint written stays the one to resume from.

Handlers are installed only when entered from the main thread (Python delivers signals
there; elsewhere `signal.signal` is not allowed) and the previous handlers are restored on
exit, so library users and test runners keep their own.
"""
import signal
import sys
import threading
from typing import Optional

# sysexits.h EX_TEMPFAIL: "a temporary failure; the user is invited to retry". Distinct from 1
# (bad input, non-finite loss) so that a job script can resubmit only runs that were stopped:
#   while python -m one_jax.main ...; [ $? -eq 75 ]; do :; done
EXIT_INTERRUPTED = 75

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
  """Training stopped on a signal after writing a checkpoint (the message says where)."""

  def __init__(self, message: str, *, signal_name: str, step: int, epoch: int):
    super().__init__(message)
    self.signal_name = signal_name
    self.step = step
    self.epoch = epoch


class StopRequest:
  """Turns the first SIGTERM/SIGINT into a flag (`requested`); the second stops at once."""

  def __init__(self, signals=SIGNALS, *, announce: bool = True):
    self._signals = tuple(signals)
    self._announce = announce
    self._previous = {}
    self.signal_name: Optional[str] = None

  @property
  def requested(self) -> bool:
    return self.signal_name is not None

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    if self.signal_name is not None:
      raise KeyboardInterrupt(f"second signal ({name}) while stopping")
    self.signal_name = name
    if self._announce:
      print(f"{name} received: finishing the current step and writing a checkpoint "
            "(send it again to stop at once)", file=sys.stderr, flush=True)

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread():
      for s in self._signals:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      # None: the handler was not installed from Python; the default is the closest we have.
      signal.signal(s, signal.SIG_DFL if handler is None else handler)
    self._previous = {}
    return False

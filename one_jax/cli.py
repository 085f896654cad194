"""The command lines' error contract, in one place: bad input ends in ONE line on stderr,

  error: <what is wrong and how to fix it>

and exit status 1, never a traceback. Every command (one_jax.main, surgery, convert, bench)
runs its body through `exit_status`.
"""
import sys
from typing import Callable

# What bad input, a missing or damaged file, a full disk or a diverging run raise: messages
# written for the user. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError)


def one_line(text) -> str:
  """The message on one line (newlines and runs of spaces become single spaces)."""
  return " ".join(str(text).split())


def print_error(error: BaseException) -> None:
  print(f"error: {one_line(error) or type(error).__name__}", file=sys.stderr, flush=True)


def exit_status(body: Callable[..., object], *args, **kwargs) -> int:
  """Runs body(*args, **kwargs): its return value (None: 0) or 1 after a one-line error."""
  try:
    result = body(*args, **kwargs)
  except USER_ERRORS as e:
    print_error(e)
    return 1
  return 0 if result is None else int(result)

"""The command lines' error contract, in one place: bad input ends in ONE line on stderr,

  error: <what is wrong and how to fix it>

and exit status 1, never a traceback; Ctrl-C (SIGINT) ends in one line and status 130, SIGTERM
where a command turns it into an exception (one_jax.storage.staging) in one line and status 143.
Every command (one_jax.main, surgery, convert, bench) runs its body through `exit_status`.
"""
import argparse
import difflib
import importlib.util
import os
import re
import sys
from typing import Callable

from absl import flags

# What bad input, a missing or damaged file, a full disk or a diverging run raise: messages
# written for the user. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError)
EXIT_SIGINT, EXIT_SIGTERM = 130, 143   # 128 + the signal's number, as shells report them


def one_line(text) -> str:
  """The message on one line (newlines and runs of spaces become single spaces)."""
  return " ".join(str(text).split())


def first_line(e: Exception) -> str:
  """'ErrorType: the first line of its message' (at most 300 characters of it), for one-line
  errors that quote a library's."""
  text = (str(e).strip().splitlines() or [""])[0]
  return f"{type(e).__name__}: {text[:300]}"


def print_error(error: BaseException) -> None:
  print(f"error: {one_line(error) or type(error).__name__}", file=sys.stderr, flush=True)


def exit_status(body: Callable[..., object], *args,
                interrupted_note: str = "no partial output was left behind", **kwargs) -> int:
  """Runs body(*args, **kwargs): its return value (None: 0), or 1 after a one-line error, or
  130/143 after one line saying it was interrupted (and interrupted_note)."""
  try:
    result = body(*args, **kwargs)
  except USER_ERRORS as e:
    print_error(e)
    return 1
  except MemoryError as e:
    print_error(f"out of memory ({one_line(e) or 'MemoryError'}): ask for less (fewer branches, "
                "a smaller batch or model) or use a machine with more memory; no partial "
                "output was left behind")
    return 1
  except KeyboardInterrupt as e:
    return interrupted(e, interrupted_note)
  return 0 if result is None else int(result)


def interrupted(error: KeyboardInterrupt,
                what: str = "no partial output was left behind") -> int:
  """One line for a stop by SIGINT/SIGTERM; returns its exit status (130 or 143)."""
  term = str(error) == "SIGTERM"
  print(f"error: interrupted by {'SIGTERM' if term else 'SIGINT (Ctrl-C)'}: {what}",
        file=sys.stderr, flush=True)
  return EXIT_SIGTERM if term else EXIT_SIGINT


class UsageError(ValueError):
  """A bad command line (argparse's message, with the command's name)."""


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose command-line errors are one `error:` line and exit status 1 (through
  exit_status), like every other user error, instead of a usage block and status 2."""

  def error(self, message):
    raise UsageError(f"{message} (see: {self.prog} --help)")


# ----------------------------------------------------------------------------- absl flags


def parse_flags(argv):
  """absl flag parsing whose errors are one-line ValueErrors (bad flag or value, config file,
  variant, field), for app.run(..., flags_parser=parse_flags) of every absl command."""
  try:
    rest = flags.FLAGS(argv)
    if flags.FLAGS.config is not None:
      flags.FLAGS.config.keys()  # a config file that failed to load raises here
    return rest
  except flags.Error as e:
    text = str(e)
    if "Traceback (most recent call last)" in text:  # the config file's get_config raised
      last = [line for line in text.splitlines() if line.strip()][-1]
      text = f"--config={argv_config(argv)}: {last.split(': ', 1)[-1]}"
    raise ValueError(one_line(text)) from None
  except OSError as e:  # the config file could not be loaded
    path = argv_config(argv).split(":", 1)[0]
    if not path:   # a command's default --config, relative to the current directory
      raise ValueError("the default config file could not be loaded from this directory: pass "
                       "--config=PATH/configs/step1.py:VARIANT (a relative path is read from "
                       f"the current directory) [{one_line(e)[-120:]}]") from None
    if path and not os.path.exists(path):
      raise ValueError(f"config file {path} does not exist: use --config=configs/step1.py:VARIANT "
                       "or --config=configs/step2.py:VARIANT") from None
    raise ValueError(f"cannot load --config={argv_config(argv)}: {one_line(e)}") from None
  except (AttributeError, KeyError) as e:  # --config.FIELD of a field the config lacks
    known = _config_fields(argv)
    given = [a.split("=", 1)[0].split(".", 1)[1] for a in argv[1:]
             if a.lstrip("-").startswith("config.")]
    text = str(e).replace("\\", "")
    name = ([n for n in given if n not in known] or re.findall(r"'([\w.]+)'", text)
            or [one_line(text)])[0]
    hint = difflib.get_close_matches(name, known, n=1)
    raise ValueError(
        f"unknown config field --config.{name}: "
        + (f"did you mean --config.{hint[0]}? " if hint else "")
        + "the fields are those of configs/common.py (and the variant's config file)") from None


def _config_fields(argv):
  """The field names of the --config file's config (best effort, for suggestions)."""
  path, _, arg = argv_config(argv).partition(":")
  try:
    spec = importlib.util.spec_from_file_location("_one_jax_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list((module.get_config(arg) if arg else module.get_config()).keys())
  except Exception:  # pylint: disable=broad-except  (only a suggestion is lost)
    return []


def argv_config(argv) -> str:
  for i, arg in enumerate(argv):
    if arg.startswith(("--config=", "-config=")):
      return arg.split("=", 1)[1]
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
  return ""

"""Runs many `python -m one_jax.main ARGS` command lines in ONE process, for the bad-input
tests of tests/reliability/ (a process per case would take minutes).

  python tests/cli_cases.py < cases.json > results.json

cases.json: a JSON list of argument lists. results.json: one {"code", "stderr"} per case,
from one_jax.main's console entry (`run`) with sys.argv set to the case.
"""
import contextlib
import io
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_case(args):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from one_jax import main  # pylint: disable=g-import-not-at-top
  # A fresh command line: the --config.FIELD override flags of the last case are dropped.
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()
  err, out = io.StringIO(), io.StringIO()
  argv, sys.argv = sys.argv, ["one_jax.main"] + list(args)
  code = 0
  try:
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
      main.run()
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  finally:
    sys.argv = argv
  return {"code": code, "stderr": err.getvalue()}


def main_():
  cases = json.load(sys.stdin)
  json.dump([run_case(args) for args in cases], sys.stdout)


if __name__ == "__main__":
  main_()

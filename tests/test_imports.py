"""Importing a library module changes nothing in the process: no absl flags, no logging
filters, no sys.unraisablehook or signal handlers, no environment variables. Those belong to
the command-line entry points (main, bench), which set them when they run."""
import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = ("one_jax.main", "one_jax.bench")   # define absl flags, by design

_PROBE = textwrap.dedent("""
    import ast, importlib, importlib.util, json, logging, os, pkgutil, signal, sys
    from absl import flags
    from absl import logging as absl_logging
    import one_jax

    def snapshot():
      loggers = {"": logging.getLogger(), "absl": absl_logging.get_absl_logger()}
      loggers.update({name: logger for name, logger in logging.root.manager.loggerDict.items()
                      if isinstance(logger, logging.Logger)})
      return dict(
          flags=sorted(flags.FLAGS),
          filters={name: [repr(f) for f in logger.filters] for name, logger in loggers.items()},
          unraisablehook=repr(sys.unraisablehook), excepthook=repr(sys.excepthook),
          signals={s.name: repr(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM)},
          environ=dict(os.environ))

    modules = sorted(m.name for m in pkgutil.walk_packages(one_jax.__path__, "one_jax.")
                     if m.name not in sys.argv[1:]
                     and not m.name.rsplit(".", 1)[-1].startswith("_"))   # the kernels' .so
    # Dependencies first (chex, grain, orbax define absl flags of their own): what is measured
    # is what one_jax's modules do.
    for name in modules:
      tree = ast.parse(open(importlib.util.find_spec(name).origin).read())
      for node in tree.body:   # import time: the top-level statements
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        for dependency in names:
          if not dependency.startswith("one_jax"):
            importlib.import_module(dependency)
    before = snapshot()
    for name in modules:
      importlib.import_module(name)
    after = snapshot()
    changed = {key: [before[key], after[key]] for key in before
               if key != "filters" and before[key] != after[key]}
    changed.update({"filter of " + name: [filters, after["filters"][name]]
                    for name, filters in before["filters"].items()
                    if after["filters"][name] != filters})
    print(json.dumps(dict(modules=modules, changed=changed)))
""")


def test_importing_library_modules_has_no_side_effects():
  proc = subprocess.run([sys.executable, "-c", _PROBE, *ENTRY_POINTS], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  for name in ("one_jax.checkpoints", "one_jax.cpu.host_memory", "one_jax.cpu.kernels",
               "one_jax.train", "one_jax.surgery", "one_jax.convert"):
    assert name in result["modules"]
  assert result["changed"] == {}


def test_the_entry_points_quiet_orbax_on_request():
  """checkpoints.quiet_orbax_noise is what the tools call instead: it installs the filter and
  the hook once, however often it is called."""
  script = ("import sys; from absl import logging; from one_jax import checkpoints; "
            "hook = sys.unraisablehook; checkpoints.quiet_orbax_noise(); "
            "checkpoints.quiet_orbax_noise(); "
            "print(len(logging.get_absl_logger().filters), sys.unraisablehook is not hook)")
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True,
                       capture_output=True, text=True, timeout=300).stdout
  assert out.split() == ["1", "True"]

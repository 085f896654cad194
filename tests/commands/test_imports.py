"""Importing a library module changes nothing in the process: no absl flags, no logging
filters, no sys.unraisablehook or signal handlers, no environment variables. Those belong to
the command-line entry points (main, bench), which set them when they run."""
import ast
import json
import os
import re
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
  for name in ("one_jax.storage.checkpoints", "one_jax.cpu.host_memory", "one_jax.cpu.kernels",
               "one_jax.training.train", "one_jax.surgery", "one_jax.convert"):
    assert name in result["modules"]
  assert result["changed"] == {}


def test_the_entry_points_quiet_orbax_on_request():
  """checkpoints.quiet_orbax_noise is what the tools call instead: it installs the filter and
  the hook once, however often it is called."""
  script = ("import sys; from absl import logging; from one_jax.storage import checkpoints; "
            "hook = sys.unraisablehook; checkpoints.quiet_orbax_noise(); "
            "checkpoints.quiet_orbax_noise(); "
            "print(len(logging.get_absl_logger().filters), sys.unraisablehook is not hook)")
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True,
                       capture_output=True, text=True, timeout=300).stdout
  assert out.split() == ["1", "True"]


def _package_import_graph():
  """({module: the package modules it imports}, [imports by string]), every import counted:
  module level, inside functions, relative, and importlib's (by a string or a computed name)."""
  package = os.path.join(ROOT, "one_jax")
  paths = {}
  for dirpath, _, names in os.walk(package):
    for name in names:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, name), ROOT)[:-3].replace(os.sep, ".")
        paths[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(
            dirpath, name)

  def resolve(name):  # 'one_jax.data.common.DatasetInfo' -> 'one_jax.data.common'
    while name and name not in paths:
      name = name.rpartition(".")[0]
    return name

  graph, by_string = {}, []
  for module, path in paths.items():
    graph[module] = set()
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parts = module.split(".")[:len(module.split(".")) - node.level + (
              1 if path.endswith("__init__.py") else 0)]
          base = ".".join(parts + ([base] if base else []))
        names = [f"{base}.{a.name}" for a in node.names]
      elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(
          node.func, "id", "")) in ("import_module", "__import__", "find_spec"):
        if not (node.args and isinstance(node.args[0], ast.Constant)):
          by_string.append(f"{module}: a computed name ({ast.unparse(node)})")
        elif re.match(r"one_jax\b", str(node.args[0].value)):
          names = [node.args[0].value]
          by_string.append(f"{module}: {node.args[0].value!r}")
      for name in names:
        target = resolve(name)
        if target and target != module and name.split(".")[0] == "one_jax":
          graph[module].add(target)
  return graph, by_string


def _a_cycle(graph):
  """One import cycle as a list of modules, or None (depth-first search)."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_the_package_imports_run_one_way():
  graph, by_string = _package_import_graph()
  evaluation = graph["one_jax.training.evaluation"]   # function-level imports are read too:
  assert "one_jax.training.voting" in evaluation and "one_jax.storage.workdirs" in graph[
      "one_jax.main"]
  assert _a_cycle(graph) is None, " -> ".join(_a_cycle(graph))
  assert by_string == []     # no module of the package imported by a string
  # The leaves import nothing of the package.
  for leaf in ("one_jax.validate", "one_jax.cli", "one_jax.parallel"):
    assert graph[leaf] == set(), (leaf, graph[leaf])

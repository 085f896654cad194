"""Traced programs kept beside the compilation cache, so that a cache hit skips tracing too.

XLA's persistent cache (training/compile_cache.py) stores compiled executables, but every
process still traces and lowers the model before it can look one up: at ResNet-110 that is
most of what a hit costs (benchmarks/NOTES.md entries 19, 21 and 25). A `CachedProgram` exports
the dispatch step it traces (`jax.export`: its StableHLO, shardings and calling convention)
into `<compilation cache>/programs/`, and a later process with the same program deserialises
it instead of tracing; XLA's cache then gives it the executable. `cached_call` does the same
for a function run once (the model's init) and `cached_shapes` keeps what a trace was only
needed for (the names and shapes of the steps' metrics; `cached_number`: bench's FLOP counts),
so a start with a warm cache traces no part of the model (training/steps.py,
training/train_state.py).

A program is found by what determines it: one_jax's own source files, the versions of jax,
jaxlib, flax and optax, the backend, JAX's tracing settings (x64, matmul precision, dtype
promotion), the caller's `identity` (the run's config, its steps per
epoch, the model as built, the convolution implementation, the devices) and the arguments'
structure, shapes, dtypes and shardings. Anything else that changes the traced program, such as
a function patched inside the process, is not seen: a command enables the cache (main, bench),
a library call never does. Only a single-process run uses it. A file that cannot be read,
parsed or written is a warning, then the program is traced as without the cache.
Deserialising parses data (flatbuffers, StableHLO); nothing in the file is run as Python.
"""
import functools
import hashlib
import json
import os
import sys
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import flax
import jax
import jaxlib
import numpy as np
import optax

from one_jax.training import compile_cache

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBDIR = "programs"
SUFFIX = ".exported"


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
  """sha256 of every .py file of the one_jax package (paths and contents)."""
  digest = hashlib.sha256()
  for root, dirs, files in os.walk(PACKAGE_DIR):
    dirs.sort()
    for name in sorted(f for f in files if f.endswith(".py")):
      path = os.path.join(root, name)
      digest.update(os.path.relpath(path, PACKAGE_DIR).encode())
      with open(path, "rb") as f:
        digest.update(f.read())
  return digest.hexdigest()


def directory(cache_dir: Optional[str]) -> Optional[str]:
  """Where programs go for an enabled compilation cache directory (None: no cache)."""
  return os.path.join(cache_dir, SUBDIR) if cache_dir else None


def directory_of(config) -> Optional[str]:
  """Where a command run with `config` keeps its programs: directory() of the compilation
  cache it enabled (None where it enabled none)."""
  return directory(compile_cache.enabled_dir(config))


def describe(args) -> List[Any]:
  """The structure, shapes and dtypes of a pytree of arrays, as JSON-able lists: the part of a
  kept result's identity that its arguments give (cached_shapes, cached_number)."""
  leaves, tree = jax.tree.flatten(args)
  return [str(tree), [[list(np.shape(x)), str(x.dtype)] for x in leaves]]


def _describe_leaf(x) -> Tuple[Any, ...]:
  return (tuple(x.shape), str(x.dtype), str(getattr(x, "sharding", None)))


def _digest(**caller) -> str:
  """sha256 of what every file here depends on (one_jax's source, the backend, JAX's tracing
  settings, the versions) and of the caller's parts."""
  parts = dict(caller, source=source_digest(), backend=jax.default_backend(),
               tracing=[jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision,
                        jax.config.jax_numpy_dtype_promotion],
               versions=[jax.__version__, jaxlib.__version__, flax.__version__,
                         optax.__version__])
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _write(path: str, blob: bytes, what: str) -> None:
  """Writes a whole file or none (a temporary file, then os.replace); failing is a warning."""
  directory, partial = os.path.dirname(path), None
  try:
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as f:
      partial = f.name
      f.write(blob)
    os.replace(partial, path)
  except OSError as e:
    if partial is not None and os.path.exists(partial):
      os.remove(partial)
    _warn(f"{what} cannot be written to {directory} ({e.strerror or e}): the next start "
          "traces the step again")


def cached_shapes(program_dir: Optional[str], identity: str,
                  trace: Callable[[], Dict[str, Any]]) -> Dict[str, jax.ShapeDtypeStruct]:
  """trace()'s dict of arrays' shapes and dtypes (e.g. a step's metrics, from jax.eval_shape),
  kept in `program_dir` as JSON under what determines it (`identity`, as for a program), so a
  later start reads it instead of tracing the step for it; program_dir None: trace()."""
  return _kept_json(
      program_dir, identity, "shapes", trace,
      lambda shapes: {k: [list(v.shape), str(v.dtype)] for k, v in shapes.items()},
      lambda kept: {str(k): jax.ShapeDtypeStruct(tuple(int(n) for n in shape), np.dtype(dtype))
                    for k, (shape, dtype) in kept.items()},
      "traced shapes")


def cached_number(program_dir: Optional[str], identity: str,
                  compute: Callable[[], float]) -> float:
  """compute()'s number (e.g. bench's FLOP count of a step, a lowering of the whole step),
  kept and read like cached_shapes' shapes; program_dir None: compute()."""
  return _kept_json(program_dir, identity, "number", compute, float, float, "a kept number")


def _kept_json(program_dir: Optional[str], identity: str, kind: str, compute: Callable[[], Any],
               to_json: Callable[[Any], Any], from_json: Callable[[Any], Any], what: str) -> Any:
  """compute()'s result kept as JSON (to_json / from_json) in program_dir, named by a hash of
  `identity` and `kind` (`<hash>.<kind>.json`); a file that cannot be read is a warning and
  compute() again."""
  if not program_dir:
    return compute()
  path = os.path.join(program_dir, _digest(identity=identity, kind=kind) + f".{kind}.json")
  if os.path.exists(path):
    try:
      with open(path, encoding="utf-8") as f:
        return from_json(json.load(f))
    except (OSError, ValueError, TypeError, AttributeError) as e:   # any damage: compute again
      _warn(f"{what} {path} cannot be read ({type(e).__name__}: {e}): computing it again")
  result = compute()
  _write(path, json.dumps(to_json(result), sort_keys=True).encode(), what)
  return result


def cached_call(program_dir: str, identity: str, fn: Callable, *args,
                compiler_options: Optional[Dict[str, Any]] = None,
                custom_calls: Sequence[str] = ()) -> Any:
  """fn(*args) once (e.g. a model's init), its traced program kept in program_dir like a
  step's, so that a later start loads it instead of tracing; the result comes from the
  exported program whether traced or loaded, so both give the same bits."""
  leaves, in_tree = jax.tree.flatten(args)
  path = os.path.join(program_dir, _digest(
      identity=identity, in_tree=str(in_tree), leaves=[_describe_leaf(x) for x in leaves],
      donate=[]) + SUFFIX)
  exported = _load(path, "it")
  if exported is None:
    exported = _export(fn, args, custom_calls)
    _write(path, exported.serialize(), "traced program")
  return jax.jit(exported.call, compiler_options=compiler_options)(*args)


def _export(fn: Callable, args: Sequence[Any], custom_calls: Sequence[str]):
  """jax.export of jit(fn) on args, the FFI targets `custom_calls` allowed."""
  checks = [jax.export.DisabledSafetyCheck.custom_call(name) for name in custom_calls]
  return jax.export.export(jax.jit(fn), disabled_checks=checks)(*args)


def _load(path: str, what: str = "the step"):
  """The exported program in `path`; None where there is none or it cannot be read (a
  warning: `what` is traced again)."""
  if not os.path.exists(path):
    return None
  try:
    with open(path, "rb") as f:
      return jax.export.deserialize(bytearray(f.read()))
  except Exception as e:  # pylint: disable=broad-except  (any damage: trace instead)
    _warn(f"traced program {path} cannot be read ({type(e).__name__}: {e}): tracing {what} "
          "again")
    return None


def _signature(leaves, in_tree) -> Tuple[Any, ...]:
  """What picks a compiled program within one process: structure, shapes and dtypes.

  Shardings are left out (the file's key has them): within a process the mesh fixes them, and
  an argument placed otherwise is refused by the compiled program itself. Describing them as
  text cost ~16 ms a dispatch at 2,000 leaves; this costs under 1 ms.
  """
  return in_tree, tuple((x.shape, x.dtype) for x in leaves)


class CachedProgram:
  """`fn` (a shard_map'ed step taking pytrees), jitted with `donate_argnums` and
  `compiler_options`, its traced program kept in `program_dir`.

  out_tree(args) gives the structure of fn's output for these arguments without tracing it
  (the dispatch step's: training/steps.py). compile(*args) returns a callable on arguments of
  that signature (traced, or loaded from the directory; `source` says which); calling the
  object compiles on first use per signature, as jax.jit does. custom_calls: the FFI targets
  the program may call (one_jax's CPU kernels), which jax.export would otherwise refuse.
  """

  def __init__(self, fn: Callable, *, donate_argnums: Sequence[int], compiler_options,
               out_tree: Callable, program_dir: str, identity: str,
               custom_calls: Sequence[str] = ()):
    self._fn, self._donate, self._options = fn, tuple(donate_argnums), compiler_options
    self._out_tree, self._dir, self._identity = out_tree, program_dir, identity
    self._custom_calls = tuple(custom_calls)
    self._compiled: Dict[Any, Callable] = {}
    self.source: Optional[str] = None   # 'cache' or 'traced': how the last program was made

  def key(self, leaves, in_tree) -> str:
    """The file name of the program for arguments of this signature."""
    return _digest(identity=self._identity, in_tree=str(in_tree),
                   leaves=[_describe_leaf(x) for x in leaves], donate=self._donate)

  def __call__(self, *args):
    leaves, in_tree = jax.tree.flatten(args)   # once per dispatch: this is the hot path
    compiled = self._compiled.get(_signature(leaves, in_tree)) or self.compile(*args)
    return compiled.call_flat(leaves)

  def compile(self, *args, compiler_options: Optional[Dict[str, Any]] = None) -> Callable:
    leaves, in_tree = jax.tree.flatten(args)
    signature = _signature(leaves, in_tree)
    if signature in self._compiled and compiler_options is None:
      return self._compiled[signature]
    out_tree = self._out_tree(args)
    path = os.path.join(self._dir, self.key(leaves, in_tree) + SUFFIX)
    exported = _load(path)
    self.source = "cache" if exported is not None else "traced"
    if exported is None:
      exported = self._export(leaves, in_tree, out_tree)
      _write(path, exported.serialize(), "traced program")
    first = [len(jax.tree.leaves(args[:i])) for i in range(len(args) + 1)]
    donated = tuple(j for i in self._donate for j in range(first[i], first[i + 1]))
    options = dict(self._options or {}, **(compiler_options or {}))
    compiled = jax.jit(exported.call, donate_argnums=donated,
                       compiler_options=options or None).lower(*leaves).compile()
    self._compiled[signature] = Compiled(compiled, out_tree)
    return self._compiled[signature]

  def _export(self, leaves, in_tree, out_tree):
    def flat(*xs):
      out, tree = jax.tree.flatten(self._fn(*jax.tree.unflatten(in_tree, xs)))
      if tree != out_tree:
        raise AssertionError(f"the step returned {tree}, not the expected {out_tree}")
      return out

    return _export(flat, leaves, self._custom_calls)


class Compiled:
  """A compiled program on flat arguments, called with the step's pytrees."""

  def __init__(self, executable, out_tree):
    self.executable, self._out_tree = executable, out_tree

  def __call__(self, *args):
    return self.call_flat(jax.tree.leaves(args))

  def call_flat(self, leaves):
    return jax.tree.unflatten(self._out_tree, self.executable(*leaves))

  def memory_analysis(self):
    return self.executable.memory_analysis()


def _warn(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr, flush=True)

"""A persistent compilation cache by default: a run, a resume or a benchmark of a program that
was compiled before loads it from disk instead of compiling it again (config field
`compilation_cache_dir`; DESIGN.md section 10).

'auto' is $JAX_COMPILATION_CACHE_DIR when set, else ~/.cache/one_jax/xla; '' turns the cache
off. JAX writes the cache from process 0 only, so a multi-process run needs a path every
process sees (the launch scripts pass one). A directory that cannot be created or written
never stops a run: one warning, then it compiles without the cache.
"""
import os
import sys
import tempfile
from typing import Optional

import jax

DEFAULT_DIR = os.path.join("~", ".cache", "one_jax", "xla")
_HIT = "/jax/compilation_cache/cache_hits"
_MISS = "/jax/compilation_cache/cache_misses"
# Programs that compile faster than this are not worth a file (JAX's default is 1 s as well).
MIN_COMPILE_SECONDS = 1.0


def resolve(value: str) -> str:
  """The directory `value` names ('auto', '' or a path), absolute; '' when off."""
  if value == "auto":
    value = os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_DIR
  return os.path.abspath(os.path.expanduser(value)) if value else ""


def enable(value: str) -> Optional[str]:
  """Points JAX's persistent cache at the directory of `value` before the first compilation;
  returns it, or None when off or unusable (after one warning on stderr)."""
  path = resolve(value)
  if not path:
    jax.config.update("jax_compilation_cache_dir", None)
    return None
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path):   # writable?
      pass
  except OSError as e:
    print(f"warning: compilation cache {path} is not usable ({e.strerror or e}): compiling "
          "without it (set --config.compilation_cache_dir to a writable directory, or '' to "
          "turn the cache off)", file=sys.stderr, flush=True)
    jax.config.update("jax_compilation_cache_dir", None)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


def enabled_dir(config) -> Optional[str]:
  """The cache directory of `config` where a command of this process enabled it (enable);
  None otherwise (off, unusable, or a library call that enabled nothing)."""
  path = resolve(config.get("compilation_cache_dir", "auto"))
  return path if path and jax.config.jax_compilation_cache_dir == path else None


class Lookups:
  """Counts the persistent cache's hits and misses while open (a context manager), to say
  whether a program came from the cache."""

  def __init__(self):
    self.hits = self.misses = 0

  def _listen(self, event, **kwargs):
    del kwargs
    if event == _HIT:
      self.hits += 1
    elif event == _MISS:
      self.misses += 1

  def __enter__(self):
    jax.monitoring.register_event_listener(self._listen)
    return self

  def __exit__(self, *exc):
    # JAX has no public unregister for plain event listeners; the private one is stable.
    from jax._src import monitoring  # pylint: disable=g-import-not-at-top
    monitoring.unregister_event_listener(self._listen)
    return False

  def describe(self) -> str:
    """'from the compilation cache', 'compiled (now cached)' or 'compiled'."""
    if self.hits and not self.misses:
      return "from the compilation cache"
    return "compiled (now cached)" if self.misses else "compiled"

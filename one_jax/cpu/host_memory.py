"""Keep freed host memory in the process, so that XLA:CPU's per-step buffers do not page-fault.

XLA:CPU allocates the buffers of each executable run afresh and frees them afterwards. glibc
hands large freed blocks back to the kernel (it unmaps them, or shrinks the per-thread arena
that held them), so the next step faults every page in again and the kernel zeroes it. For
ONE-ResNet32 at batch 128 on a 2-core CPU that was 118k page faults and 195 ms of kernel CPU
time per train step: a step of 315 ms took 219 ms without them (benchmarks/NOTES.md, entry 11).

`reuse_freed_memory` sets glibc's allocator to one arena, no separate mappings for large blocks
and no trimming: freed memory stays mapped and the next step reuses it. The process's resident
memory then stays at its peak, as with PyTorch's caching allocators. The setting is
process-wide and only takes full effect before JAX starts its threads, so the command-line entry
points (main, bench, benchmarks/) call `apply_for_cpu` first thing, under their
--reuse_host_memory flag (FLAG_HELP); a library user can call it at the top of a script. It
applies only where JAX will compute on the CPU (an accelerator's host memory is not XLA:CPU's
per-step buffers) and does nothing without glibc.
"""
import ctypes
import importlib.metadata
import importlib.util
import os
import pkgutil

FLAG_NAME = "reuse_host_memory"
FLAG_HELP = ("Keep freed host memory mapped for reuse where JAX computes on the CPU (glibc: one "
             "malloc arena, no mmap for large blocks, no trimming): XLA:CPU steps then do not "
             "page-fault. one_jax/cpu/host_memory.py says why.")

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NO_TRIM = -1   # mallopt(3): -1 disables trimming completely (any finite value is below
                # the gigabytes a DenseNet step frees at once)


def _glibc():
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement  (glibc only)
    return libc
  except (OSError, AttributeError):
    return None


def reuse_freed_memory() -> bool:
  """Makes glibc keep freed memory for reuse; True where it applied (glibc), else False."""
  libc = _glibc()
  if libc is None:
    return False
  return all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NO_TRIM)))


def _accelerator_plugins_installed() -> bool:
  """Whether JAX would find a GPU or TPU backend to prefer over the CPU (its plugin discovery:
  the jax_plugins namespace and entry points, and libtpu), found without starting JAX."""
  if importlib.metadata.entry_points(group="jax_plugins"):
    return True
  if importlib.util.find_spec("libtpu") is not None:
    return True
  try:
    import jax_plugins  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def computes_on_cpu(environ=None) -> bool:
  """Whether JAX's default backend will be the CPU: JAX_PLATFORMS names it first, or no
  accelerator plugin is installed. Decided before JAX starts (starting it to ask would be too
  late for the allocator setting)."""
  environ = os.environ if environ is None else environ
  platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not _accelerator_plugins_installed()


def apply_for_cpu(enabled: bool = True) -> bool:
  """reuse_freed_memory() where `enabled` and JAX computes on the CPU; whether it applied."""
  return bool(enabled) and computes_on_cpu() and reuse_freed_memory()

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
points (main, bench, benchmarks/) make it first thing, under --reuse_host_memory; a library
user can call it at the top of a script. Without glibc it does nothing.
"""
import ctypes

from absl import flags

REUSE_HOST_MEMORY = flags.DEFINE_bool(
    "reuse_host_memory", True, "Keep freed host memory mapped for reuse (glibc: one malloc "
    "arena, no mmap for large blocks, no trimming): XLA:CPU steps then do not page-fault. "
    "one_jax/cpu/host_memory.py says why.")

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NO_TRIM = 2**31 - 1   # mallopt takes an int: trim only beyond 2 GiB of free heap top


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


def apply_flag() -> bool:
  """reuse_freed_memory() if --reuse_host_memory (the default); returns whether it applied."""
  return REUSE_HOST_MEMORY.value and reuse_freed_memory()

"""Compiled CPU convolution kernels (one_jax/cpu/csrc/conv_kernels.cc), called through XLA's FFI.

XLA:CPU computes a convolution's weight gradient at a third of its forward speed, and its
forward convolution runs at about half of this machine's FMA throughput on CIFAR shapes
(benchmarks/NOTES.md, entry 10). These kernels read NHWC data in place instead. setup.py
builds them against the installed jaxlib's FFI headers; where they could not be built (the
build said why, and main and bench repeat it via `off_warning`), or the CPU has neither
AVX-512 nor AVX2 with FMA, `conv_impl='auto'` keeps XLA's convolutions and `'kernel'` is an
error that says why. Other platforms always use XLA's convolutions (convolution.conv2d picks per
platform at lowering).
"""
import contextlib
import ctypes
import functools
import glob
import os
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

CONV_IMPLS = ("auto", "kernel", "xla")
SIMD_LEVELS = ("none", "avx2", "avx512")  # the library's levels 0, 1, 2
_FORWARD = "one_jax_conv_forward"
_WEIGHT_GRAD = "one_jax_conv_weight_grad"
FFI_TARGETS = (_FORWARD, _WEIGHT_GRAD)   # the custom calls a program of ours may hold
_LIBRARY_GLOB = "_conv_kernels*.so"


_BUILD_ERROR_FILE = "_conv_kernels_build_error.txt"   # written by setup.py where the build failed


def _not_built_reason(package_dir: str) -> str:
  fix = "reinstall one_jax where a C++17 compiler is available, e.g. pip install -v ."
  try:
    with open(os.path.join(package_dir, _BUILD_ERROR_FILE), encoding="utf-8") as f:
      return f"the compiled kernels failed to build ({f.read().strip()}); {fix}"
  except OSError:
    return f"the compiled kernels are not installed; {fix}"


@functools.lru_cache(maxsize=None)
def _library() -> Tuple[Optional[ctypes.CDLL], str]:
  """The loaded library with its handlers registered, once: (library or None, why not)."""
  package_dir = os.path.dirname(os.path.abspath(__file__))
  paths = sorted(glob.glob(os.path.join(package_dir, _LIBRARY_GLOB)))
  if not paths:
    return None, _not_built_reason(package_dir)
  try:
    library = ctypes.CDLL(paths[0])
  except OSError as e:
    return None, f"the compiled kernels in {paths[0]} do not load ({e})"
  if not library.OneJaxConvKernelsSimdLevel():
    return None, "this CPU has neither AVX-512 nor AVX2 with FMA, which the kernels need"
  jax.ffi.register_ffi_target(_FORWARD, jax.ffi.pycapsule(library.OneJaxConvForward),
                              platform="cpu")
  jax.ffi.register_ffi_target(_WEIGHT_GRAD, jax.ffi.pycapsule(library.OneJaxConvWeightGrad),
                              platform="cpu")
  return library, ""


def kernel_status() -> Tuple[bool, str]:
  """(True, '') where the kernels can run here, else (False, the reason)."""
  library, why = _library()
  return library is not None, why


def simd_level() -> str:
  """The instruction set the kernels run with here: 'avx512', 'avx2' or 'none'."""
  library, _ = _library()
  level = library.OneJaxConvKernelsSimdLevel() if library is not None else 0
  return SIMD_LEVELS[level]


@contextlib.contextmanager
def capped_simd_level(level: str):
  """Runs the kernels with at most `level` ('avx2' or 'avx512') inside the block (tests use it
  to check the AVX2 code on an AVX-512 CPU). Applies to executions, not to compilations."""
  library, why = _library()
  if library is None:
    raise RuntimeError(f"one_jax's CPU convolution kernels cannot run: {why}")
  library.OneJaxConvKernelsCapSimdLevel(SIMD_LEVELS.index(level))
  try:
    yield simd_level()
  finally:
    library.OneJaxConvKernelsCapSimdLevel(len(SIMD_LEVELS) - 1)


def resolve_conv_impl(impl: str) -> str:
  """'kernel' or 'xla': what a model's CPU convolutions use ('auto' = the kernels if usable)."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl={impl!r} is unknown: use one of {', '.join(CONV_IMPLS)}")
  if impl == "xla":
    return "xla"
  usable, why = kernel_status()
  if usable:
    return "kernel"
  if impl == "kernel":
    raise ValueError(f"conv_impl='kernel' cannot run: {why}; use 'auto' or 'xla'")
  return "xla"


def conv_impl_on(impl: str, platform: str, compute_dtype: str = "float32") -> str:
  """What runs the convolutions of a model with `conv_impl=impl` on `platform` (the kernels
  take float32 data only)."""
  resolved = resolve_conv_impl(impl)
  return resolved if platform == "cpu" and compute_dtype == "float32" else "xla"


def off_warning(impl: str, platform: str) -> str:
  """The one line the command-line tools print where `impl='auto'` falls back to XLA's CPU
  convolutions because the kernels cannot run here ('' where nothing is off)."""
  if impl != "auto" or platform != "cpu":
    return ""
  usable, why = kernel_status()
  if usable:
    return ""
  return (f"warning: one_jax's CPU convolution kernels are off ({why}); XLA's slower "
          "convolutions run instead")


def supports(x, kernel_shape: Sequence[int], padding=((0, 0), (0, 0))) -> bool:
  """The kernels' scope: float32 data, a multiple of 16 output channels, no negative padding
  (lax's cropping)."""
  return (x.dtype == jnp.float32 and len(kernel_shape) == 4 and kernel_shape[-1] % 16 == 0
          and min(p for pair in padding for p in pair) >= 0)


def _ffi_call(target: str, result_shape):
  usable, why = kernel_status()   # registers the handlers on first use
  if not usable:
    raise RuntimeError(f"one_jax's CPU convolution kernels cannot run: {why}")
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(tuple(result_shape), jnp.float32),
                          vmap_method="sequential")


def _attributes(stride: int, padding):
  (pad_h, _), (pad_w, _) = padding
  return dict(stride=np.int64(stride), pad_h=np.int64(pad_h), pad_w=np.int64(pad_w))


def conv_forward(x, kernel, stride: int, padding):
  """lax.conv_general_dilated(x, kernel, stride, padding) for NHWC x, HWIO kernel (CPU only).

  padding is ((top, bottom), (left, right)); the output is as large as XLA's.
  """
  n, h, w, _ = x.shape
  kh, kw, _, co = kernel.shape
  (pt, pb), (pl, pr) = padding
  out_shape = (n, (h + pt + pb - kh) // stride + 1, (w + pl + pr - kw) // stride + 1, co)
  return _ffi_call(_FORWARD, out_shape)(x, kernel, **_attributes(stride, padding))


def conv_weight_grad(x, dy, kernel_shape: Sequence[int], stride: int, padding):
  """d(conv(x, kernel))/d(kernel) applied to dy; NHWC x and dy, HWIO result (CPU only)."""
  return _ffi_call(_WEIGHT_GRAD, kernel_shape)(x, dy, **_attributes(stride, padding))

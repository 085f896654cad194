"""Builds one_jax's CPU convolution kernels; the package metadata is in pyproject.toml.

The kernels (one_jax/cpu/kernels.py) are a plain shared library that XLA calls through its FFI,
loaded with ctypes (no Python C API), compiled against the FFI headers of the jaxlib in the
build environment (`jax.ffi.include_dir()`; jax is a build requirement). Where they cannot be
built, the install still succeeds, loudly: the build prints a warning, records why in
one_jax/cpu/_conv_kernels_build_error.txt, and `python -m one_jax.main` / `one_jax.bench` say
that the kernels are off and why; one_jax then runs XLA's own convolutions.
"""
import os
import sys

import setuptools
from setuptools.command.build_ext import build_ext

BUILD_ERROR_FILE = "_conv_kernels_build_error.txt"   # read by one_jax/cpu/kernels.py


class BuildKernels(build_ext):
  """build_ext that never fails the install: a failed kernel build is a warning and a record."""

  def build_extension(self, ext):
    # Beside the library: in the build tree (wheels) and, for in-place builds, the sources.
    package_dirs = {os.path.dirname(self.get_ext_fullpath(ext.name))}
    if self.editable_mode or getattr(self, "_one_jax_inplace", False):
      package_dirs.add(os.path.join(*ext.name.split(".")[:-1]))
    records = [os.path.join(d, BUILD_ERROR_FILE) for d in package_dirs]
    try:
      import jax  # pylint: disable=g-import-not-at-top  (a build requirement)
      ext.include_dirs = [*ext.include_dirs, jax.ffi.include_dir()]
      super().build_extension(ext)
    except Exception as e:  # pylint: disable=broad-except  (compiler missing, headers, ...)
      why = " ".join(f"{type(e).__name__}: {e}".split())
      banner = "=" * 78
      print(f"\n{banner}\nWARNING: one_jax's CPU convolution kernels were NOT built ({why}).\n"
            "one_jax works without them but runs XLA's slower CPU convolutions. Install a C++17\n"
            f"compiler and jax, then reinstall (pip install -v . shows this message).\n{banner}\n",
            file=sys.stderr, flush=True)
      for record in records:
        os.makedirs(os.path.dirname(record), exist_ok=True)
        with open(record, "w", encoding="utf-8") as f:
          f.write(why + "\n")
      return
    for record in records:
      if os.path.exists(record):
        os.remove(record)

  def run(self):
    self._one_jax_inplace = self.inplace   # setuptools builds in build_lib, then copies
    super().run()


setuptools.setup(
    ext_modules=[setuptools.Extension(
        "one_jax.cpu._conv_kernels",
        sources=["one_jax/cpu/csrc/conv_kernels.cc"],   # includes conv_kernels_simd.inc
        depends=["one_jax/cpu/csrc/conv_kernels_simd.inc"],
        language="c++",
        extra_compile_args=["-std=c++17", "-O3"],
        optional=True,   # a failed build leaves nothing to copy in place (BuildKernels says why)
    )],
    cmdclass={"build_ext": BuildKernels},
)

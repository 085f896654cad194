"""The CPU convolution library is a per-executable choice that changes speed, not results."""
import re

import jax
import numpy as np
import pytest

from configs import step1
from one_jax import bench
from one_jax.cpu import xla_options


def test_auto_is_eigen_and_only_cpu_gets_options():
  config = step1.get_config("three_branch")
  assert config.cpu_conv_library == "auto"
  assert xla_options.resolve_cpu_conv_library("auto") == "eigen"
  assert xla_options.compiler_options(config, "cpu") == {
      "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
  assert xla_options.compiler_options(config, "gpu") == {}
  assert xla_options.compiler_options(config, "tpu") == {}
  config.cpu_conv_library = "ynnpack"
  assert xla_options.compiler_options(config, "cpu") == {}  # XLA's default


def test_unknown_library_is_a_one_line_error():
  with pytest.raises(ValueError, match=r"cpu_conv_library='mkl' is unknown: use one of auto, "
                                       r"eigen, ynnpack"):
    xla_options.resolve_cpu_conv_library("mkl")


def _one_step(library):
  config = step1.get_config("three_branch,smoke")
  config.cpu_conv_library = library
  config.conv_impl = "xla"   # the library runs XLA's convolutions, not one_jax's kernels
  timer = bench.StepTimer(config, batch_size=16, with_eval=True)
  loss = float(timer.train_once())
  return timer, loss


def _library_convolutions(compiled) -> int:
  """Convolutions inside the fusions XLA hands to the YNNPACK library."""
  hlo = compiled.as_text()
  bodies = dict(re.findall(r"^(%[\w.\-]+) .*?\{\n(.*?)\n\}", hlo, re.S | re.M))
  called = re.findall(r"calls=(%[\w.\-]+).*__ynn_fusion", hlo)
  return sum(bodies.get(name, "").count(" convolution(") for name in called)


def test_both_libraries_give_the_same_step():
  eigen, eigen_loss = _one_step("eigen")
  ynn, ynn_loss = _one_step("ynnpack")
  # The option reached the compiled executables: YNNPACK runs no convolution under 'eigen'.
  assert _library_convolutions(ynn.train_compiled) > 0
  assert _library_convolutions(eigen.train_compiled) == 0
  np.testing.assert_allclose(eigen_loss, ynn_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               eigen.state["params"], ynn.state["params"])
  np.testing.assert_allclose(np.asarray(eigen.eval_once()["test/loss"]),
                             np.asarray(ynn.eval_once()["test/loss"]), rtol=1e-5)

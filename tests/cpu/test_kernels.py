"""one_jax's compiled CPU convolution kernels (kernels.py, csrc/conv_kernels.cc) against XLA."""
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import step1
from one_jax import bench
from one_jax.architectures import model_spec
from one_jax.cpu import convolution, kernels

DN = ("NHWC", "HWIO", "NHWC")


def test_the_kernels_are_built_and_run_here():
  """The install compiled the library and this CPU runs it (else every kernel test below would
  silently test XLA against itself)."""
  usable, why = kernels.kernel_status()
  assert usable, why
  assert kernels.simd_level() in ("avx2", "avx512")
  assert kernels.resolve_conv_impl("auto") == "kernel"
  assert kernels.conv_impl_on("auto", "cpu") == "kernel"
  assert kernels.conv_impl_on("auto", "gpu") == "xla"
  assert kernels.conv_impl_on("auto", "cpu", "bfloat16") == "xla"   # the kernels: float32 only
  assert kernels.resolve_conv_impl("xla") == "xla"


def test_bad_or_unavailable_impl_is_a_one_line_error(monkeypatch):
  with pytest.raises(ValueError, match=r"conv_impl='fast' is unknown: use one of auto, kernel, "
                                       r"xla"):
    kernels.resolve_conv_impl("fast")
  monkeypatch.setattr(kernels, "_library", lambda: (None, "the compiled kernels are missing"))
  assert kernels.resolve_conv_impl("auto") == "xla"   # falls back, nothing to fix
  with pytest.raises(ValueError, match=r"conv_impl='kernel' cannot run: the compiled kernels "
                                       r"are missing; use 'auto' or 'xla'"):
    kernels.resolve_conv_impl("kernel")
  with pytest.raises(ValueError, match="conv_impl='kernel' cannot run"):
    model_spec.ModelSpec("one_resnet", 8, 10, num_branches=3, conv_impl="kernel")


def test_the_tools_say_when_the_kernels_are_off(monkeypatch):
  """main and bench print kernels.off_warning: one line, only where 'auto' fell back on a CPU."""
  assert kernels.off_warning("auto", "cpu") == ""   # built and usable here
  monkeypatch.setattr(kernels, "_library", lambda: (None, "the compiled kernels are missing"))
  warning = kernels.off_warning("auto", "cpu")
  assert warning == ("warning: one_jax's CPU convolution kernels are off (the compiled kernels "
                     "are missing); XLA's slower convolutions run instead")
  assert kernels.off_warning("xla", "cpu") == ""    # asked for: nothing to say
  assert kernels.off_warning("auto", "gpu") == ""   # never used off the CPU


# (batch, height, width, in, out, kernel size, stride, padding): the model's shapes and the
# kernels' edge cases (odd sizes, one image, 48 = 3 x 16 output channels, 5x5 stride 3,
# asymmetric and zero padding, a 9x9 kernel).
CASES = {
    "stage1_3x3": (4, 32, 32, 16, 16, 3, 1, ((1, 1), (1, 1))),
    "stem_c3": (2, 32, 32, 3, 16, 3, 1, ((1, 1), (1, 1))),
    "down_3x3_s2": (3, 16, 16, 32, 64, 3, 2, ((1, 1), (1, 1))),
    "down_1x1_s2": (3, 16, 16, 16, 32, 1, 2, ((0, 0), (0, 0))),
    "stage3_3x3": (5, 8, 8, 64, 64, 3, 1, ((1, 1), (1, 1))),
    "bottleneck_1x1": (2, 8, 8, 64, 256, 1, 1, ((0, 0), (0, 0))),
    "odd_5x5_s3_c48": (1, 9, 7, 7, 48, 5, 3, ((2, 2), (2, 2))),
    "asymmetric_pad": (2, 7, 6, 32, 16, 3, 1, ((0, 2), (1, 0))),
    "valid_3x3": (2, 6, 6, 16, 32, 3, 1, ((0, 0), (0, 0))),
    "large_9x9": (1, 12, 12, 16, 16, 9, 1, ((4, 4), (4, 4))),
}


def _lax(x, k, stride, padding):
  return jax.lax.conv_general_dilated(x, k, (stride, stride), padding, dimension_numbers=DN)


def _operands(case):
  n, h, w, cin, cout, k, stride, padding = CASES[case]
  kx, kk, kp = jax.random.split(jax.random.key(7), 3)
  x = jax.random.normal(kx, (n, h, w, cin))
  kernel = jax.random.normal(kk, (k, k, cin, cout)) * np.sqrt(2.0 / (k * k * cout))
  probe = jax.random.normal(kp, jax.eval_shape(lambda: _lax(x, kernel, stride, padding)).shape)
  return x, kernel, probe, stride, padding


def _value_and_grads(impl, x, kernel, probe, stride, padding):
  def loss(x, kernel):
    return jnp.sum(convolution.conv2d(x, kernel, stride, padding, 16, True, impl) * probe)
  value = jax.jit(lambda x, k: convolution.conv2d(x, k, stride, padding, 16, True, impl))(x, kernel)
  return value, jax.jit(jax.grad(loss, argnums=(0, 1)))(x, kernel)


def _assert_matches_lax(x, kernel, probe, stride, padding):
  value, grads = _value_and_grads("kernel", x, kernel, probe, stride, padding)
  want_value = _lax(x, kernel, stride, padding)
  want_grads = jax.grad(lambda x, k: jnp.sum(_lax(x, k, stride, padding) * probe),
                        argnums=(0, 1))(x, kernel)
  chex.assert_trees_all_close(value, want_value, atol=1e-5, rtol=1e-5)
  for got, want in zip(grads, want_grads):
    chex.assert_trees_all_close(got, want, atol=1e-5 * float(jnp.max(jnp.abs(want))),
                                rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_kernels_match_lax(case):
  _assert_matches_lax(*_operands(case))


@pytest.mark.parametrize("case", ["stage1_3x3", "down_3x3_s2", "odd_5x5_s3_c48",
                                  "bottleneck_1x1"])
def test_avx2_code_matches_lax(case):
  """The AVX2 + FMA code, run on this CPU with the instruction set capped."""
  with kernels.capped_simd_level("avx2") as level:
    assert level == "avx2"
    _assert_matches_lax(*_operands(case))
  assert kernels.simd_level() in ("avx2", "avx512")


def test_kernel_calls_are_in_the_cpu_program_only():
  x, kernel, probe, stride, padding = _operands("stage1_3x3")
  grad = jax.jit(jax.grad(lambda x, k: jnp.sum(
      convolution.conv2d(x, k, stride, padding, 16, True, "kernel") * probe), argnums=(0, 1)))
  cpu_text = grad.lower(x, kernel).as_text()
  # forward (needed by nothing here, so dead), input gradient and weight gradient
  assert cpu_text.count("one_jax_conv_forward") == 1
  assert cpu_text.count("one_jax_conv_weight_grad") == 1
  assert "conditional" not in cpu_text   # the platform choice is made when lowering
  xla_text = jax.jit(lambda x, k: convolution.conv2d(x, k, stride, padding, 16, True, "xla")).lower(
      x, kernel).as_text()
  assert "one_jax_conv" not in xla_text


def test_unsupported_shapes_use_xla():
  """bfloat16 data, output channels that are not a multiple of 16 and negative padding stay
  with XLA."""
  x = jnp.ones((2, 8, 8, 16))
  assert not kernels.supports(x, (3, 3, 16, 24))
  assert not kernels.supports(x.astype(jnp.bfloat16), (3, 3, 16, 32))
  assert kernels.supports(x, (3, 3, 16, 32))
  assert not kernels.supports(x, (3, 3, 16, 32), ((-1, 0), (0, 0)))
  k24 = jnp.ones((3, 3, 16, 24))
  text = jax.jit(lambda x, k: convolution.conv2d(x, k, 1, ((1, 1), (1, 1)), 16, True, "kernel")).lower(
      x, k24).as_text()
  assert "one_jax_conv" not in text


def test_vmapped_kernels_match_lax():
  """branch_impl='vmap' maps the custom calls over the stacked branches."""
  x, kernel, probe, stride, padding = _operands("stage3_3x3")
  kernels_b = jnp.stack([kernel, 2 * kernel, -kernel])

  def grads(impl):
    def loss(x, ks):
      out = jax.vmap(lambda k: convolution.conv2d(x, k, stride, padding, 16, True, impl))(ks)
      return jnp.sum(out * probe)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, kernels_b)

  chex.assert_trees_all_close(grads("kernel"), grads("xla"), atol=1e-4, rtol=1e-5)


def test_train_step_is_the_same_with_and_without_kernels():
  """One ONE train step (4 devices, synchronised BatchNorm) and the eval step: conv_impl
  'kernel' and 'xla' agree to float32 rounding, and only 'kernel' calls the kernels."""
  results = {}
  for impl in ("kernel", "xla"):
    config = step1.get_config("three_branch,smoke")
    config.conv_impl = impl
    timer = bench.StepTimer(config, batch_size=16, with_eval=True)
    loss = float(timer.train_once())
    results[impl] = (timer, loss)
  (kt, kloss), (xt, xloss) = results["kernel"], results["xla"]
  assert len(re.findall(r"one_jax_conv_\w+", kt.train_compiled.as_text())) > 0
  assert "one_jax_conv" not in xt.train_compiled.as_text()
  np.testing.assert_allclose(kloss, xloss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               kt.state["params"], xt.state["params"])
  np.testing.assert_allclose(np.asarray(kt.eval_once()["test/loss"]),
                             np.asarray(xt.eval_once()["test/loss"]), rtol=1e-5)
  assert kt.flops == pytest.approx(xt.flops)   # the kernels' work is counted

"""one_jax.cpu.convolution.conv2d (custom weight gradient) against lax.conv_general_dilated: value and gradients."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from one_jax.architectures import layers
from one_jax.cpu import convolution

DN = ("NHWC", "HWIO", "NHWC")

# The shape classes of the CIFAR/ONE ResNets (batch reduced): stem, 3x3 stride 1 at each stage
# width, the stride-2 3x3 and 1x1 (shortcut) convolutions entering stages 2 and 3, and the
# bottleneck's 1x1 convolutions.
SHAPE_CLASSES = {
    "stem_3x3_c3": (32, 32, 3, 16, 3, 1),
    "stage1_3x3": (32, 32, 16, 16, 3, 1),
    "stage2_3x3": (16, 16, 32, 32, 3, 1),
    "stage3_3x3": (8, 8, 64, 64, 3, 1),
    "down_3x3_s2": (16, 16, 32, 64, 3, 2),
    "down_1x1_s2": (32, 32, 16, 32, 1, 2),
    "bottleneck_1x1": (8, 8, 64, 256, 1, 1),
}
# (images per weight-gradient slice, copy of x for the weight gradient, implementation);
# the slices and the copy only shape XLA's weight gradient, 'kernel' is one_jax's CPU kernels.
FORMULATIONS = {"single": (None, True, "xla"), "chunk8": (8, True, "xla"),
                "chunk4": (4, True, "xla"), "chunk8_nocopy": (8, False, "xla"),
                "kernel": (16, True, "kernel")}


def _reference(x, kernel, stride, k):
  pad = k // 2
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                      dimension_numbers=DN)


@pytest.mark.parametrize("formulation", list(FORMULATIONS))
@pytest.mark.parametrize("shape_class", list(SHAPE_CLASSES))
def test_value_and_gradients_match_lax(shape_class, formulation):
  h, w, cin, cout, k, stride = SHAPE_CLASSES[shape_class]
  chunk, copy_input, impl = FORMULATIONS[formulation]
  kx, kk, kc = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (16, h, w, cin))
  kernel = jax.random.normal(kk, (k, k, cin, cout)) * np.sqrt(2.0 / (k * k * cout))
  pad = ((k // 2, k // 2),) * 2
  probe = jax.random.normal(kc, _reference(x, kernel, stride, k).shape)

  def ours(x, kernel):
    return jnp.sum(convolution.conv2d(x, kernel, stride, pad, chunk, copy_input, impl) * probe)

  def theirs(x, kernel):
    return jnp.sum(_reference(x, kernel, stride, k) * probe)

  value = jax.jit(lambda x, kern: convolution.conv2d(x, kern, stride, pad, chunk, copy_input,
                                                impl))(x, kernel)
  chex.assert_trees_all_close(value, _reference(x, kernel, stride, k), atol=1e-5, rtol=1e-5)
  got = jax.jit(jax.grad(ours, argnums=(0, 1)))(x, kernel)
  want = jax.jit(jax.grad(theirs, argnums=(0, 1)))(x, kernel)
  for g, r in zip(got, want):
    chex.assert_trees_all_close(g, r, atol=1e-4 * float(jnp.max(jnp.abs(r))), rtol=1e-5)


def test_chunking_splits_only_whole_slices():
  assert convolution._chunks(128, 8) == 16
  assert convolution._chunks(8, 8) == 1      # nothing to split
  assert convolution._chunks(12, 8) == 1     # not a multiple: one convolution
  assert convolution._chunks(128, None) == 1


def test_conv_module_is_a_flax_conv():
  """Same parameter name, shape and initial values as the nn.Conv it replaces; same output."""
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 5))
  ours = layers.conv(7, 3, 2, name="c")
  flax_conv = nn.Conv(7, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False,
                      kernel_init=layers.conv_kernel_init)
  v_ours = ours.init(jax.random.key(2), x)
  v_flax = flax_conv.init(jax.random.key(2), x)
  chex.assert_trees_all_equal(v_ours, v_flax)
  chex.assert_trees_all_close(ours.apply(v_ours, x), flax_conv.apply(v_flax, x), atol=1e-6)


def test_model_gradients_match_flax_conv(monkeypatch):
  """A whole ONE ResNet step (loss, gradients, BatchNorm statistics) with layers.conv (one_jax's
  CPU kernels, conv_impl='auto') equals the same model built on flax.linen.Conv, to float32
  tolerance."""
  from one_jax.architectures import model_spec
  from one_jax.training import losses

  images = jax.random.normal(jax.random.key(3), (16, 32, 32, 3))
  labels = jnp.arange(16) % 10

  def loss_and_grads(variables):
    model = model_spec.ModelSpec("one_resnet", 8, 10, num_branches=2).build()

    def loss_fn(params):
      out, state = model.apply(dict(variables, params=params), images, train=True,
                               mutable=["batch_stats"])
      return losses.one_loss(out, labels, epoch=40.0)[0], state["batch_stats"]

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])

  variables = model_spec.ModelSpec("one_resnet", 8, 10, num_branches=2).build().init(
      jax.random.key(4), images[:1])
  (loss, stats), grads = loss_and_grads(variables)

  def flax_conv(features, kernel_size, stride=1, name=None, copy_input=True, impl="auto"):
    del copy_input, impl  # only change how layers.conv computes the same numbers
    pad = kernel_size // 2
    return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=False,
                   kernel_init=layers.conv_kernel_init, name=name)

  monkeypatch.setattr(layers, "conv", flax_conv)
  (loss_ref, stats_ref), grads_ref = loss_and_grads(variables)
  chex.assert_trees_all_close(loss, loss_ref, rtol=1e-6)
  chex.assert_trees_all_close(stats, stats_ref, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(grads, grads_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shape_class", ["stage1_3x3", "down_3x3_s2", "down_1x1_s2"])
def test_gradient_convolutions_keep_the_library_layout_inside_a_loop(shape_class):
  """Inside a lax.scan body (the train loop's steps per dispatch) XLA:CPU does not transpose a
  convolution into its library's NHWC / HWIO layout; jax.grad's own gradient convolutions
  (images as features, or the kernel's axes swapped) then compile as plain loop nests 10-30x
  slower (jax-ml/jax#12868). Every convolution of the compiled step, forward and both
  gradients, must already be NHWC / HWIO / NHWC."""
  h, w, cin, cout, k, stride = SHAPE_CLASSES[shape_class]
  x = jnp.ones((16, h, w, cin))
  kernel = jnp.ones((k, k, cin, cout))
  pad = ((k // 2, k // 2),) * 2

  def steps(x, kernel):
    def body(kernel, _):
      loss = lambda x, k_: jnp.sum(jnp.sin(convolution.conv2d(x, k_, stride, pad, 16, True,
                                                               "xla")))
      gx, gk = jax.grad(loss, argnums=(0, 1))(x, kernel)
      return kernel - 0.1 * gk, jnp.sum(gx)
    return jax.lax.scan(body, kernel, None, length=2)

  text = jax.jit(steps).lower(x, kernel).compile().as_text()
  labels = [line.split("dim_labels=")[1].split(",")[0] for line in text.splitlines()
            if " convolution(" in line]
  assert len(labels) >= 3, text   # forward, input gradient, weight gradient (+ the copy)
  assert set(labels) == {"b01f_01io->b01f"}, labels


@pytest.mark.parametrize("impl", ["xla", "kernel"])
@pytest.mark.parametrize("stride", [1, 2])
def test_grouped_convolution_matches_lax(impl, stride):
  """groups > 1 (ResNeXt): on the CPU one convolution per group, the value and gradients of
  lax.conv_general_dilated's feature_group_count."""
  groups, cin, cout = 4, 64, 64
  kx, kk, kc = jax.random.split(jax.random.key(5), 3)
  x = jax.random.normal(kx, (16, 8, 8, cin))
  kernel = jax.random.normal(kk, (3, 3, cin // groups, cout)) * 0.1
  pad = ((1, 1), (1, 1))

  def reference(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), pad, dimension_numbers=DN,
                                        feature_group_count=groups)

  probe = jax.random.normal(kc, reference(x, kernel).shape)
  ours = lambda x, k: convolution.conv2d(x, k, stride, pad, 16, False, impl, groups)
  chex.assert_trees_all_close(jax.jit(ours)(x, kernel), reference(x, kernel), atol=1e-5,
                              rtol=1e-5)
  got = jax.jit(jax.grad(lambda x, k: jnp.sum(ours(x, k) * probe), argnums=(0, 1)))(x, kernel)
  want = jax.jit(jax.grad(lambda x, k: jnp.sum(reference(x, k) * probe), argnums=(0, 1)))(
      x, kernel)
  for g, r in zip(got, want):
    chex.assert_trees_all_close(g, r, atol=1e-4 * float(jnp.max(jnp.abs(r))), rtol=1e-5)
  text = jax.jit(ours).lower(x, kernel).compile().as_text()
  assert "feature_group_count" not in text

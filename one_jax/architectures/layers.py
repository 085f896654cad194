"""Layers with the reference (PyTorch) initialisation and BatchNorm semantics.

Kept in one place so that every model, the converter and the speed work agree on
parameter names ('kernel', 'bias', 'scale', 'mean', 'var') and numerics.
"""
import functools
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from one_jax.cpu import kernels
# The custom-VJP convolution lives with the CPU backend; its names stay importable from here.
from one_jax.cpu.convolution import WEIGHT_GRAD_CHUNK, conv2d, weight_grad  # noqa: F401

# Reference conv init: normal(0, sqrt(2 / (k * k * out_channels))) == He, fan-out, untruncated.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_linear_kernel_init(key, shape, dtype=jnp.float32):
  """PyTorch nn.Linear weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)); kernel is [in, out]."""
  bound = 1.0 / jnp.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def scale_gradient(x, scale: float):
  """x, whose gradient is multiplied by `scale` on the way back (CL-ILR's backpropagation
  rescaling at the branch point: identity forward, grad * scale backward)."""
  del scale
  return x


def _scale_gradient_fwd(x, scale):
  del scale
  return x, None


def _scale_gradient_bwd(scale, _, g):
  return (g * jnp.asarray(scale, g.dtype),)


scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)


def at_least_float32(x):
  """x in float32, or as it is when wider (float64 runs): what mixed precision keeps exact."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class Conv(nn.Module):
  """NHWC convolution with PyTorch's symmetric padding (k // 2), bias-free unless use_bias.

  The parameters are nn.Conv's: 'kernel', [k, k, in / groups, out] (HWIO), same initialiser,
  same name, and 'bias' (PyTorch's default init) with use_bias, so checkpoints and conversion
  see the layout of flax.linen.Conv. Grouped convolutions (groups > 1, ResNeXt) are
  lax.conv_general_dilated's feature_group_count (on the CPU, one convolution per group: see
  cpu.convolution.conv2d). Parameters stay
  float32; the convolution computes in the dtype of x (bfloat16 under mixed precision).
  """
  features: int
  kernel_size: int
  stride: int = 1
  copy_input: bool = True
  impl: str = "auto"   # kernels.CONV_IMPLS
  groups: int = 1
  use_bias: bool = False

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", conv_kernel_init,
                        (k, k, x.shape[-1] // self.groups, self.features))
    pad = k // 2
    y = conv2d(x, kernel.astype(x.dtype), self.stride, ((pad, pad), (pad, pad)),
               WEIGHT_GRAD_CHUNK, self.copy_input, kernels.resolve_conv_impl(self.impl),
               self.groups)
    if self.use_bias:
      bound = 1.0 / jnp.sqrt(k * k * x.shape[-1] // self.groups)
      bias = self.param("bias", lambda key, s: jax.random.uniform(key, s, jnp.float32, -bound,
                                                                   bound), (self.features,))
      y = y + bias.astype(y.dtype)
    return y


def conv(features: int, kernel_size: int, stride: int = 1, name: Optional[str] = None,
         copy_input: bool = True, impl: str = "auto", groups: int = 1, use_bias: bool = False):
  """NHWC convolution with PyTorch's symmetric padding (k // 2); bias-free unless use_bias."""
  return Conv(features, kernel_size, stride, copy_input, impl, groups, use_bias, name=name)


class Dense(nn.Module):
  """nn.Linear with PyTorch's default init for both kernel and bias (no 'bias' without
  use_bias); computes in the dtype of its input (float32 parameters, cast: mixed precision),
  as Conv and BatchNorm do."""
  features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    kernel = self.param("kernel", torch_linear_kernel_init, (fan_in, self.features))
    y = x @ kernel.astype(x.dtype)
    if not self.use_bias:
      return y
    bound = 1.0 / jnp.sqrt(fan_in)
    bias = self.param("bias", lambda k, s: jax.random.uniform(k, s, jnp.float32, -bound, bound),
                      (self.features,))
    return y + bias.astype(x.dtype)


def pooled_classifier(x, num_classes: int):
  """Global average pool over H and W, then the linear 'classifier': the head of every branch
  and baseline. Returns (x, logits): the feature map the pool reads is what OKDDip's attention
  (pooled) and FFL's fusion module read (unused outputs cost nothing once jitted). Called
  inside a compact module, whose child the Dense becomes; checkpoints, conversion and surgery
  key on its name."""
  return x, Dense(num_classes, name="classifier")(jnp.mean(x, axis=(1, 2)))


class DepthwiseConv3x3(nn.Module):
  """A bias-free 3x3 depthwise convolution (stride 1, zero padding 1; 'kernel' HWIO
  [3, 3, 1, C], the reference's initialisation), as nine shifted multiply-adds: the numbers of
  a grouped convolution of C groups, which the CPU would run as C separate convolutions."""

  @nn.compact
  def __call__(self, x):
    _, h, w, c = x.shape
    kernel = self.param("kernel", conv_kernel_init, (3, 3, 1, c)).astype(x.dtype)
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(padded[:, dy:dy + h, dx:dx + w, :] * kernel[dy, dx, 0]
               for dy in range(3) for dx in range(3))


class BatchNorm(nn.Module):
  """BatchNorm over all axes but the last, with PyTorch's semantics.

  Differs from flax.linen.BatchNorm where the reference differs: the running variance
  is updated with the *unbiased* batch variance (n / (n - 1)), as torch.nn.BatchNorm does.
  With `axis_name` set, statistics are averaged over that mapped axis (synchronised
  BatchNorm), so N devices with a global batch give the numbers of one device. Statistics,
  running averages and the normalisation are computed in float32 whatever x's dtype (mixed
  precision); the output has x's dtype.
  """
  use_running_average: bool
  axis_name: Optional[str] = None
  momentum: float = 0.9
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,))
    bias = self.param("bias", nn.initializers.zeros, (features,))
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
    # Statistics and normalisation in float32 (or wider), only the result rounded to x's dtype;
    # one cast, so that in bfloat16 the backward pass sums its nearly cancelling terms in float32.
    xf = at_least_float32(x)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      reduce_axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(xf, axis=reduce_axes)
      mean_sq = jnp.mean(jnp.square(xf), axis=reduce_axes)
      count = x.size // features
      if self.axis_name is not None and not self.is_initializing():
        mean, mean_sq = jax.lax.pmean((mean, mean_sq), self.axis_name)
        count = count * jax.lax.psum(1, self.axis_name)
      var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
      if not self.is_initializing():
        unbiased = var * (count / max(count - 1, 1)) if isinstance(count, int) else (
            var * count / jnp.maximum(count - 1, 1))
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
    inv = jax.lax.rsqrt(var + self.epsilon) * scale
    return ((xf - mean) * inv + bias).astype(x.dtype)


ModuleDef = Any  # a module constructor: a Flax module class, or a partial of one


def conv_and_norm(train: bool = False, axis_name: Optional[str] = None,
                  conv_impl: str = "auto") -> Tuple[ModuleDef, ModuleDef]:
  """The convolution and the normalisation of every layer, chosen here once per model call.

  conv(features, kernel_size, stride, name, copy_input=True) runs on the backend of conv_impl
  (conv: 'auto' | 'kernel' | 'xla'); norm(name=...) is BatchNorm in training or eval
  mode, synchronised over axis_name when set. Blocks receive both, as in flax's
  examples/imagenet ResNet, instead of each threading (train, axis_name, conv_impl).
  """
  return (functools.partial(conv, impl=conv_impl),
          functools.partial(BatchNorm, use_running_average=not train, axis_name=axis_name))

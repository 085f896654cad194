"""Layers with the reference (PyTorch) initialisation and BatchNorm semantics.

Kept in one place so that every model, the converter and the speed work agree on
parameter names ('kernel', 'bias', 'scale', 'mean', 'var') and numerics.
"""
import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from one_jax import kernels

# Reference conv init: normal(0, sqrt(2 / (k * k * out_channels))) == He, fan-out, untruncated.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_linear_kernel_init(key, shape, dtype=jnp.float32):
  """PyTorch nn.Linear weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)); kernel is [in, out]."""
  bound = 1.0 / jnp.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _conv2d_forward(x, kernel, stride, padding):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                      dimension_numbers=_DIMENSION_NUMBERS)


def _opaque_copy(x):
  """x, exactly, as the output of a library kernel: a 1x1 convolution with the identity.

  XLA:CPU cannot fuse element-wise producers into a library convolution (nor, since it is a
  convolution and not a reshaped matrix product, into a separate copy feeding one), so
  whatever reads the result reads one materialised buffer instead of re-evaluating, in its own
  loop fusion, the chain of BatchNorm/ReLU/residual ops (up to six blocks deep) behind x.
  """
  c = x.shape[-1]
  eye = jnp.eye(c, dtype=x.dtype).reshape(1, 1, c, c)
  return jax.lax.conv_general_dilated(x, eye, (1, 1), "VALID",
                                      dimension_numbers=_DIMENSION_NUMBERS,
                                      precision=jax.lax.Precision.HIGHEST)


# Images per weight-gradient convolution (None: one convolution over the whole batch). XLA's
# weight-gradient convolution contracts over batch x height x width; both CPU libraries run it
# faster as a sum of convolutions over 8- or 16-image slices (benchmarks/NOTES.md, entries 4
# and 6: 16 is best with Eigen's convolutions, 8 with YNNPACK's, within 1-2% of each other).
WEIGHT_GRAD_CHUNK = 16


def _chunks(batch: int, chunk: Optional[int]) -> int:
  if chunk is None or batch <= chunk or batch % chunk:
    return 1
  return batch // chunk


def weight_grad(x, dy, kernel_shape, stride: int, padding, chunk: Optional[int] = None):
  """d(conv(x, kernel))/d(kernel) applied to dy, summed over `chunk`-image slices of the batch.

  Each slice is XLA's own weight-gradient convolution (the transpose of
  lax.conv_general_dilated), so chunk=None is exactly what jax.grad computes.
  """
  zeros = jnp.zeros(kernel_shape, x.dtype)
  parts = _chunks(x.shape[0], chunk)
  xs = x.reshape((parts, -1) + x.shape[1:])
  dys = dy.reshape((parts, -1) + dy.shape[1:])
  total = None
  for i in range(parts):
    _, vjp = jax.vjp(lambda k, xi=xs[i]: _conv2d_forward(xi, k, stride, padding), zeros)
    grad = vjp(dys[i])[0]
    total = grad if total is None else total + grad
  return total


def _xla_input_grad(dy, kernel, x_shape, stride, padding):
  """XLA's input gradient: the transpose of the forward convolution (a convolution of dy
  with the flipped kernel, lhs-dilated for strides > 1)."""
  _, vjp = jax.vjp(lambda x_: _conv2d_forward(x_, kernel, stride, padding),
                   jnp.zeros(x_shape, dy.dtype))
  return vjp(dy)[0]


def _kernel_input_grad(dy, kernel, padding):
  """The input gradient of a stride-1, symmetrically padded convolution as a forward
  convolution of dy with the flipped, in/out-swapped kernel (the kernels' scope)."""
  kh, kw = kernel.shape[:2]
  (pt, _), (pl, _) = padding
  flipped = jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))
  q_h, q_w = kh - 1 - pt, kw - 1 - pl
  return kernels.conv_forward(dy, flipped, 1, ((q_h, q_h), (q_w, q_w)))


def _kernel_input_grad_applies(dy, kernel, stride, padding) -> bool:
  kh, kw = kernel.shape[:2]
  (pt, pb), (pl, pr) = padding
  return (stride == 1 and pt == pb and pl == pr and pt <= kh - 1 and pl <= kw - 1
          and kernels.supports(dy, (kh, kw, kernel.shape[3], kernel.shape[2]), padding))


def _on_cpu(use_kernel: bool, kernel_fn, xla_fn, *args):
  """kernel_fn(*args) in computations lowered for the CPU (where use_kernel), else xla_fn."""
  if not use_kernel:
    return xla_fn(*args)
  return jax.lax.platform_dependent(*args, cpu=kernel_fn, default=xla_fn)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def conv2d(x, kernel, stride: int, padding, chunk: Optional[int] = WEIGHT_GRAD_CHUNK,
           copy_input: bool = True, impl: str = "xla"):
  """NHWC x HWIO convolution: lax.conv_general_dilated's value and gradients, faster.

  impl='kernel' (resolved by kernels.resolve_conv_impl): in computations lowered for the CPU,
  the compiled kernels of one_jax/csrc compute the output, the weight gradient and (stride 1)
  the input gradient, reading NHWC data in place (float32, output channels a multiple of 16);
  elsewhere, and outside that scope, XLA's forms below. impl='xla':
  - forward and input gradient: XLA's (the input gradient is a convolution with the flipped
    kernel);
  - weight gradient: `weight_grad` over `chunk`-image slices, reading x through
    `_opaque_copy`: XLA lowers each slice with x transposed to [C, H, W, N], and without the
    copy it fuses the producers of x into that transpose, recomputing residual chains with a
    transpose's strided access pattern. `copy_input=False` skips the copy where x is one
    element-wise fusion away from a library op (nothing long to recompute), e.g. the second
    convolution of a residual block.
  """
  return _conv2d_value(x, kernel, stride, padding, impl)


def _conv2d_value(x, kernel, stride, padding, impl):
  return _on_cpu(impl == "kernel" and kernels.supports(x, kernel.shape, padding),
                 lambda x, k: kernels.conv_forward(x, k, stride, padding),
                 lambda x, k: _conv2d_forward(x, k, stride, padding), x, kernel)


def _conv2d_fwd(x, kernel, stride, padding, chunk, copy_input, impl):
  return _conv2d_value(x, kernel, stride, padding, impl), (x, kernel)


def _conv2d_bwd(stride, padding, chunk, copy_input, impl, residuals, dy):
  x, kernel = residuals

  def xla_weight_grad(x, dy):
    x_read = _opaque_copy(x) if copy_input else x
    return weight_grad(x_read, dy, kernel.shape, stride, padding, chunk)

  kernel_grad = _on_cpu(
      impl == "kernel" and kernels.supports(x, kernel.shape, padding),
      lambda x, dy: kernels.conv_weight_grad(x, dy, kernel.shape, stride, padding),
      xla_weight_grad, x, dy)
  input_grad = _on_cpu(
      impl == "kernel" and _kernel_input_grad_applies(dy, kernel, stride, padding),
      lambda dy, k: _kernel_input_grad(dy, k, padding),
      lambda dy, k: _xla_input_grad(dy, k, x.shape, stride, padding), dy, kernel)
  return input_grad, kernel_grad


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


class Conv(nn.Module):
  """Bias-free NHWC convolution with PyTorch's symmetric padding (k // 2).

  The parameter is nn.Conv's: 'kernel', [k, k, in, out] (HWIO), same initialiser, same name,
  so checkpoints and conversion see the layout of flax.linen.Conv.
  """
  features: int
  kernel_size: int
  stride: int = 1
  copy_input: bool = True
  impl: str = "auto"   # kernels.CONV_IMPLS

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", conv_kernel_init, (k, k, x.shape[-1], self.features))
    pad = k // 2
    return conv2d(x, kernel.astype(x.dtype), self.stride, ((pad, pad), (pad, pad)),
                  WEIGHT_GRAD_CHUNK, self.copy_input,
                  kernels.resolve_conv_impl(self.impl))


def conv(features: int, kernel_size: int, stride: int = 1, name: Optional[str] = None,
         copy_input: bool = True, impl: str = "auto"):
  """Bias-free NHWC convolution with PyTorch's symmetric padding (k // 2)."""
  return Conv(features, kernel_size, stride, copy_input, impl, name=name)


class Dense(nn.Module):
  """nn.Linear with PyTorch's default init for both kernel and bias."""
  features: int

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    kernel = self.param("kernel", torch_linear_kernel_init, (fan_in, self.features))
    bound = 1.0 / jnp.sqrt(fan_in)
    bias = self.param("bias", lambda k, s: jax.random.uniform(k, s, jnp.float32, -bound, bound),
                      (self.features,))
    return x @ kernel + bias


class BatchNorm(nn.Module):
  """BatchNorm over all axes but the last, with PyTorch's semantics.

  Differs from flax.linen.BatchNorm where the reference differs: the running variance
  is updated with the *unbiased* batch variance (n / (n - 1)), as torch.nn.BatchNorm does.
  With `axis_name` set, statistics are averaged over that mapped axis (synchronised
  BatchNorm), so N devices with a global batch give the numbers of one device.
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
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      reduce_axes = tuple(range(x.ndim - 1))
      xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # >= float32 statistics
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
    return (x - mean.astype(x.dtype)) * inv.astype(x.dtype) + bias.astype(x.dtype)

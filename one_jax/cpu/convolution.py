"""The convolution of every model: lax.conv_general_dilated's value and gradients, computed
faster on the CPU.

The choice is made by the platform a computation is lowered for (lax.platform_dependent), not
by the process's default backend, so a step exported for 'cuda' or 'tpu' from a CPU host carries
the accelerator form: on GPU and TPU, and for data other than float32 (bfloat16 compute), the
convolution and its gradients are exactly lax.conv_general_dilated's and jax.grad's. In float32
on the CPU the custom VJP `_platform_conv2d` takes faster paths to the same numbers: the weight
gradient over 16-image slices through an opaque copy and, with the kernels
(one_jax/cpu/kernels.py), the forward and stride-1 input gradient too (benchmarks/NOTES.md,
entries 3, 4 and 10).
"""
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from one_jax.cpu import kernels

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _conv2d_forward(x, kernel, stride, padding, groups: int = 1):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                      dimension_numbers=_DIMENSION_NUMBERS,
                                      feature_group_count=groups)


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


def _weight_grad_conv(x, dy, kernel_shape, stride: int, padding):
  """d(conv(x, kernel))/d(kernel) applied to dy: the convolution jax.grad emits for it (the
  images contracted, dy the kernel, dilated by the stride), written in the NHWC / HWIO / NHWC
  layout with explicit transposes.

  Same numbers as jax.vjp's form. XLA:CPU runs a convolution on its library only in that
  layout. jax.vjp's form labels images as features and channels as the batch; XLA transposes
  that into the library's layout at the top level of a program but not inside a loop body (the
  lax.scan of several train steps per dispatch), where it compiles a plain loop nest 10-30x
  slower (jax-ml/jax#12868; benchmarks/NOTES.md entry 14).
  """
  kh, kw = kernel_shape[:2]
  (pt, _), (pl, _) = padding
  (h, w), (ho, wo) = x.shape[1:3], dy.shape[1:3]
  # As jax's _conv_general_vjp_rhs_padding: the forward's low padding, and the high padding
  # that makes the output kh x kw.
  pb = (ho - 1) * stride + kh - h - pt
  pr = (wo - 1) * stride + kw - w - pl
  grad = jax.lax.conv_general_dilated(
      jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(dy, (1, 2, 0, 3)), (1, 1),
      ((pt, pb), (pl, pr)), rhs_dilation=(stride, stride), dimension_numbers=_DIMENSION_NUMBERS)
  return jnp.transpose(grad, (1, 2, 0, 3))   # [Cin, kh, kw, Cout] -> HWIO


def weight_grad(x, dy, kernel_shape, stride: int, padding, chunk: Optional[int] = None):
  """d(conv(x, kernel))/d(kernel) applied to dy, summed over `chunk`-image slices of the batch.

  Each slice is XLA's own weight-gradient convolution (`_weight_grad_conv`), so chunk=None
  computes what jax.grad computes.
  """
  parts = _chunks(x.shape[0], chunk)
  xs = x.reshape((parts, -1) + x.shape[1:])
  dys = dy.reshape((parts, -1) + dy.shape[1:])
  total = None
  for i in range(parts):
    grad = _weight_grad_conv(xs[i], dys[i], kernel_shape, stride, padding)
    total = grad if total is None else total + grad
  return total


def _flipped_kernel(kernel):
  """The kernel of an input gradient: spatially flipped, input and output channels swapped
  (HWIO kept, so both the kernels and XLA's library take it)."""
  return jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))


def _xla_input_grad(dy, kernel, x_shape, stride, padding):
  """XLA's input gradient: the transpose of the forward convolution, a convolution of dy
  (dilated by the stride) with the flipped kernel, in/out swapped. Written in the NHWC / HWIO /
  NHWC layout: jax.vjp's form swaps the kernel's axes in the dimension numbers instead, which
  XLA:CPU compiles as a plain loop nest inside a loop body (see `_weight_grad_conv`)."""
  kh, kw = kernel.shape[:2]
  (pt, _), (pl, _) = padding
  (h, w), (ho, wo) = x_shape[1:3], dy.shape[1:3]
  flipped = _flipped_kernel(kernel)
  # As jax's _conv_general_vjp_lhs_padding.
  lo_h, lo_w = kh - 1 - pt, kw - 1 - pl
  hi_h = h + kh - 1 - ((ho - 1) * stride + 1) - lo_h
  hi_w = w + kw - 1 - ((wo - 1) * stride + 1) - lo_w
  return jax.lax.conv_general_dilated(dy, flipped, (1, 1), ((lo_h, hi_h), (lo_w, hi_w)),
                                      lhs_dilation=(stride, stride),
                                      dimension_numbers=_DIMENSION_NUMBERS)


def _kernel_input_grad(dy, kernel, padding):
  """The input gradient of a stride-1, symmetrically padded convolution as a forward
  convolution of dy with the flipped, in/out-swapped kernel (the kernels' scope)."""
  kh, kw = kernel.shape[:2]
  (pt, _), (pl, _) = padding
  flipped = _flipped_kernel(kernel)
  q_h, q_w = kh - 1 - pt, kw - 1 - pl
  return kernels.conv_forward(dy, flipped, 1, ((q_h, q_h), (q_w, q_w)))


def _kernel_input_grad_applies(dy, kernel, stride, padding) -> bool:
  kh, kw = kernel.shape[:2]
  (pt, pb), (pl, pr) = padding
  return (stride == 1 and pt == pb and pl == pr and pt <= kh - 1 and pl <= kw - 1
          and kernels.supports(dy, (kh, kw, kernel.shape[3], kernel.shape[2]), padding))


def _either(use_kernel: bool, kernel_fn, xla_fn, *args):
  return kernel_fn(*args) if use_kernel else xla_fn(*args)


def conv2d(x, kernel, stride: int, padding, chunk: Optional[int] = WEIGHT_GRAD_CHUNK,
           copy_input: bool = True, impl: str = "xla", groups: int = 1):
  """NHWC x HWIO convolution: lax.conv_general_dilated's value and gradients.

  The platform the computation is lowered for chooses (lax.platform_dependent, so a step
  exported for 'cuda' or 'tpu' from a CPU host gets the accelerator form): on GPU and TPU, and
  for data other than float32 everywhere, exactly lax.conv_general_dilated (with
  feature_group_count=groups) differentiated by JAX (its gradient taken with jax.vjp); in
  float32 on the CPU, the faster forms of the same numbers below (`_conv2d_value`,
  `_conv2d_bwd`), one per group: XLA:CPU's convolution library has no
  grouped convolution and compiles one as a plain loop nest, about 50x slower than the same
  work as `groups` ordinary convolutions (benchmarks/NOTES.md entry 14).
  """
  if x.dtype != jnp.float32:
    return _conv2d_forward(x, kernel, stride, padding, groups)
  return _platform_conv2d(x, kernel, stride, padding, chunk, copy_input, impl, groups)


def _split_groups(groups: int, *arrays):
  """[(each array's slice) of each group] along the channel axis (x's channels, the kernel's
  and dy's outputs): the CPU runs a grouped convolution as `groups` ordinary ones."""
  if groups == 1:
    return [arrays]
  return list(zip(*(jnp.split(a, groups, axis=-1) for a in arrays)))


def _join_groups(parts):
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


# The platform choice sits inside one custom VJP (its value, its forward and its backward each
# choose), not around a differentiated CPU custom VJP: differentiating through
# lax.platform_dependent linearises and transposes both platforms' branches of every
# convolution, which cost a ResNet-110 train step 2.3 s of its 7.7 s tracing
# (benchmarks/NOTES.md entry 19). Same programs once lowered for a platform.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7))
def _platform_conv2d(x, kernel, stride, padding, chunk, copy_input, impl, groups):
  def on_cpu(x, k):
    return _join_groups([_conv2d_value(xg, kg, stride, padding, impl)
                         for xg, kg in _split_groups(groups, x, k)])

  return jax.lax.platform_dependent(
      x, kernel, cpu=on_cpu,
      default=lambda x, k: _conv2d_forward(x, k, stride, padding, groups))


def _platform_conv2d_fwd(x, kernel, stride, padding, chunk, copy_input, impl, groups):
  return (_platform_conv2d(x, kernel, stride, padding, chunk, copy_input, impl, groups),
          (x, kernel))


def _platform_conv2d_bwd(stride, padding, chunk, copy_input, impl, groups, residuals, dy):
  def on_cpu(x, k, dy):
    grads = [_conv2d_bwd(stride, padding, chunk, copy_input, impl, (xg, kg), dyg)
             for xg, kg, dyg in _split_groups(groups, x, k, dy)]
    return tuple(_join_groups(parts) for parts in zip(*grads))

  def default(x, k, dy):
    _, vjp = jax.vjp(lambda x, k: _conv2d_forward(x, k, stride, padding, groups), x, k)
    return vjp(dy)

  return jax.lax.platform_dependent(*residuals, dy, cpu=on_cpu, default=default)


_platform_conv2d.defvjp(_platform_conv2d_fwd, _platform_conv2d_bwd)


# conv2d's forms for XLA:CPU (only lowered for the CPU; _platform_conv2d picks them).
#
# impl='kernel' (resolved by kernels.resolve_conv_impl): the compiled kernels of
# one_jax/cpu/csrc compute the output, the weight gradient and (stride 1) the input gradient,
# reading NHWC data in place (float32, output channels a multiple of 16); outside that scope,
# XLA's forms below. impl='xla':
# - forward and input gradient: XLA's (the input gradient is a convolution with the flipped
#   kernel);
# - weight gradient: `weight_grad` over `chunk`-image slices, reading x through
#   `_opaque_copy`: XLA lowers each slice with x transposed to [C, H, W, N], and without the
#   copy it fuses the producers of x into that transpose, recomputing residual chains with a
#   transpose's strided access pattern. `copy_input=False` skips the copy where x is one
#   element-wise fusion away from a library op (nothing long to recompute), e.g. the second
#   convolution of a residual block.


def _conv2d_value(x, kernel, stride, padding, impl):
  return _either(impl == "kernel" and kernels.supports(x, kernel.shape, padding),
                 lambda x, k: kernels.conv_forward(x, k, stride, padding),
                 lambda x, k: _conv2d_forward(x, k, stride, padding), x, kernel)


def _conv2d_bwd(stride, padding, chunk, copy_input, impl, residuals, dy):
  """(input gradient, kernel gradient) of one group's convolution on the CPU."""
  x, kernel = residuals

  def xla_weight_grad(x, dy):
    x_read = _opaque_copy(x) if copy_input else x
    return weight_grad(x_read, dy, kernel.shape, stride, padding, chunk)

  kernel_grad = _either(
      impl == "kernel" and kernels.supports(x, kernel.shape, padding),
      lambda x, dy: kernels.conv_weight_grad(x, dy, kernel.shape, stride, padding),
      xla_weight_grad, x, dy)
  input_grad = _either(
      impl == "kernel" and _kernel_input_grad_applies(dy, kernel, stride, padding),
      lambda dy, k: _kernel_input_grad(dy, k, padding),
      lambda dy, k: _xla_input_grad(dy, k, x.shape, stride, padding), dy, kernel)
  return input_grad, kernel_grad

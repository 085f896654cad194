"""Wide ResNet (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016), CIFAR form.

WRN-d-k: depth d = 6n + 4 (n pre-activation basic blocks per group), widths 16k, 32k, 64k
after a 3x3 stem of 16 channels; bias-free convolutions, a 1x1 projection (on the
pre-activated input) where a block changes width or stride; BN-ReLU, global pool and a linear
classifier at the end. No dropout (the paper's best CIFAR rows without it use none either).

ONE split: trunk = stem + groups 1 and 2; branch = group 3 + final BN-ReLU + classifier.
"""
import flax.linen as nn

from one_jax import validate
from one_jax.architectures import layers
from one_jax.architectures.layers import ModuleDef

OPTIONS = {"width": 10}


def blocks_per_group(depth) -> int:
  """n of a WRN depth 6n + 4, else a one-line error."""
  if not validate.is_int(depth) or depth < 10 or (depth - 4) % 6:
    raise ValueError(f"depth={depth!r} is not a Wide ResNet depth: use 6n+4 with n >= 1 "
                     "(10, 16, 22, 28, 40, ...)")
  return (depth - 4) // 6


def check(spec) -> None:
  blocks_per_group(spec.depth)
  validate.check_int("width", spec.width, minimum=1,
                          why="the widening factor k of WRN-d-k (e.g. --config.width=10)")


def args(spec):
  return {"depth": spec.depth, "width": spec.width}, {
      "depth": spec.depth, "width": spec.width, "num_classes": spec.num_classes}


class Block(nn.Module):
  """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus the shortcut."""
  planes: int
  stride: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    act = nn.relu(self.norm(name="bn1")(x))
    out = self.conv(self.planes, 3, self.stride, "conv1")(act)
    out = nn.relu(self.norm(name="bn2")(out))
    out = self.conv(self.planes, 3, 1, "conv2", copy_input=False)(out)
    if self.stride != 1 or x.shape[-1] != self.planes:
      x = self.conv(self.planes, 1, self.stride, "shortcut_conv")(act)
    return out + x


def _group(x, name, n, planes, stride, conv, norm):
  for i in range(n):
    x = Block(planes, stride if i == 0 else 1, conv, norm, name=f"{name}_{i}")(x)
  return x


class Trunk(nn.Module):
  """Stem + groups 1 and 2 (widths 16k, 32k)."""
  depth: int
  width: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    n = blocks_per_group(self.depth)
    x = self.conv(16, 3, 1, "conv1")(x)
    x = _group(x, "group1", n, 16 * self.width, 1, self.conv, self.norm)
    return _group(x, "group2", n, 32 * self.width, 2, self.conv, self.norm)


class Branch(nn.Module):
  """Group 3 (width 64k) + BN-ReLU + global average pool + classifier."""
  depth: int
  width: int
  num_classes: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    x = _group(x, "group3", blocks_per_group(self.depth), 64 * self.width, 2, self.conv,
               self.norm)
    return layers.pooled_classifier(nn.relu(self.norm(name="bn")(x)), self.num_classes)

"""ResNeXt (Xie et al., "Aggregated Residual Transformations for Deep Neural Networks", CVPR
2017), CIFAR form: ResNeXt-29 (8x64d, 16x64d) is a 3x3 stem of 64 channels and three stages
of n bottleneck blocks (depth 9n + 2) with outputs 256, 512, 1024 on 32x32, 16x16, 8x8 maps
(64 x width x 2^(stage-1): width 4, smaller for tests).

A block: conv1x1 to D = cardinality x group_width x 2^(stage-1) channels, a grouped 3x3
convolution (cardinality groups; the stride), conv1x1 to the output, each followed by
BatchNorm (ReLU but after the last, which adds the shortcut first); a 1x1 projection + BN
shortcut where the shape changes. Bias-free convolutions; global pool and a linear classifier.

ONE split: trunk = stem + stages 1 and 2; branch = stage 3 + classifier.
"""
import flax.linen as nn

from one_jax import validate
from one_jax.architectures import layers
from one_jax.architectures.layers import ModuleDef

OPTIONS = {"width": 4, "cardinality": 8, "group_width": 64}


def blocks_per_stage(depth) -> int:
  """n of a ResNeXt depth 9n + 2, else a one-line error."""
  if not validate.is_int(depth) or depth < 11 or (depth - 2) % 9:
    raise ValueError(f"depth={depth!r} is not a CIFAR ResNeXt depth: use 9n+2 with n >= 1 "
                     "(11, 20, 29, ...)")
  return (depth - 2) // 9


def check(spec) -> None:
  blocks_per_stage(spec.depth)
  validate.check_int("width", spec.width, minimum=1,
                          why="ResNeXt's widening: stage outputs 64 x width x 1, 2, 4 (4)")
  validate.check_int("cardinality", spec.cardinality, minimum=1,
                          why="the groups of the 3x3 convolutions (8x64d: --config.cardinality=8)")
  validate.check_int("group_width", spec.group_width, minimum=1,
                          why="the channels per group in stage 1 (8x64d: --config.group_width=64)")


def args(spec):
  trunk = {"depth": spec.depth, "width": spec.width, "cardinality": spec.cardinality,
           "group_width": spec.group_width}
  return trunk, dict(trunk, num_classes=spec.num_classes)


class Block(nn.Module):
  """The aggregated-transformation bottleneck (form (c): a grouped convolution)."""
  inner: int
  features: int
  stride: int
  cardinality: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    conv, norm = self.conv, self.norm
    out = nn.relu(norm(name="bn1")(conv(self.inner, 1, 1, "conv1")(x)))
    out = conv(self.inner, 3, self.stride, "conv2", copy_input=False, groups=self.cardinality)(out)
    out = nn.relu(norm(name="bn2")(out))
    out = norm(name="bn3")(conv(self.features, 1, 1, "conv3", copy_input=False)(out))
    if self.stride != 1 or x.shape[-1] != self.features:
      x = norm(name="downsample_bn")(conv(self.features, 1, self.stride, "downsample_conv")(x))
    return nn.relu(out + x)


def _stage(x, index, depth, width, cardinality, group_width, conv, norm):
  """Stage `index` (1-3): n blocks, inner width C x d x 2^(index-1), output 64 x width x
  2^(index-1)."""
  scale = 2 ** (index - 1)
  for i in range(blocks_per_stage(depth)):
    x = Block(cardinality * group_width * scale, 64 * width * scale,
              2 if i == 0 and index > 1 else 1,
              cardinality, conv, norm, name=f"layer{index}_{i}")(x)
  return x


class Trunk(nn.Module):
  """Stem (conv3x3 64, BN, ReLU) + stages 1 and 2."""
  depth: int
  width: int
  cardinality: int
  group_width: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    x = nn.relu(self.norm(name="bn1")(self.conv(64, 3, 1, "conv1")(x)))
    for index in (1, 2):
      x = _stage(x, index, self.depth, self.width, self.cardinality, self.group_width,
                 self.conv, self.norm)
    return x


class Branch(nn.Module):
  """Stage 3 + global average pool + classifier."""
  depth: int
  width: int
  cardinality: int
  group_width: int
  num_classes: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    x = _stage(x, 3, self.depth, self.width, self.cardinality, self.group_width, self.conv,
               self.norm)
    return layers.pooled_classifier(x, self.num_classes)

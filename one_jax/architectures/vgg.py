"""VGG with BatchNorm (Simonyan & Zisserman, ICLR 2015), in the CIFAR form of the
online-distillation papers (OKDDip, PCL): 3x3 convolutions with bias, each followed by
BatchNorm and ReLU, a 2x2 max-pool closing each of the five blocks, and one linear classifier
on the 512 channels left at 1x1 (32x32 input); no dropout, no 4096-wide layers.

depth picks the configuration (VGG-11/13/16/19, the paper's A, B, D, E); width is the channels
of block 1 (64; the blocks have 1, 2, 4, 8, 8 times as many), smaller for tests. ONE split: trunk =
blocks 1-4; branch = block 5 (three 512-channel convolutions for VGG-16, and its pool) + the
classifier.
"""
import flax.linen as nn

from one_jax import validate
from one_jax.architectures import layers
from one_jax.architectures.layers import ModuleDef

OPTIONS = {"width": 64}

# Convolutions per block (channels 64, 128, 256, 512, 512) of each depth.
CONFIGS = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
CHANNELS = (1, 2, 4, 8, 8)  # times width (64)


def check(spec) -> None:
  if spec.depth not in CONFIGS:
    raise ValueError(f"depth={spec.depth!r} is not a VGG depth: use one of "
                     f"{', '.join(map(str, CONFIGS))}")
  validate.check_int("width", spec.width, minimum=1,
                          why="the channels of VGG's block 1 (64, e.g. --config.width=64)")


def args(spec):
  return {"depth": spec.depth, "width": spec.width}, {
      "depth": spec.depth, "width": spec.width, "num_classes": spec.num_classes}


def _block(x, index, depth, width, conv, norm):
  """Block `index` (1-based): conv3x3(+bias)-BN-ReLU times its count, then a 2x2 max-pool."""
  for i in range(CONFIGS[depth][index - 1]):
    x = conv(width * CHANNELS[index - 1], 3, 1, f"block{index}_conv{i}", use_bias=True)(x)
    x = nn.relu(norm(name=f"block{index}_bn{i}")(x))
  # SAME: the VALID pool of even maps (32x32 input), and a 1x1 map for smaller test images.
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")


class Trunk(nn.Module):
  """Blocks 1-4."""
  depth: int
  width: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    for index in range(1, 5):
      x = _block(x, index, self.depth, self.width, self.conv, self.norm)
    return x


class Branch(nn.Module):
  """Block 5 + global average pool (over the 1x1 map of a 32x32 input) + classifier."""
  depth: int
  width: int
  num_classes: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    x = _block(x, 5, self.depth, self.width, self.conv, self.norm)
    return layers.pooled_classifier(x, self.num_classes)

"""The reference CIFAR ResNet (He et al. 2016, as the ONE code defines it) as a ONE family.

Depth 6n + 2: a 3x3 stem of 16 channels, three stages of n blocks (16, 32, 64 planes; stride
1, 2, 2), BasicBlocks below depth 44 and Bottlenecks (expansion 4) from 44 on, global average
pooling and a linear classifier.

ONE split: trunk = stem + stages 1 and 2 ('conv1', 'bn1', 'layer1_*', 'layer2_*'); branch =
stage 3 + classifier ('layer3_*', 'classifier').
"""
import flax.linen as nn

from one_jax import validate
from one_jax.architectures import layers, resnet_blocks
from one_jax.architectures.layers import ModuleDef

OPTIONS = {}   # depth and classes say everything


def check_depth(depth) -> int:
  """Returns n (blocks per stage) for a valid CIFAR ResNet depth 6n+2, else raises."""
  if not validate.is_int(depth) or depth < 8 or (depth - 2) % 6:
    raise ValueError(f"depth={depth!r} is not a CIFAR ResNet depth: use 6n+2 with n >= 1 "
                     "(8, 14, 20, 32, 44, 56, 110, ...)")
  return (depth - 2) // 6


def block_type(depth: int) -> str:
  """The reference's rule: Bottleneck blocks from depth 44 on, BasicBlock below."""
  return "bottleneck" if check_depth(depth) and depth >= 44 else "basic"


def check(spec) -> None:
  check_depth(spec.depth)


details = resnet_blocks.block_details(block_type)
args = resnet_blocks.depth_args


def _stage(x, name, depth, planes, stride, conv, norm):
  """One stage of the depth's n blocks."""
  return resnet_blocks.stage(x, name, block_type(depth), check_depth(depth), planes, stride,
                             conv, norm)


class Trunk(nn.Module):
  """Stem + stages 1 and 2: shared by every branch (and by the gate)."""
  depth: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    x = self.conv(16, 3, 1, "conv1")(x)
    x = nn.relu(self.norm(name="bn1")(x))
    x = _stage(x, "layer1", self.depth, 16, 1, self.conv, self.norm)
    return _stage(x, "layer2", self.depth, 32, 2, self.conv, self.norm)


class Branch(nn.Module):
  """One branch (one student): stage 3 + global average pool + classifier."""
  depth: int
  num_classes: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    x = _stage(x, "layer3", self.depth, 64, 2, self.conv, self.norm)
    return layers.pooled_classifier(x, self.num_classes)

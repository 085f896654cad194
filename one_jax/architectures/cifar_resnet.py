"""The CIFAR ResNet (He et al. 2016) as a ONE family, under either depth rule its users meet.

A 3x3 stem of 16 channels, three stages of n blocks (16, 32, 64 planes; stride 1, 2, 2),
BasicBlocks below depth 44 and Bottlenecks (expansion 4) from 44 on, global average pooling and
a linear classifier. How the depth gives n is the option `depth_rule`:
  'one'    the ONE reference code's: depth 6n+2 for both block types, so its "ResNet-110" has
           18 Bottlenecks a stage (164 weighted layers, 1,704,154 parameters at 10 classes);
  'peers'  the rule of the codes that compare against ONE (OKDDip, MCL-OKD, the PCL
           reproduction; bearpaw's pytorch-classification ResNet): 6n+2 for BasicBlocks, 9n+2
           for Bottlenecks (the depth counts the weighted layers), so "ResNet-110" has 12
           Bottlenecks a stage (1,147,738 parameters): the same network as 'one' at depth 74.
Below depth 44 the rules agree (ResNet-20, -32 are the same networks).

ONE split: trunk = stem + stages 1 and 2 ('conv1', 'bn1', 'layer1_*', 'layer2_*'); branch =
stage 3 + classifier ('layer3_*', 'classifier').
"""
import flax.linen as nn

from one_jax import validate
from one_jax.architectures import layers, resnet_blocks
from one_jax.architectures.layers import ModuleDef

DEPTH_RULES = ("one", "peers")
OPTIONS = {"depth_rule": "one"}


def check_depth(depth, rule: str = "one") -> int:
  """Returns n (blocks per stage) of a valid depth under the rule, else a one-line error."""
  if rule not in DEPTH_RULES:
    raise ValueError(f"depth_rule={rule!r} is unknown: use 'one' (the ONE code's 6n+2) or "
                     "'peers' (6n+2 basic, 9n+2 bottleneck, as OKDDip and PCL count)")
  if not validate.is_int(depth) or depth < 8 or (depth - 2) % 6 and (
      rule == "one" or depth < 44):
    raise ValueError(f"depth={depth!r} is not a CIFAR ResNet depth: use 6n+2 with n >= 1 "
                     "(8, 14, 20, 32, 44, 56, 110, ...)"
                     + (", or 9n+2 from 47 on with depth_rule='peers'" if rule == "peers" else ""))
  if rule == "peers" and depth >= 44:
    if (depth - 2) % 9:
      raise ValueError(f"depth={depth!r} is not a bottleneck depth under depth_rule='peers': "
                       "use 9n+2 (47, 56, 65, ..., 110, 164), or depth_rule='one' for 6n+2")
    return (depth - 2) // 9
  return (depth - 2) // 6


def block_type(depth: int) -> str:
  """Both rules': Bottleneck blocks from depth 44 on, BasicBlock below."""
  return "bottleneck" if depth >= 44 else "basic"


def check(spec) -> None:
  check_depth(spec.depth, spec.depth_rule)


details = resnet_blocks.block_details(block_type)


def args(spec):
  """(trunk, branch) keyword arguments: the depth, its rule, the classifier's classes."""
  trunk, branch = resnet_blocks.depth_args(spec)
  return dict(trunk, depth_rule=spec.depth_rule), dict(branch, depth_rule=spec.depth_rule)


def _stage(x, name, depth, rule, planes, stride, conv, norm):
  """One stage of the depth's n blocks."""
  return resnet_blocks.stage(x, name, block_type(depth), check_depth(depth, rule), planes,
                             stride, conv, norm)


class Trunk(nn.Module):
  """Stem + stages 1 and 2: shared by every branch (and by the gate)."""
  depth: int
  conv: ModuleDef
  norm: ModuleDef
  depth_rule: str = "one"

  @nn.compact
  def __call__(self, x):
    x = self.conv(16, 3, 1, "conv1")(x)
    x = nn.relu(self.norm(name="bn1")(x))
    x = _stage(x, "layer1", self.depth, self.depth_rule, 16, 1, self.conv, self.norm)
    return _stage(x, "layer2", self.depth, self.depth_rule, 32, 2, self.conv, self.norm)


class Branch(nn.Module):
  """One branch (one student): stage 3 + global average pool + classifier."""
  depth: int
  num_classes: int
  conv: ModuleDef
  norm: ModuleDef
  depth_rule: str = "one"

  @nn.compact
  def __call__(self, x):
    x = _stage(x, "layer3", self.depth, self.depth_rule, 64, 2, self.conv, self.norm)
    return layers.pooled_classifier(x, self.num_classes)

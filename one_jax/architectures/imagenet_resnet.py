"""ImageNet ResNets (torchvision's ResNet-18/34/50/101/152) as a ONE family (DESIGN.md 2).

The definitions are torchvision's: a 7x7 stride-2 stem with 64 channels, BatchNorm, ReLU and
a 3x3 stride-2 max pool; four stages of 64, 128, 256 and 512 planes (stride 1, 2, 2, 2) of
BasicBlocks (18, 34) or Bottlenecks with the stride on the 3x3 convolution (ResNet v1.5: 50,
101, 152), a projection shortcut where the shape changes; global average pooling and a dense
classifier. Depth 10 ([1, 1, 1, 1] BasicBlocks) is the small member used by smoke runs. The
blocks are resnet_blocks.BasicBlock / Bottleneck, so the parameter names are those of every
one_jax ResNet.

The trunk is the stem and stages 1-3 ('conv1', 'bn1', 'layer1_0', ..., 'layer3_{n-1}'); a
branch is stage 4 and the classifier ('layer4_0', ..., 'classifier'), so B branches cost B
copies of the last stage (76% of ResNet-18's parameters, 67% of ResNet-50's).
"""
from typing import Tuple

import flax.linen as nn

from one_jax import validate
from one_jax.architectures import layers, resnet_blocks
from one_jax.architectures.layers import ModuleDef

# depth -> (block type, blocks per stage), torchvision's table (and ResNet-10 for smoke runs).
STAGES = {10: ("basic", (1, 1, 1, 1)), 18: ("basic", (2, 2, 2, 2)),
          34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
          101: ("bottleneck", (3, 4, 23, 3)), 152: ("bottleneck", (3, 8, 36, 3))}
PLANES = (64, 128, 256, 512)
STEM_CHANNELS = 64
OPTIONS = {}   # depth and classes say everything (torchvision's widths are fixed)


def check_depth(depth) -> Tuple[str, Tuple[int, ...]]:
  """(block type, blocks per stage) of an ImageNet ResNet depth, else a one-line ValueError."""
  if not validate.is_int(depth) or depth not in STAGES:
    raise ValueError(f"depth={depth!r} is not an ImageNet ResNet depth: use one of "
                     f"{', '.join(map(str, STAGES))}")
  return STAGES[depth]


def block_type(depth: int) -> str:
  return check_depth(depth)[0]


def check(spec) -> None:
  check_depth(spec.depth)


details = resnet_blocks.block_details(block_type)
args = resnet_blocks.depth_args


def _stage(x, index: int, depth: int, conv, norm):
  """Stage `index` (1-4) of blocks named 'layer{index}_{i}', torchvision's _make_layer."""
  kind, counts = check_depth(depth)
  return resnet_blocks.stage(x, f"layer{index}", kind, counts[index - 1], PLANES[index - 1],
                             1 if index == 1 else 2, conv, norm)


class Trunk(nn.Module):
  """Stem (7x7 stride-2 convolution, BatchNorm, ReLU, 3x3 stride-2 max pool) + stages 1-3."""
  depth: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    x = self.conv(STEM_CHANNELS, 7, 2, "conv1")(x)
    x = nn.relu(self.norm(name="bn1")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for index in (1, 2, 3):
      x = _stage(x, index, self.depth, self.conv, self.norm)
    return x


class Branch(nn.Module):
  """One branch: stage 4, global average pool, classifier."""
  depth: int
  num_classes: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    x = _stage(x, 4, self.depth, self.conv, self.norm)
    return layers.pooled_classifier(x, self.num_classes)


def torchvision_num_params(depth: int, num_classes: int = 1000) -> int:
  """The parameter count of torchvision's resnet{depth} (weights, biases and BatchNorm
  affine parameters; running statistics are buffers), from its definition."""
  kind, counts = check_depth(depth)
  expansion = 4 if kind == "bottleneck" else 1
  bn = lambda c: 2 * c  # noqa: E731
  total = 7 * 7 * 3 * STEM_CHANNELS + bn(STEM_CHANNELS)
  in_ch = STEM_CHANNELS
  for index, (planes, blocks) in enumerate(zip(PLANES, counts)):
    for i in range(blocks):
      stride = 2 if index and not i else 1
      if kind == "basic":
        total += 9 * in_ch * planes + bn(planes) + 9 * planes * planes + bn(planes)
      else:
        total += (in_ch * planes + bn(planes) + 9 * planes * planes + bn(planes)
                  + planes * planes * 4 + bn(planes * 4))
      if stride != 1 or in_ch != planes * expansion:
        total += in_ch * planes * expansion + bn(planes * expansion)
      in_ch = planes * expansion
  return total + in_ch * num_classes + num_classes


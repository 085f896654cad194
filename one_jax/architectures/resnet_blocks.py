"""The residual blocks of every ResNet here: the CIFAR ResNets and torchvision's ImageNet ones.

One definition, so both families name their parameters the same way ('conv1', 'bn1', ...,
'downsample_conv', 'downsample_bn') and the converter reads both with one table.
"""
from typing import Any, Callable, Dict, Tuple

import flax.linen as nn

from one_jax.architectures.layers import ModuleDef


class _Block(nn.Module):
  """What both residual blocks share: their fields and the projection shortcut."""
  planes: int
  stride: int
  downsample: bool
  conv: ModuleDef
  norm: ModuleDef
  expansion = 1

  def shortcut(self, x):
    """x, or its 1x1 strided projection to the block's output channels."""
    if not self.downsample:
      return x
    features = self.planes * self.expansion
    return self.norm(name="downsample_bn")(
        self.conv(features, 1, self.stride, "downsample_conv")(x))


class BasicBlock(_Block):
  expansion = 1

  @nn.compact
  def __call__(self, x):
    conv, norm = self.conv, self.norm
    out = nn.relu(norm(name="bn1")(conv(self.planes, 3, self.stride, "conv1")(x)))
    # conv2 reads one fusion (relu(bn(conv1))), not the residual stream: no copy needed.
    out = norm(name="bn2")(conv(self.planes, 3, 1, "conv2", copy_input=False)(out))
    return nn.relu(out + self.shortcut(x))


class Bottleneck(_Block):
  expansion = 4

  @nn.compact
  def __call__(self, x):
    conv, norm = self.conv, self.norm
    out = nn.relu(norm(name="bn1")(conv(self.planes, 1, 1, "conv1")(x)))
    # conv2 and conv3 read one fusion each, not the residual stream: no copy needed.
    out = nn.relu(norm(name="bn2")(conv(self.planes, 3, self.stride, "conv2",
                                        copy_input=False)(out)))
    out = norm(name="bn3")(conv(self.planes * 4, 1, 1, "conv3", copy_input=False)(out))
    return nn.relu(out + self.shortcut(x))


def stage(x, name: str, block_kind: str, num_blocks: int, planes: int, stride: int, conv, norm):
  """One stage of num_blocks blocks ('basic' or 'bottleneck') named '{name}_{i}', as the
  reference's and torchvision's Sequential: the first block takes the stride and, where the
  shape changes, the projection shortcut."""
  block = Bottleneck if block_kind == "bottleneck" else BasicBlock
  for i in range(num_blocks):
    s = stride if i == 0 else 1
    down = i == 0 and (s != 1 or x.shape[-1] != planes * block.expansion)
    x = block(planes, s, down, conv, norm, name=f"{name}_{i}")(x)
  return x


def depth_args(spec) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """(trunk, branch) keyword arguments of a ResNet family (model_spec.family): the depth, and
  the class count for the branch's classifier."""
  return {"depth": spec.depth}, {"depth": spec.depth, "num_classes": spec.num_classes}


def block_details(block_type: Callable[[int], str]):
  """The registry's details function of a ResNet family: the block type its depth implies,
  which checkpoint meta records (and ModelSpec.from_dict checks)."""
  return lambda spec: {"block": block_type(spec.depth)}

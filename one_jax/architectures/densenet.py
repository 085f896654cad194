"""DenseNet (Huang et al., "Densely Connected Convolutional Networks", CVPR 2017), CIFAR form.

Three dense blocks on 32x32, 16x16 and 8x8 maps, each layer adding growth_rate (k) channels
to the concatenation of everything before it; bias-free convolutions, BN-ReLU before each.
- bottleneck=True, DenseNet-BC: each layer is BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k),
  depth L = 6n + 4 (n layers per block), a 3x3 stem of 2k channels and transitions
  (BN-ReLU-conv1x1-avgpool2x2) that halve the channels (compression 0.5): BC-100-12, BC-190-40.
- bottleneck=False, the original DenseNet: each layer is BN-ReLU-conv3x3(k), L = 3n + 4, a stem
  of 16 channels and transitions keeping the channels: DenseNet-40-12 (OKDDip, PCL).
A final BN-ReLU, global average pool and linear classifier close the network (no dropout).

ONE split: trunk = stem + blocks 1 and 2 with their transitions; branch = block 3 + final
BN-ReLU + classifier.
"""
import flax.linen as nn
import jax.numpy as jnp

from one_jax import validate
from one_jax.architectures import layers
from one_jax.architectures.layers import ModuleDef

OPTIONS = {"growth_rate": 12, "bottleneck": True}


def layers_per_block(depth, bottleneck: bool) -> int:
  """n of a DenseNet-BC depth 6n + 4 (or a DenseNet depth 3n + 4), else a one-line error."""
  per = 6 if bottleneck else 3
  if not validate.is_int(depth) or depth < per + 4 or (depth - 4) % per:
    examples = "40, 100, 190" if bottleneck else "40, 100"
    raise ValueError(f"depth={depth!r} is not a {'DenseNet-BC' if bottleneck else 'DenseNet'} "
                     f"depth: use {per}n+4 with n >= 1 (e.g. {examples})")
  return (depth - 4) // per


def check(spec) -> None:
  if not isinstance(spec.bottleneck, bool):
    raise ValueError(f"bottleneck={spec.bottleneck!r} is invalid: True (DenseNet-BC) or False")
  validate.check_int("growth_rate", spec.growth_rate, minimum=1,
                          why="k, the channels each layer adds (e.g. --config.growth_rate=12)")
  layers_per_block(spec.depth, spec.bottleneck)


def args(spec):
  trunk = {"depth": spec.depth, "growth_rate": spec.growth_rate, "bottleneck": spec.bottleneck}
  return trunk, dict(trunk, num_classes=spec.num_classes)


def _dense_block(x, index, depth, k, bottleneck, conv, norm):
  """Dense block `index`: its layers, each concatenating k new channels onto x.

  Every convolution reads the block's concatenation through one BN-ReLU, nothing long to
  recompute, so none copies its input for the weight gradient (copy_input=False: 20-30% less
  time per block on the CPU, bit-identical gradients).
  """
  for i in range(layers_per_block(depth, bottleneck)):
    name = f"block{index}_layer{i}"
    y = nn.relu(norm(name=f"{name}_bn1")(x))
    if bottleneck:
      y = conv(4 * k, 1, 1, f"{name}_conv1", copy_input=False)(y)
      y = nn.relu(norm(name=f"{name}_bn2")(y))
    y = conv(k, 3, 1, f"{name}_conv{2 if bottleneck else 1}", copy_input=False)(y)
    x = jnp.concatenate([x, y], axis=-1)
  return x


def _transition(x, index, bottleneck, conv, norm):
  """BN-ReLU-conv1x1 (half the channels for BC) and a 2x2 average pool."""
  features = x.shape[-1] // 2 if bottleneck else x.shape[-1]
  x = nn.relu(norm(name=f"trans{index}_bn")(x))
  x = conv(features, 1, 1, f"trans{index}_conv", copy_input=False)(x)
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Trunk(nn.Module):
  """Stem, dense block 1, transition 1, dense block 2, transition 2."""
  depth: int
  growth_rate: int
  bottleneck: bool
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    k, bc = self.growth_rate, self.bottleneck
    x = self.conv(2 * k if bc else 16, 3, 1, "conv1")(x)
    for index in (1, 2):
      x = _dense_block(x, index, self.depth, k, bc, self.conv, self.norm)
      x = _transition(x, index, bc, self.conv, self.norm)
    return x


class Branch(nn.Module):
  """Dense block 3 + BN-ReLU + global average pool + classifier."""
  depth: int
  growth_rate: int
  bottleneck: bool
  num_classes: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    x = _dense_block(x, 3, self.depth, self.growth_rate, self.bottleneck, self.conv, self.norm)
    return layers.pooled_classifier(nn.relu(self.norm(name="bn")(x)), self.num_classes)

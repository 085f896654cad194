"""CIFAR ResNet and ONE ResNet (DESIGN.md section 2).

Parameter tree (the contract that checkpoints, surgery and conversion rely on):

  CifarResNet:  {'trunk': T, 'branch': Br}
  OneResNet:    {'trunk': T, 'branches': Br stacked on a leading axis of size B, 'gate': G}

T holds the stem ('conv1', 'bn1') and stages 1-2 ('layer1_0', ..., 'layer2_{n-1}'); Br holds
stage 3 ('layer3_0', ...) and the 'classifier'; G holds 'dense' and 'bn'. A baseline's
'branch' is exactly one slice of a ONE model's 'branches', so surgery is slicing and
concatenating on axis 0. The gate's non-trainable log-weight offset lives in the
'gate_offset' collection (not in 'params'), shape [B].
"""
import functools
from typing import Optional, Sequence, Tuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from one_jax import config_checks
from one_jax import kernels
from one_jax import layers

BRANCH_IMPLS = ("auto", "loop", "vmap")


def check_depth(depth) -> int:
  """Returns n (blocks per stage) for a valid CIFAR ResNet depth 6n+2, else raises."""
  if not config_checks.is_int(depth) or depth < 8 or (depth - 2) % 6:
    raise ValueError(f"depth={depth!r} is not a CIFAR ResNet depth: use 6n+2 with n >= 1 "
                     "(8, 14, 20, 32, 44, 56, 110, ...)")
  return (depth - 2) // 6


def block_type(depth: int) -> str:
  """The reference's rule: Bottleneck blocks from depth 44 on, BasicBlock below."""
  return "bottleneck" if check_depth(depth) and depth >= 44 else "basic"


class BasicBlock(nn.Module):
  planes: int
  stride: int
  downsample: bool
  train: bool
  axis_name: Optional[str] = None
  conv_impl: str = "auto"
  expansion = 1

  @nn.compact
  def __call__(self, x):
    bn = functools.partial(layers.BatchNorm, use_running_average=not self.train,
                           axis_name=self.axis_name)
    conv = functools.partial(layers.conv, impl=self.conv_impl)
    out = nn.relu(bn(name="bn1")(conv(self.planes, 3, self.stride, "conv1")(x)))
    # conv2 reads one fusion (relu(bn(conv1))), not the residual stream: no copy needed.
    out = bn(name="bn2")(conv(self.planes, 3, 1, "conv2", copy_input=False)(out))
    if self.downsample:
      x = bn(name="downsample_bn")(conv(self.planes, 1, self.stride, "downsample_conv")(x))
    return nn.relu(out + x)


class Bottleneck(nn.Module):
  planes: int
  stride: int
  downsample: bool
  train: bool
  axis_name: Optional[str] = None
  conv_impl: str = "auto"
  expansion = 4

  @nn.compact
  def __call__(self, x):
    bn = functools.partial(layers.BatchNorm, use_running_average=not self.train,
                           axis_name=self.axis_name)
    conv = functools.partial(layers.conv, impl=self.conv_impl)
    out = nn.relu(bn(name="bn1")(conv(self.planes, 1, 1, "conv1")(x)))
    # conv2 and conv3 read one fusion each, not the residual stream: no copy needed.
    out = nn.relu(bn(name="bn2")(conv(self.planes, 3, self.stride, "conv2",
                                      copy_input=False)(out)))
    out = bn(name="bn3")(conv(self.planes * 4, 1, 1, "conv3", copy_input=False)(out))
    if self.downsample:
      x = bn(name="downsample_bn")(conv(self.planes * 4, 1, self.stride, "downsample_conv")(x))
    return nn.relu(out + x)


def _stage(x, name, depth, planes, stride, train, axis_name, conv_impl):
  """One ResNet stage of n blocks, named '{name}_{i}' like the reference's Sequential."""
  n = check_depth(depth)
  block = Bottleneck if block_type(depth) == "bottleneck" else BasicBlock
  for i in range(n):
    in_ch = x.shape[-1]
    s = stride if i == 0 else 1
    down = i == 0 and (s != 1 or in_ch != planes * block.expansion)
    x = block(planes, s, down, train, axis_name, conv_impl, name=f"{name}_{i}")(x)
  return x


class Trunk(nn.Module):
  """Stem + stages 1 and 2: shared by every branch (and by the gate)."""
  depth: int
  train: bool = False
  axis_name: Optional[str] = None
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    x = layers.conv(16, 3, 1, "conv1", impl=self.conv_impl)(x)
    x = nn.relu(layers.BatchNorm(not self.train, self.axis_name, name="bn1")(x))
    x = _stage(x, "layer1", self.depth, 16, 1, self.train, self.axis_name, self.conv_impl)
    return _stage(x, "layer2", self.depth, 32, 2, self.train, self.axis_name, self.conv_impl)


def _branch_logits(x, depth, num_classes, train, axis_name, conv_impl):
  """Stage 3 + global average pool + classifier, created in the calling module's scope."""
  x = _stage(x, "layer3", depth, 64, 2, train, axis_name, conv_impl)
  x = jnp.mean(x, axis=(1, 2))
  return layers.Dense(num_classes, name="classifier")(x)


class Branch(nn.Module):
  """One branch (one student): stage 3 + global average pool + classifier."""
  depth: int
  num_classes: int
  train: bool = False
  axis_name: Optional[str] = None
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    return _branch_logits(x, self.depth, self.num_classes, self.train, self.axis_name,
                          self.conv_impl)


class _ScanBranch(Branch):
  """Branch as a scan body: the trunk output is the (unchanged) carry."""

  @nn.compact
  def __call__(self, x):
    return x, _branch_logits(x, self.depth, self.num_classes, self.train, self.axis_name,
                             self.conv_impl)


class Gate(nn.Module):
  """Global mean pool -> Dense(B) -> BatchNorm -> ReLU -> (+ offset) -> softmax over B.

  The offset is a per-branch log-weight (OneResNet keeps it in the non-trainable
  'gate_offset' collection); inactive branches (mask False) get weight exactly 0.
  """
  num_branches: int
  train: bool = False
  axis_name: Optional[str] = None
  active_branches: Optional[Tuple[bool, ...]] = None

  @nn.compact
  def __call__(self, x, log_weight_offset):
    x = jnp.mean(x, axis=(1, 2))
    x = layers.Dense(self.num_branches, name="dense")(x)
    x = nn.relu(layers.BatchNorm(not self.train, self.axis_name, name="bn")(x))
    x = x + log_weight_offset
    if self.active_branches is not None:
      x = jnp.where(jnp.asarray(self.active_branches), x, -jnp.inf)
    return jax.nn.softmax(x, axis=-1)


def stacked_branches(depth, num_classes, num_branches, impl, train, axis_name, name,
                     conv_impl="auto"):
  """B branches with parameters stacked on axis 0, computed by an unrolled loop or by vmap.

  Both read and write the same layout (the one nn.vmap with variable_axes={'params': 0,
  'batch_stats': 0} produces) and give the same numbers; returns a function x -> [B, N, C].
  """
  if impl == "vmap":
    vmapped = nn.vmap(Branch, variable_axes={"params": 0, "batch_stats": 0},
                      split_rngs={"params": True}, in_axes=None, out_axes=0,
                      axis_size=num_branches)
    return vmapped(depth, num_classes, train, axis_name, conv_impl, name=name)
  # A fully unrolled scan: B separate (un-batched) branch computations on slices of the
  # stacked variables; XLA's CPU backend runs these much faster than vmapped convolutions.
  # unroll=0 unrolls every length; unroll=B would leave B = 1 as a one-trip while loop, whose
  # backward convolutions XLA:CPU then runs in a naive, ~50x slower form (benchmarks/NOTES.md).
  looped = nn.scan(_ScanBranch, variable_axes={"params": 0, "batch_stats": 0},
                   split_rngs={"params": True}, in_axes=(), length=num_branches,
                   unroll=0)(depth, num_classes, train, axis_name, conv_impl, name=name)
  return lambda x: looped(x)[1]


@flax.struct.dataclass
class OneOutput:
  branch_logits: jax.Array    # [B, N, C]
  gate: jax.Array             # [N, B]
  ensemble_logits: jax.Array  # [N, C]


def resolve_branch_impl(impl: str) -> str:
  """'auto' picks the faster implementation for the default backend.

  Measured on CPU (DESIGN.md section 2): the unrolled loop is 3.4-6x faster than vmapped
  convolutions. On accelerators vmap lowers to grouped convolutions, one kernel for all B.
  """
  if impl not in BRANCH_IMPLS:
    raise ValueError(f"branch_impl={impl!r} is unknown: use one of {', '.join(BRANCH_IMPLS)}")
  if impl == "auto":
    return "loop" if jax.default_backend() == "cpu" else "vmap"
  return impl


class CifarResNet(nn.Module):
  """The reference CIFAR ResNet (the baseline); apply -> logits [N, C]."""
  depth: int = 32
  num_classes: int = 10
  axis_name: Optional[str] = None
  conv_impl: str = "auto"   # layers.conv2d: 'auto' | 'kernel' | 'xla' (kernels.py)

  def __post_init__(self):
    check_depth(self.depth)
    config_checks.check_int("num_classes", self.num_classes, minimum=1)
    kernels.resolve_conv_impl(self.conv_impl)
    super().__post_init__()

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = Trunk(self.depth, train, self.axis_name, self.conv_impl, name="trunk")(images)
    return Branch(self.depth, self.num_classes, train, self.axis_name, self.conv_impl,
                  name="branch")(x)


class OneResNet(nn.Module):
  """ONE ResNet: shared trunk, B stacked branches, a gate, and the gated ensemble."""
  depth: int = 32
  num_branches: int = 3
  num_classes: int = 100
  branch_impl: str = "auto"
  active_branches: Optional[Sequence[bool]] = None
  axis_name: Optional[str] = None
  conv_impl: str = "auto"   # layers.conv2d: 'auto' | 'kernel' | 'xla' (kernels.py)

  def __post_init__(self):
    check_depth(self.depth)
    config_checks.check_int("num_branches", self.num_branches, minimum=1)
    config_checks.check_int("num_classes", self.num_classes, minimum=1)
    resolve_branch_impl(self.branch_impl)
    kernels.resolve_conv_impl(self.conv_impl)
    if self.active_branches is not None:
      object.__setattr__(self, "active_branches", tuple(bool(a) for a in self.active_branches))
      if len(self.active_branches) != self.num_branches or not any(self.active_branches):
        raise ValueError(f"active_branches={self.active_branches} must have one entry per "
                         f"branch ({self.num_branches}) with at least one True")
    super().__post_init__()

  @nn.compact
  def __call__(self, images, train: bool = False) -> OneOutput:
    x = Trunk(self.depth, train, self.axis_name, self.conv_impl, name="trunk")(images)
    branch_logits = stacked_branches(
        self.depth, self.num_classes, self.num_branches, resolve_branch_impl(self.branch_impl),
        train, self.axis_name, name="branches", conv_impl=self.conv_impl)(x)
    offset = self.variable("gate_offset", "log_weight",
                           lambda: jnp.zeros((self.num_branches,), jnp.float32))
    gate = Gate(self.num_branches, train, self.axis_name, self.active_branches,
                name="gate")(x, offset.value)
    ensemble = jnp.einsum("nb,bnc->nc", gate, branch_logits)
    return OneOutput(branch_logits=branch_logits, gate=gate, ensemble_logits=ensemble)


def count_params(tree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))

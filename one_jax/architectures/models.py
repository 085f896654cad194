"""CIFAR ResNet and ONE ResNet, and the ONE forward pass of any family (DESIGN.md section 2).

Parameter tree (the contract that checkpoints, surgery and conversion rely on):

  CifarResNet:  {'trunk': T, 'branch': Br}
  OneResNet:    {'trunk': T, 'branches': Br stacked on a leading axis of size B, 'gate': G}

T holds the stem ('conv1', 'bn1') and stages 1-2 ('layer1_0', ..., 'layer2_{n-1}'); Br holds
stage 3 ('layer3_0', ...) and the 'classifier'; G holds 'dense' and 'bn'. A baseline's
'branch' is exactly one slice of a ONE model's 'branches', so surgery is slicing and
concatenating on axis 0. The gate's non-trainable log-weight offset lives in the
'gate_offset' collection (not in 'params'), shape [B]. Every family (one_jax/architectures)
has this tree: OneModel and Baseline run `one_forward` / `baseline_forward`, as OneResNet and
CifarResNet do, on the family's own trunk and branch modules.
"""
import functools
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from one_jax import validate
from one_jax.architectures import layers
from one_jax.cpu import kernels

BRANCH_IMPLS = ("auto", "loop", "vmap")
COMPUTE_DTYPES = ("float32", "bfloat16")


def check_depth(depth) -> int:
  """Returns n (blocks per stage) for a valid CIFAR ResNet depth 6n+2, else raises."""
  if not validate.is_int(depth) or depth < 8 or (depth - 2) % 6:
    raise ValueError(f"depth={depth!r} is not a CIFAR ResNet depth: use 6n+2 with n >= 1 "
                     "(8, 14, 20, 32, 44, 56, 110, ...)")
  return (depth - 2) // 6


def block_type(depth: int) -> str:
  """The reference's rule: Bottleneck blocks from depth 44 on, BasicBlock below."""
  return "bottleneck" if check_depth(depth) and depth >= 44 else "basic"


def resolve_compute_dtype(name: str, conv_impl: str = "auto") -> jnp.dtype:
  """The dtype convolutions, dense layers and activations compute in (mixed precision).

  Parameters, optimizer state, BatchNorm statistics, logits and losses stay float32 whatever
  it is. one_jax's compiled CPU kernels are float32 only: in bfloat16 the CPU runs XLA's
  convolutions, so conv_impl='kernel' with bfloat16 is an error.
  """
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype={name!r} is unknown: use one of {', '.join(COMPUTE_DTYPES)}")
  if name != "float32" and conv_impl == "kernel":
    raise ValueError(f"conv_impl='kernel' computes in float32 only, not compute_dtype={name!r}: "
                     "use conv_impl='auto' (XLA's convolutions in that dtype) or "
                     "compute_dtype='float32'")
  return jnp.dtype(name)


def _in_compute_dtype(images, compute_dtype: str):
  """The images in the compute dtype, which every layer then follows; 'float32' leaves them
  as they are (float64 in the float64 parity tests)."""
  if compute_dtype == "float32":
    return images
  return images.astype(resolve_compute_dtype(compute_dtype))


ModuleDef = Any  # a module constructor: a Flax module class, or a partial of one


def conv_and_norm(train: bool = False, axis_name: Optional[str] = None,
                  conv_impl: str = "auto") -> Tuple[ModuleDef, ModuleDef]:
  """The convolution and the normalisation of every layer, chosen here once per model call.

  conv(features, kernel_size, stride, name, copy_input=True) runs on the backend of conv_impl
  (layers.conv: 'auto' | 'kernel' | 'xla'); norm(name=...) is BatchNorm in training or eval
  mode, synchronised over axis_name when set. Blocks receive both, as in flax's
  examples/imagenet ResNet, instead of each threading (train, axis_name, conv_impl).
  """
  conv = functools.partial(layers.conv, impl=conv_impl)
  norm = functools.partial(layers.BatchNorm, use_running_average=not train, axis_name=axis_name)
  return conv, norm


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


def _stage(x, name, depth, planes, stride, conv, norm):
  """One ResNet stage of n blocks, named '{name}_{i}' like the reference's Sequential."""
  n = check_depth(depth)
  block = Bottleneck if block_type(depth) == "bottleneck" else BasicBlock
  for i in range(n):
    in_ch = x.shape[-1]
    s = stride if i == 0 else 1
    down = i == 0 and (s != 1 or in_ch != planes * block.expansion)
    x = block(planes, s, down, conv, norm, name=f"{name}_{i}")(x)
  return x


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


class Gate(nn.Module):
  """Global mean pool -> Dense(B) -> BatchNorm -> ReLU -> (+ offset) -> softmax over B.

  The offset is a per-branch log-weight (OneResNet keeps it in the non-trainable
  'gate_offset' collection); inactive branches (mask False) get weight exactly 0.
  """
  num_branches: int
  norm: ModuleDef
  active_branches: Optional[Tuple[bool, ...]] = None

  @nn.compact
  def __call__(self, x, log_weight_offset):
    x = jnp.mean(x, axis=(1, 2))
    x = layers.Dense(self.num_branches, name="dense")(x)
    x = layers.at_least_float32(nn.relu(self.norm(name="bn")(x)))  # the softmax in float32
    x = x + log_weight_offset
    if self.active_branches is not None:
      x = jnp.where(jnp.asarray(self.active_branches), x, -jnp.inf)
    return jax.nn.softmax(x, axis=-1)


def stacked_branches(branch: ModuleDef, num_branches: int, impl: str, name: str):
  """B branches with parameters stacked on axis 0, computed by an unrolled loop or by vmap.

  branch(name=...) makes one branch (any family's: x -> logits). Both implementations read and
  write the same layout (the one nn.vmap with variable_axes={'params': 0, 'batch_stats': 0}
  produces) and give the same numbers; returns a function x -> [B, N, C].
  """
  axes = {"params": 0, "batch_stats": 0}
  module = branch(name=name)
  if impl == "vmap":
    vmapped = nn.vmap(lambda mdl, x: mdl(x), variable_axes=axes, split_rngs={"params": True},
                      in_axes=None, out_axes=0, axis_size=num_branches)
    return lambda x: vmapped(module, x)
  # A fully unrolled scan: B separate (un-batched) branch computations on slices of the
  # stacked variables, the trunk output the (unchanged) carry; XLA's CPU backend runs these
  # much faster than vmapped convolutions. unroll=0 unrolls every length; unroll=B would leave
  # B = 1 as a one-trip while loop, whose backward convolutions XLA:CPU then runs in a naive,
  # ~50x slower form (benchmarks/NOTES.md).
  looped = nn.scan(lambda mdl, x: (x, mdl(x)), variable_axes=axes, split_rngs={"params": True},
                   in_axes=(), length=num_branches, unroll=0)
  return lambda x: looped(module, x)[1]


@flax.struct.dataclass
class OneOutput:
  branch_logits: jax.Array    # [B, N, C]
  gate: jax.Array             # [N, B]
  ensemble_logits: jax.Array  # [N, C]


def resolve_branch_impl(impl: str) -> str:
  """'auto' picks the faster implementation for the default backend.

  Measured on CPU (DESIGN.md section 2): the unrolled loop is 3.4-6x faster than vmapped
  convolutions. On accelerators vmap lowers to grouped convolutions, one kernel for all B.
  Decided by the process's backend when the model is traced (the two shape the program
  differently): a step exported for an accelerator from a CPU host should say 'vmap'.
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
  compute_dtype: str = "float32"   # COMPUTE_DTYPES: what the layers compute in

  def __post_init__(self):
    check_depth(self.depth)
    validate.check_int("num_classes", self.num_classes, minimum=1)
    kernels.resolve_conv_impl(self.conv_impl)
    resolve_compute_dtype(self.compute_dtype, self.conv_impl)
    super().__post_init__()

  @nn.compact
  def __call__(self, images, train: bool = False):
    return baseline_forward(self, images, train, functools.partial(Trunk, self.depth),
                            functools.partial(Branch, self.depth, self.num_classes))


class OneResNet(nn.Module):
  """ONE ResNet: shared trunk, B stacked branches, a gate, and the gated ensemble."""
  depth: int = 32
  num_branches: int = 3
  num_classes: int = 100
  branch_impl: str = "auto"
  active_branches: Optional[Sequence[bool]] = None
  axis_name: Optional[str] = None
  conv_impl: str = "auto"   # layers.conv2d: 'auto' | 'kernel' | 'xla' (kernels.py)
  compute_dtype: str = "float32"   # COMPUTE_DTYPES: what the layers compute in

  def __post_init__(self):
    check_depth(self.depth)
    validate.check_int("num_classes", self.num_classes, minimum=1)
    _check_one_fields(self)
    super().__post_init__()

  @nn.compact
  def __call__(self, images, train: bool = False) -> OneOutput:
    return one_forward(self, images, train, functools.partial(Trunk, self.depth),
                       functools.partial(Branch, self.depth, self.num_classes))


# ----------------------------------------------------------------------------- any family

def one_forward(module, images, train: bool, trunk: ModuleDef, branch: ModuleDef) -> OneOutput:
  """The ONE forward pass, run in `module`'s scope, for any family's trunk and branch.

  trunk(conv=, norm=, name=) and branch(conv=, norm=, name=) make the family's modules (x ->
  features, features -> logits); `module` gives num_branches, branch_impl, active_branches,
  axis_name, conv_impl and compute_dtype. The tree: 'trunk', 'branches' (stacked), 'gate', and
  the gate's log-weight offset in the 'gate_offset' collection. The layers compute in the
  images' dtype (compute_dtype); logits and gate come out in (at least) float32.
  """
  conv, norm = conv_and_norm(train, module.axis_name, module.conv_impl)
  images = _in_compute_dtype(images, module.compute_dtype)  # the layers follow x's dtype
  x = trunk(conv=conv, norm=norm, name="trunk")(images)
  branch_logits = layers.at_least_float32(stacked_branches(
      functools.partial(branch, conv=conv, norm=norm), module.num_branches,
      resolve_branch_impl(module.branch_impl), name="branches")(x))
  offset = module.variable("gate_offset", "log_weight",
                           lambda: jnp.zeros((module.num_branches,), jnp.float32))
  gate = Gate(module.num_branches, norm, module.active_branches, name="gate")(x, offset.value)
  ensemble = jnp.einsum("nb,bnc->nc", gate, branch_logits)
  return OneOutput(branch_logits=branch_logits, gate=gate, ensemble_logits=ensemble)


def baseline_forward(module, images, train: bool, trunk: ModuleDef, branch: ModuleDef):
  """The single-branch baseline in `module`'s scope: 'trunk' then one 'branch' -> float32
  logits (the layers compute in module.compute_dtype, as in one_forward)."""
  conv, norm = conv_and_norm(train, module.axis_name, module.conv_impl)
  images = _in_compute_dtype(images, module.compute_dtype)  # the layers follow x's dtype
  x = trunk(conv=conv, norm=norm, name="trunk")(images)
  return layers.at_least_float32(branch(conv=conv, norm=norm, name="branch")(x))


def _check_one_fields(module) -> None:
  validate.check_int("num_branches", module.num_branches, minimum=1)
  resolve_branch_impl(module.branch_impl)
  kernels.resolve_conv_impl(module.conv_impl)
  resolve_compute_dtype(module.compute_dtype, module.conv_impl)
  if module.active_branches is not None:
    object.__setattr__(module, "active_branches", tuple(bool(a) for a in module.active_branches))
    if len(module.active_branches) != module.num_branches or not any(module.active_branches):
      raise ValueError(f"active_branches={module.active_branches} must have one entry per "
                       f"branch ({module.num_branches}) with at least one True")


Options = Tuple[Tuple[str, Any], ...]  # a module's keyword arguments, hashable: (('depth', 28),)


class OneModel(nn.Module):
  """ONE on any family (model_spec registry): trunk, B stacked branches, gate, ensemble.

  trunk and branch are the family's module classes (fields conv and norm, plus their options:
  trunk_args and branch_args); the output is OneOutput, as OneResNet's.
  """
  trunk: Any
  branch: Any
  trunk_args: Options = ()
  branch_args: Options = ()
  num_branches: int = 3
  branch_impl: str = "auto"
  active_branches: Optional[Sequence[bool]] = None
  axis_name: Optional[str] = None
  conv_impl: str = "auto"
  compute_dtype: str = "float32"   # COMPUTE_DTYPES: what the layers compute in

  def __post_init__(self):
    _check_one_fields(self)
    super().__post_init__()

  @nn.compact
  def __call__(self, images, train: bool = False) -> OneOutput:
    return one_forward(self, images, train, functools.partial(self.trunk, **dict(self.trunk_args)),
                       functools.partial(self.branch, **dict(self.branch_args)))


class Baseline(nn.Module):
  """Any family's single-branch baseline ('trunk', 'branch': one slice of OneModel's stack)."""
  trunk: Any
  branch: Any
  trunk_args: Options = ()
  branch_args: Options = ()
  axis_name: Optional[str] = None
  conv_impl: str = "auto"
  compute_dtype: str = "float32"   # COMPUTE_DTYPES: what the layers compute in

  def __post_init__(self):
    kernels.resolve_conv_impl(self.conv_impl)
    resolve_compute_dtype(self.compute_dtype, self.conv_impl)
    super().__post_init__()

  @nn.compact
  def __call__(self, images, train: bool = False):
    return baseline_forward(self, images, train,
                            functools.partial(self.trunk, **dict(self.trunk_args)),
                            functools.partial(self.branch, **dict(self.branch_args)))


def count_params(tree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))

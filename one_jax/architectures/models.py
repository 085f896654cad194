"""The ONE model and the single-branch baseline of any family (DESIGN.md section 2).

Parameter tree (the contract that checkpoints, surgery and conversion rely on):

  Baseline:  {'trunk': T, 'branch': Br}
  OneModel:  {'trunk': T, 'branches': Br stacked on a leading axis of size B, 'gate': G}
             (no 'gate' for the methods whose ensemble is the branches' mean; OKDDip's
             'attention', FFL's and PCL's 'fusion' instead: ENSEMBLES; T stacked too where
             the branches start at the input: INDEPENDENT; PCL's variables add
             'temporal_mean', a second copy of params and batch_stats: TEMPORAL_MEAN)

T and Br are the family's trunk and branch modules (the CIFAR ResNet's T: the stem 'conv1',
'bn1' and stages 1-2 'layer1_0', ..., 'layer2_{n-1}'; its Br: stage 3 'layer3_0', ... and the
'classifier'); G holds 'dense' and 'bn'. A baseline's 'branch' is exactly one slice of a ONE
model's 'branches', so surgery is slicing and concatenating on axis 0. The gate's
non-trainable log-weight offset lives in the 'gate_offset' collection (not in 'params'),
shape [B]. The families (cifar_resnet, wrn, vgg, densenet, resnext, imagenet_resnet) know
nothing of this module; the registry (model_spec) puts each inside OneModel and Baseline.
"""
import functools
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from one_jax.architectures import layers
from one_jax.architectures.layers import ModuleDef

BRANCH_IMPLS = ("auto", "loop", "vmap")
# How a branched model combines its branches, by method (ModelSpec.method): ONE's learned gate
# (parameters 'gate', the 'gate_offset' collection), the plain mean of the branches' logits
# (no parameters: CL-ILR), or OKDDip's: the last branch is the group leader, the others are
# peers whose targets come from an attention over the peers ('attention': shared query and key
# projections of the pooled features), the ensemble is the peers' mean; or FFL's fusion module
# ('fusion': a classifier on the fused feature maps of all branches), or PCL's peer-ensemble
# teacher ('peer_fusion': a classifier on the concatenated pooled features of the branches).
ENSEMBLES = {"one": "gate", "cl_ilr": "mean", "okddip": "attention", "dml": "mean",
             "kdcl": "mean", "ffl": "fusion", "pcl": "peer_fusion"}
# The ensembles whose parameters ('fusion') read every branch: their shapes follow the branch
# count (surgery grows them on expand and cannot merge them).
FUSIONS = ("fusion", "peer_fusion")
# Where the branches start: at the input for these methods (independent peers, DML's and
# KDCL's: B whole networks, their 'trunk' stacked on axis 0 as 'branches' are), after the
# trunk for every other.
INDEPENDENT = ("dml", "kdcl")
# The methods whose training state keeps a temporal mean of the model (PCL's mean teacher): the
# 'temporal_mean' collection, {'params', 'batch_stats', 'count'} (training/temporal_mean.py).
TEMPORAL_MEAN = ("pcl",)
# OKDDip's projections map C pooled channels to C // ATTENTION_FACTOR (its code's factor 8).
ATTENTION_FACTOR = 8
COMPUTE_DTYPES = ("float32", "bfloat16")


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


class Gate(nn.Module):
  """Global mean pool -> Dense(B) -> BatchNorm -> ReLU -> (+ offset) -> softmax over B.

  The offset is a per-branch log-weight (OneModel keeps it in the non-trainable
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


def stacked_branches(branch: ModuleDef, num_branches: int, impl: str, name: str,
                     mapped: bool = False):
  """B copies of a module with parameters stacked on axis 0, computed by an unrolled loop or by
  vmap: the branches on the trunk's output, or (independent peers) the B trunks on the images
  and then the B branches, each on its own trunk's output.

  branch(name=...) makes one copy (a family's branch: x -> (pooled features, logits); or its
  trunk). mapped=False gives every copy the same x; mapped=True gives copy b x[b]. Both
  implementations read and write the same layout (the one nn.vmap with
  variable_axes={'params': 0, 'batch_stats': 0} produces) and give the same numbers; returns a
  function x -> the copies' outputs stacked on axis 0 (branches: ([B, N, F] features,
  [B, N, C] logits)).
  """
  axes = {"params": 0, "batch_stats": 0}
  module = branch(name=name)
  if impl == "vmap":
    vmapped = nn.vmap(lambda mdl, x: mdl(x), variable_axes=axes, split_rngs={"params": True},
                      in_axes=0 if mapped else None, out_axes=0, axis_size=num_branches)
    return lambda x: vmapped(module, x)
  # A fully unrolled scan: B separate (un-batched) computations on slices of the stacked
  # variables (x the unchanged carry, or the scanned input when mapped); XLA's CPU backend
  # runs these much faster than vmapped convolutions. unroll=0 unrolls every length; unroll=B
  # would leave B = 1 as a one-trip while loop, whose backward convolutions XLA:CPU then runs
  # in a naive, ~50x slower form (benchmarks/NOTES.md).
  if mapped:
    looped = nn.scan(lambda mdl, carry, x: (carry, mdl(x)), variable_axes=axes,
                     split_rngs={"params": True}, in_axes=0, length=num_branches, unroll=0)
    return lambda x: looped(module, (), x)[1]
  looped = nn.scan(lambda mdl, x: (x, mdl(x)), variable_axes=axes, split_rngs={"params": True},
                   in_axes=(), length=num_branches, unroll=0)
  return lambda x: looped(module, x)[1]


@flax.struct.dataclass
class OneOutput:
  branch_logits: jax.Array    # [B, N, C]
  gate: jax.Array             # [N, B]: the ensemble's weights (ONE's gate, else equal)
  ensemble_logits: jax.Array  # [N, C]
  peer_targets: Optional[jax.Array] = None  # OKDDip: [B - 1, N, C], each peer's attention target
  # PCL: [B, N, C], the temporal-mean peers' logits (the steps add them: training/temporal_mean)
  temporal_logits: Optional[jax.Array] = None


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


# ----------------------------------------------------------------------------- any family

def one_forward(module, images, train: bool, trunk: ModuleDef, branch: ModuleDef) -> OneOutput:
  """The ONE forward pass, run in `module`'s scope, for any family's trunk and branch.

  trunk(conv=, norm=, name=) and branch(conv=, norm=, name=) make the family's modules (x ->
  features, features -> (pooled features, logits)); `module` gives num_branches, branch_impl,
  active_branches, axis_name, conv_impl, compute_dtype, ensemble (ENSEMBLES' values: ONE's
  gate, the branches' mean, OKDDip's attention) and trunk_grad_scale (what the gradient from
  the branches into the trunk is multiplied by: CL-ILR's 1/B). The tree: 'trunk', 'branches'
  (stacked), with a gate 'gate' and its log-weight offset in the 'gate_offset' collection, with
  attention 'attention'. With module.independent the trunk is stacked too and branch b runs on
  trunk b's output; its images are [N, H, W, C] (every network sees them) or [N, B, H, W, C]
  (network b sees view b). The layers compute in the images' dtype (compute_dtype); logits and
  gate come out in (at least) float32.
  """
  conv, norm = layers.conv_and_norm(train, module.axis_name, module.conv_impl)
  images = _in_compute_dtype(images, module.compute_dtype)  # the layers follow x's dtype
  impl = resolve_branch_impl(module.branch_impl)
  views = images.ndim == 5   # [N, B, H, W, C]: a view of each image per branch (KDCL, PCL)
  takes_views = module.independent or module.ensemble == "peer_fusion"
  if views and (not takes_views or images.shape[1] != module.num_branches):
    raise ValueError(f"images of shape {images.shape} hold {images.shape[1]} views per example, "
                     f"but this model takes one view, or one per branch of its "
                     f"{module.num_branches} branches (KDCL, PCL): give [N, H, W, C] images")
  if module.independent:   # B whole networks: B stacked trunks, branch b on trunk b's output
    x = stacked_branches(functools.partial(trunk, conv=conv, norm=norm), module.num_branches,
                         impl, name="trunk", mapped=views)(
                             jnp.moveaxis(images, 1, 0) if views else images)
  elif views:   # PCL: the shared trunk on each view in turn (its statistics updated in turn)
    shared = trunk(conv=conv, norm=norm, name="trunk")
    x = jnp.stack([shared(images[:, v]) for v in range(images.shape[1])])
  else:
    x = trunk(conv=conv, norm=norm, name="trunk")(images)
  branch_input = x if module.trunk_grad_scale == 1.0 else layers.scale_gradient(
      x, module.trunk_grad_scale)
  features, branch_logits = stacked_branches(
      functools.partial(branch, conv=conv, norm=norm), module.num_branches, impl,
      name="branches", mapped=module.independent or views)(branch_input)
  branch_logits = layers.at_least_float32(branch_logits)
  targets = None
  if module.ensemble == "gate":
    offset = module.variable("gate_offset", "log_weight",
                             lambda: jnp.zeros((module.num_branches,), jnp.float32))
    gate = Gate(module.num_branches, norm, module.active_branches, name="gate")(x, offset.value)
  elif module.ensemble == "fusion":   # FFL: the fused classifier is the ensemble
    gate = mean_weights(branch_logits.shape[1], module.num_branches, module.active_branches)
    fused = layers.at_least_float32(FusionModule(branch_logits.shape[-1], norm,
                                                 name="fusion")(features))
    return OneOutput(branch_logits=branch_logits, gate=gate, ensemble_logits=fused)
  elif module.ensemble == "peer_fusion":   # PCL: a classifier on the concatenated features
    gate = mean_weights(branch_logits.shape[1], module.num_branches, module.active_branches)
    fused = PeerFusion(branch_logits.shape[-1], name="fusion")(jnp.mean(features, axis=(2, 3)))
    return OneOutput(branch_logits=branch_logits, gate=gate,
                     ensemble_logits=layers.at_least_float32(fused))
  elif module.ensemble == "attention":
    # Peers 0..B-2 attend to one another; the leader (B-1) learns from the peers' mean, which
    # is the ensemble. Inactive peers leave both (all peers count when only the leader trains).
    peers = module.num_branches - 1
    active = None if module.active_branches is None else tuple(module.active_branches[:peers])
    active = active if active and any(active) else None
    pooled = jnp.mean(features[:peers], axis=(2, 3))   # [P, N, C]: each peer's pooled features
    targets = PeerAttention(active, name="attention")(pooled, branch_logits[:peers])
    gate = mean_weights(branch_logits.shape[1], module.num_branches,
                        (active or (True,) * peers) + (False,))
  else:
    gate = mean_weights(branch_logits.shape[1], module.num_branches, module.active_branches)
  ensemble = jnp.einsum("nb,bnc->nc", gate, branch_logits)
  return OneOutput(branch_logits=branch_logits, gate=gate, ensemble_logits=ensemble,
                   peer_targets=targets)


class FusionModule(nn.Module):
  """FFL's fusion module: the branches' last feature maps concatenated on channels (branch 0's
  first), a 3x3 depthwise convolution ('dw') + BatchNorm ('bn_dw') + ReLU, a 1x1 convolution
  to one branch's width ('pw') + BatchNorm ('bn_pw') + ReLU, global average pooling and the
  fused 'classifier'. maps: [B, N, H, W, C] -> fused logits [N, classes]."""
  num_classes: int
  norm: ModuleDef

  @nn.compact
  def __call__(self, maps):
    b, n, h, w, c = maps.shape
    x = jnp.moveaxis(maps, 0, 3).reshape(n, h, w, b * c)   # channel b * C + c
    x = nn.relu(self.norm(name="bn_dw")(layers.DepthwiseConv3x3(name="dw")(x)))
    x = layers.conv(c, 1, name="pw", impl="xla")(x)
    x = nn.relu(self.norm(name="bn_pw")(x))
    return layers.Dense(self.num_classes, name="classifier")(jnp.mean(x, axis=(1, 2)))


class PeerFusion(nn.Module):
  """PCL's peer-ensemble teacher: the 'classifier' (Dense) on the branches' pooled features
  concatenated (branch 0's first, as torch.cat([h_1, ..., h_B], dim=1)).
  pooled: [B, N, F] -> logits [N, classes]."""
  num_classes: int

  @nn.compact
  def __call__(self, pooled):
    b, n, f = pooled.shape
    x = jnp.moveaxis(pooled, 0, 1).reshape(n, b * f)   # column b * F + f
    return layers.Dense(self.num_classes, name="classifier")(x)


class PeerAttention(nn.Module):
  """OKDDip's targets: peer i's is sum_j A_ij z_j, A = softmax_j(q_i . k_j) over the peers
  (itself included), q = W_q h and k = W_k h the shared bias-free projections ('query', 'key':
  C -> C // ATTENTION_FACTOR) of each peer's pooled features h. Inactive peers (mask False)
  get attention exactly 0. Computed in float32; returns [P, N, C]."""
  active_peers: Optional[Tuple[bool, ...]] = None

  @nn.compact
  def __call__(self, features, logits):
    features = layers.at_least_float32(features)          # [P, N, F]
    width = max(features.shape[-1] // ATTENTION_FACTOR, 1)
    query = layers.Dense(width, use_bias=False, name="query")(features)
    key = layers.Dense(width, use_bias=False, name="key")(features)
    energy = jnp.einsum("ind,jnd->nij", query, key)        # [N, P, P]
    if self.active_peers is not None:
      energy = jnp.where(jnp.asarray(self.active_peers), energy, -jnp.inf)
    attention = jax.nn.softmax(energy, axis=-1)
    return jnp.einsum("nij,jnc->inc", attention, logits)


def mean_weights(batch: int, num_branches: int, active_branches=None) -> jax.Array:
  """[N, B] equal weights over the (active) branches: the ensemble of a gate-less model."""
  active = jnp.ones((num_branches,)) if active_branches is None else jnp.asarray(
      active_branches, jnp.float32)
  return jnp.broadcast_to(active / jnp.sum(active), (batch, num_branches)).astype(jnp.float32)


def baseline_forward(module, images, train: bool, trunk: ModuleDef, branch: ModuleDef):
  """The single-branch baseline in `module`'s scope: 'trunk' then one 'branch' -> float32
  logits (the layers compute in module.compute_dtype, as in one_forward)."""
  conv, norm = layers.conv_and_norm(train, module.axis_name, module.conv_impl)
  images = _in_compute_dtype(images, module.compute_dtype)  # the layers follow x's dtype
  x = trunk(conv=conv, norm=norm, name="trunk")(images)
  _, logits = branch(conv=conv, norm=norm, name="branch")(x)
  return layers.at_least_float32(logits)


Options = Tuple[Tuple[str, Any], ...]  # a module's keyword arguments, hashable: (('depth', 28),)


class OneModel(nn.Module):
  """ONE on any family (model_spec registry): trunk, B stacked branches, the method's
  ensemble (ONE's gate, a mean, OKDDip's attention and leader).

  Built by ModelSpec.build, which checks every field once (depth, branches, the active mask,
  the implementations); the module trusts them.

  trunk and branch are the family's module classes (fields conv and norm, plus their options:
  trunk_args and branch_args); the output is OneOutput.
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
  ensemble: str = "gate"           # ENSEMBLES' values
  independent: bool = False        # INDEPENDENT: B whole networks, 'trunk' stacked as well
  trunk_grad_scale: float = 1.0    # the gradient entering the trunk from the branches, times

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

  @nn.compact
  def __call__(self, images, train: bool = False):
    return baseline_forward(self, images, train,
                            functools.partial(self.trunk, **dict(self.trunk_args)),
                            functools.partial(self.branch, **dict(self.branch_args)))


# The variable collections of a model; a training state or a checkpoint holds them beside the
# optimizer state.
# 'temporal_mean' (TEMPORAL_MEAN's methods) is not read by the module: it is a second set of
# the model's params and batch_stats, which the steps apply as a model of their own.
VARIABLE_COLLECTIONS = ("params", "batch_stats", "gate_offset", "temporal_mean")


def variables_in(state) -> Dict[str, Any]:
  """The model's variables (params, batch_stats, gate_offset, temporal_mean) of a state that
  holds more."""
  return {k: state[k] for k in VARIABLE_COLLECTIONS if k in state}


def with_temporal_mean(variables) -> Dict[str, Any]:
  """Fresh variables of a TEMPORAL_MEAN model: the temporal mean starts as the model itself
  (count 0: the first update replaces it by the updated model, training/temporal_mean.py)."""
  variables = dict(variables)
  variables["temporal_mean"] = {"params": variables["params"],
                                "batch_stats": variables["batch_stats"],
                                "count": jnp.zeros((), jnp.int32)}
  return variables


def count_params(tree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))

"""The one description of a model: ModelSpec, and the registry of architectures it builds.

Training, checkpoints, surgery, conversion and the benchmark all describe a model by a
ModelSpec: built from a config (`from_config`), stored in and read back from checkpoint meta
(`to_dict` / `from_dict`: the meta's 'model' entry), building the Flax module (`build`) and
its variables (`init`, `abstract_variables`), describing itself (`describe`).

Adding an architecture family is its trunk and branch modules (their own file in
one_jax/architectures/, built on layers.conv_and_norm) plus one `family(...)` line in
ARCHITECTURES below, which gives its ONE kind and its single-branch baseline kind.
"""
import dataclasses
import functools
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from one_jax import validate
from one_jax.architectures import (cifar_resnet, densenet, imagenet_resnet, models, resnext,
                                   vgg, wrn)
from one_jax.cpu import kernels


def parse_active_branches(text, num_branches: int) -> Optional[Tuple[bool, ...]]:
  """'0,2' (config.active_branches) -> a static mask over num_branches; '' -> None (all)."""
  text = text or ""
  if not text:
    return None
  try:
    chosen = {int(s) for s in validate.comma_list(text)}
  except ValueError:
    raise ValueError(f"active_branches={text!r} is invalid: give 0-based branch indices, "
                     "e.g. --config.active_branches=0,2") from None
  bad = sorted(i for i in chosen if not 0 <= i < num_branches)
  if bad or not chosen:
    raise ValueError(f"active_branches={text!r} names branches {bad} outside 0.."
                     f"{num_branches - 1}: use indices of existing branches")
  return tuple(b in chosen for b in range(num_branches))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Everything that describes a model, in one place: built from a config, stored in (and
  read back from) checkpoint meta, and the one way to build the Flax module and its abstract
  variables. A new field (an architecture option, a compute dtype) is a line here plus its
  line in from_config (if a config sets it) and in to_dict / from_dict (if checkpoints must
  record it); every user of the spec gets it from there.

  kind names a registry entry (ARCHITECTURES); num_branches is 1 for unbranched kinds.
  The architecture options (OPTIONS: width, cardinality, ...) are None for a family that does
  not take them and are set (to the family's default where not given) for one that does.
  method (branched kinds only; None for a baseline) is the online-distillation method whose
  model this is: it decides the parts besides trunk and branches (ONE's gate; none: CL-ILR's
  ensemble is the branches' mean; OKDDip's attention, its last branch the leader;
  models.ENSEMBLES). It is stored with the weights (in the meta
  only when not 'one', which every earlier checkpoint implies).
  branch_impl, active_branches, conv_impl, compute_dtype and trunk_grad_scale (CL-ILR's
  backpropagation rescaling, 1/B) choose how the model runs and trains (same float32 parameters): they come from the config and are not stored with the
  weights, so a checkpoint of a bfloat16 run is read, evaluated and edited as any other.
  """
  kind: str
  depth: int
  num_classes: int
  num_branches: int = 1
  branch_impl: str = "auto"
  active_branches: Optional[Tuple[bool, ...]] = None
  conv_impl: str = "auto"
  compute_dtype: str = "float32"
  method: Optional[str] = None        # models.ENSEMBLES' methods; None (unbranched) or 'one'
  trunk_grad_scale: float = 1.0
  # Architecture options (OPTIONS), each read by the families that list it.
  width: Optional[int] = None         # wrn: widening factor k (WRN-28-10: 10); vgg: channels of
                                      # block 1 (64); resnext: stage-1 output / 64 (4)
  cardinality: Optional[int] = None   # resnext: groups of the grouped 3x3 convolution (8x64d: 8)
  group_width: Optional[int] = None   # resnext: channels per group in the first stage (8x64d: 64)
  growth_rate: Optional[int] = None   # densenet: k, the channels each layer adds
  bottleneck: Optional[bool] = None   # densenet: DenseNet-BC (1x1 bottlenecks, compression 0.5)
  depth_rule: Optional[str] = None    # cifar_resnet: how depth gives blocks ('one' or 'peers')

  def __post_init__(self):
    arch = architecture(self.kind)
    defaults = dict(arch.options)
    for name in OPTIONS:
      value = getattr(self, name)
      if name in defaults and value is None:
        object.__setattr__(self, name, defaults[name])
      elif name not in defaults and value is not None:
        raise ValueError(f"{name}={value!r} is not an option of {self.kind} (its options: "
                         f"{', '.join(defaults) or 'none'}): leave it unset")
    arch.check(self)
    validate.check_int("num_classes", self.num_classes, minimum=1)
    validate.check_int("num_branches", self.num_branches, minimum=1,
                       why="a model has at least one branch (--config.num_branches=1 or more)")
    if not arch.branched and self.num_branches != 1:
      raise ValueError(f"num_branches={self.num_branches} is invalid for {self.kind}, which "
                       "has one branch: use a branched kind (e.g. one_resnet)")
    if arch.branched and self.method is None:
      object.__setattr__(self, "method", "one")
    if self.method is not None and self.method not in models.ENSEMBLES:
      raise ValueError(f"method={self.method!r} is unknown: use one of "
                       f"{', '.join(models.ENSEMBLES)}")
    if not arch.branched:   # a baseline trains with cross-entropy: 'one' means no method
      if self.method not in (None, "one"):
        raise ValueError(f"method={self.method!r} trains several branches, and {self.kind} "
                         "has one: use a branched kind (e.g. one_resnet), or method='one' for "
                         "a baseline (cross-entropy)")
      object.__setattr__(self, "method", None)
    if self.method == "pcl" and self.num_branches < 2:
      raise ValueError(f"num_branches={self.num_branches} is too few for method='pcl', whose "
                       "peers learn from one another's temporal means: use 2 or more")
    if self.method == "okddip" and self.num_branches < 2:
      raise ValueError(f"num_branches={self.num_branches} is too few for method='okddip', whose "
                       "last branch is the group leader of the peers before it: use 2 or more "
                       "(its papers: 4, three peers and the leader)")
    models.resolve_branch_impl(self.branch_impl)
    kernels.resolve_conv_impl(self.conv_impl)
    models.resolve_compute_dtype(self.compute_dtype, self.conv_impl)
    if self.active_branches is not None:
      mask = tuple(bool(a) for a in self.active_branches)
      object.__setattr__(self, "active_branches", mask)
      if len(mask) != self.num_branches or not any(mask):
        raise ValueError(f"active_branches={mask} must have one entry per branch "
                         f"({self.num_branches}) with at least one True")

  # --- to and from configs and checkpoint meta

  @classmethod
  def from_config(cls, config) -> "ModelSpec":
    """The model of an experiment config (config.model, depth, num_classes, method, ...)."""
    arch = architecture(config.model)
    branches = config.num_branches if arch.branched else 1
    method = config.get("method", "one")
    backprop_scale = (arch.branched and method == "cl_ilr"
                      and config.get("cl_ilr_backprop_scale", True))
    return cls(kind=config.model, depth=config.depth, num_classes=config.num_classes,
               num_branches=branches, branch_impl=config.get("branch_impl", "auto"),
               active_branches=parse_active_branches(config.get("active_branches", ""),
                                                     branches),
               conv_impl=config.get("conv_impl", "auto"),
               compute_dtype=config.get("compute_dtype", "float32"),
               method=method,
               trunk_grad_scale=1.0 / branches if backprop_scale else 1.0,
               **_config_options(config, arch))

  def config_fields(self) -> Dict[str, Any]:
    """The config fields that describe this model's architecture (e.g. one restored from disk):
    config.update(spec.config_fields()) makes a config train or evaluate exactly it."""
    fields = {"model": self.kind, "depth": self.depth, "num_classes": self.num_classes,
              "num_branches": self.num_branches, "active_branches": "",
              "method": self.method or "one"}
    return {**fields, **{name: CONFIG_UNSET[name] for name in OPTIONS}, **self.options()}

  def options(self) -> Dict[str, Any]:
    """The architecture options of this model's family ({} for the CIFAR ResNet)."""
    return {name: getattr(self, name) for name, _ in architecture(self.kind).options}

  def recorded_options(self) -> Dict[str, Any]:
    """options() less those at a default that checkpoints written before the option existed
    imply (OMITTED_DEFAULTS): the meta and describe() of such a model stay as they were."""
    return {k: v for k, v in self.options().items() if OMITTED_DEFAULTS.get(k, ()) != v}

  def to_dict(self) -> Dict[str, Any]:
    """The checkpoint meta's 'model' entry: the stored fields and the derived ones (block)."""
    arch = architecture(self.kind)
    info = {"kind": self.kind, "depth": self.depth, "num_classes": self.num_classes}
    if arch.branched:
      info["num_branches"] = self.num_branches
      if self.method != "one":
        info["method"] = self.method
    info.update(self.recorded_options())
    info.update(arch.details(self))
    return info

  @classmethod
  def from_dict(cls, info: Mapping[str, Any], **runtime) -> "ModelSpec":
    """Inverse of to_dict (every meta one_jax has written); runtime fields (branch_impl,
    conv_impl, compute_dtype, active_branches) as keyword arguments. Derived fields must agree."""
    if not isinstance(info, Mapping):
      raise ValueError(f"model info {info!r} is not a mapping with 'kind', 'depth' and "
                       "'num_classes'")
    missing = [k for k in ("kind", "depth", "num_classes") if k not in info]
    if missing:
      raise ValueError(f"model info {dict(info)} lacks {', '.join(missing)}")
    arch = architecture(info["kind"])
    if arch.branched and "num_branches" not in info:
      raise ValueError(f"model info {dict(info)} lacks num_branches")
    options = {name: info[name] for name, _ in arch.options if name in info}
    spec = cls(kind=info["kind"], depth=info["depth"], num_classes=info["num_classes"],
               num_branches=info["num_branches"] if arch.branched else 1,
               method=info.get("method") if arch.branched else None, **options, **runtime)
    for field, value in arch.details(spec).items():
      if field in info and info[field] != value:
        raise ValueError(f"claims {info[field]} {field}s at depth {spec.depth}, which uses "
                         f"{value} {field}s: its metadata is wrong")
    return spec

  # --- what the description gives

  @property
  def branched(self) -> bool:
    """ONE-style: stacked 'branches' (else one 'branch', logits out)."""
    return architecture(self.kind).branched

  @property
  def has_gate(self) -> bool:
    """Whether the branches are combined by ONE's gate ('gate', 'gate_offset'), not a mean."""
    return self.branched and models.ENSEMBLES[self.method] == "gate"

  @property
  def independent(self) -> bool:
    """Whether the branches start at the input (DML: B whole networks, 'trunk' stacked too)."""
    return self.branched and self.method in models.INDEPENDENT

  @property
  def temporal_mean(self) -> bool:
    """Whether the model's variables hold a temporal mean of it (PCL's 'temporal_mean')."""
    return self.branched and self.method in models.TEMPORAL_MEAN

  def with_branches(self, num_branches: Optional[int]) -> "ModelSpec":
    """The model of the same family with num_branches (the unbranched kind for None)."""
    arch = architecture(self.kind)
    kinds = [k for k, a in ARCHITECTURES.items()
             if a.family == arch.family and a.branched == (num_branches is not None)]
    if not kinds:
      raise ValueError(f"{self.kind} has no {'branched' if num_branches else 'single-branch'} "
                       "counterpart")
    # __post_init__ gives a baseline no method and a model from a baseline ONE's.
    return dataclasses.replace(self, kind=kinds[0], num_branches=num_branches or 1,
                               active_branches=None,
                               method=None if num_branches is None else self.method,
                               trunk_grad_scale=1.0 if num_branches is None
                               else self.trunk_grad_scale)

  def build(self, axis_name: Optional[str] = None, **overrides) -> nn.Module:
    """The Flax module (axis_name: synchronised BatchNorm over that mapped axis)."""
    spec = dataclasses.replace(self, **overrides) if overrides else self
    return architecture(spec.kind).module(spec, axis_name)

  def abstract_variables(self, image_shape=(32, 32, 3)) -> Dict[str, Any]:
    """Shapes and dtypes of the variables (jax.eval_shape of init; nothing is computed;
    cached, so read-only). Parameter shapes do not depend on the image size."""
    return _abstract_variables(self, tuple(image_shape))

  def num_params(self) -> int:
    """Every trainable parameter ('params': trunk, all branches, gate), as bench and
    `surgery inspect` report it."""
    return models.count_params(self.abstract_variables()["params"])

  def init(self, rng, image_shape=(32, 32, 3)) -> Dict[str, Any]:
    """Freshly initialised variables (one jitted init per model, reused)."""
    return _jitted_init(self)(rng, jnp.zeros((1,) + tuple(image_shape), jnp.float32))

  def describe(self) -> str:
    """One line for people: what `inspect` and error messages say about the model."""
    arch = architecture(self.kind)
    details = "".join(f", {k.replace('_', ' ')} {v}"
                      for k, v in self.recorded_options().items())
    details += "".join(f", {v} {k}s" for k, v in arch.details(self).items())
    branches = f"{self.num_branches} branch{'es' if self.num_branches != 1 else ''}"
    if self.independent:
      branches = f"{self.num_branches} independent networks ({self.method})"
    elif self.branched and self.method != "one":
      parts = {"gate": "", "mean": ": no gate", "fusion": ": a fusion module",
               "peer_fusion": ": a fusion classifier and a temporal mean",
               "attention": f": {self.num_branches - 1} peers and a leader"}
      branches += f" ({self.method}{parts[models.ENSEMBLES[self.method]]})"
    return (f"{arch.title} ({self.kind}), depth {self.depth}{details}, {branches}, "
            f"{self.num_classes} classes")


# The architecture options: ModelSpec fields, config fields of the same names, meta entries.
OPTIONS = ("width", "cardinality", "group_width", "growth_rate", "bottleneck", "depth_rule")
# A config's value for an option it leaves to the family's default (bottleneck: a bool, so
# 'unset' is its default, True: DenseNet-BC).
CONFIG_UNSET = {"width": 0, "cardinality": 0, "group_width": 0, "growth_rate": 0,
                "bottleneck": True, "depth_rule": ""}
# Options added after checkpoints of their family existed, with the value those imply: left out
# of the meta and the description at that value.
OMITTED_DEFAULTS = {"depth_rule": "one"}


def check_architecture(kind: str, depth, config) -> None:
  """Raises the one-line error of a depth or option (config fields) the family of `kind`
  cannot build; an unknown kind is left to the 'model' field's own check."""
  if kind in ARCHITECTURES:
    arch = ARCHITECTURES[kind]
    ModelSpec(kind, depth, num_classes=2, **_config_options(config, arch))


def _config_options(config, arch) -> Dict[str, Any]:
  """The family's options a config sets; a set option the family does not take is an error."""
  taken = dict(arch.options)
  options = {}
  for name in OPTIONS:
    value = config.get(name, CONFIG_UNSET[name])
    if name in taken:
      options[name] = None if value == CONFIG_UNSET[name] and name != "bottleneck" else value
    elif value != CONFIG_UNSET[name] and not isinstance(value, bool):
      raise ValueError(f"{name}={value!r} is not an option of model={config.model!r} (its "
                       f"options: {', '.join(taken) or 'none'}): leave --config.{name} unset")
  return options


@functools.lru_cache(maxsize=32)
def _abstract_variables(spec: ModelSpec, image_shape):
  model = spec.build()
  images = jax.ShapeDtypeStruct((1,) + image_shape, jnp.float32)
  return jax.eval_shape(lambda x: _init_variables(spec, model, jax.random.key(0), x), images)


def _init_variables(spec: ModelSpec, model, rng, images):
  """model.init, plus the temporal mean where the spec keeps one (models.with_temporal_mean)."""
  variables = model.init(rng, images, train=False)
  return models.with_temporal_mean(variables) if spec.temporal_mean else variables


# The init program is compiled unoptimised on the CPU: XLA:CPU's optimising backend spends
# seconds per distinct parameter shape on the random draws (about 4 s each; DenseNet-40-12's
# init compiled in 217 s, ResNet-32's in 15 s), while unoptimised it compiles in a few seconds
# and runs once. Its values differ from the optimised program's only by rounding (at most
# 2e-7 relative in some entries: no multiply-add contraction), well inside the draws' spread.
_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def init_program(spec: ModelSpec):
  """The model's init as a function of (rng, images), and the compiler options it is jitted
  with on this backend: what ModelSpec.init runs, for a caller that keeps the traced program
  (training/train_state.py)."""
  options = _INIT_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
  return functools.partial(_init_variables, spec, spec.build()), options


@functools.lru_cache(maxsize=8)
def _jitted_init(spec: ModelSpec):
  fn, options = init_program(spec)
  return jax.jit(fn, compiler_options=options)


# ----------------------------------------------------------------------------- the registry


@dataclasses.dataclass(frozen=True)
class Architecture:
  """A registry entry: how a model kind is built, checked and described.

  module(spec, axis_name) -> the Flax module. branched: ONE-style parameter tree (trunk,
  stacked 'branches', gate) or a baseline's (trunk, 'branch'); kinds of one family share
  trunk and branch, so surgery moves branches between them. check(spec) raises a one-line
  ValueError for a field the architecture cannot take; details(spec) are derived fields the
  checkpoint meta records (and from_dict checks); options are the architecture options
  (OPTIONS) the family takes, with their defaults.
  """
  module: Callable[[ModelSpec, Optional[str]], nn.Module]
  branched: bool
  family: str
  title: str
  check: Callable[[ModelSpec], Any]
  details: Callable[[ModelSpec], Dict[str, Any]]
  options: Tuple[Tuple[str, Any], ...] = ()


def family(name: str, title: str, trunk: type, branch: type,
           args: Callable[[ModelSpec], Tuple[Dict[str, Any], Dict[str, Any]]],
           check: Callable[[ModelSpec], Any], options: Dict[str, Any],
           details: Callable[[ModelSpec], Dict[str, Any]] = lambda spec: {},
           one_kind: Optional[str] = None) -> Dict[str, Architecture]:
  """The two registry entries of an architecture family: one_kind, by default 'one_<name>'
  (models.OneModel: the trunk, B stacked branches, the gate) and '<name>' (models.Baseline:
  trunk + one 'branch').

  trunk and branch are the family's module classes (fields conv and norm, plus the keyword
  arguments args(spec) gives each: (trunk kwargs, branch kwargs)); the branch is the family's
  last stage or block and its classifier, so every ONE contract (surgery, voting) holds.
  """
  def module_args(spec):
    trunk_args, branch_args = args(spec)
    return dict(trunk=trunk, branch=branch, trunk_args=tuple(sorted(trunk_args.items())),
                branch_args=tuple(sorted(branch_args.items())), conv_impl=spec.conv_impl,
                compute_dtype=spec.compute_dtype)

  def one(spec, axis_name):
    return models.OneModel(**module_args(spec), num_branches=spec.num_branches,
                           branch_impl=spec.branch_impl, active_branches=spec.active_branches,
                           axis_name=axis_name, ensemble=models.ENSEMBLES[spec.method],
                           independent=spec.independent,
                           trunk_grad_scale=spec.trunk_grad_scale)

  def baseline(spec, axis_name):
    return models.Baseline(**module_args(spec), axis_name=axis_name)

  common = dict(family=name, check=check, details=details, options=tuple(options.items()))
  return {one_kind or f"one_{name}": Architecture(module=one, branched=True,
                                                  title=f"ONE {title}", **common),
          name: Architecture(module=baseline, branched=False, title=f"{title} baseline",
                             **common)}


ARCHITECTURES: Dict[str, Architecture] = {
    # The CIFAR ResNet's ONE kind keeps the name the ONE code gave it (and checkpoints record).
    **family("cifar_resnet", "ResNet", cifar_resnet.Trunk, cifar_resnet.Branch,
             cifar_resnet.args, cifar_resnet.check, cifar_resnet.OPTIONS, cifar_resnet.details,
             one_kind="one_resnet"),
    **family("wrn", "Wide ResNet", wrn.Trunk, wrn.Branch, wrn.args, wrn.check, wrn.OPTIONS),
    **family("vgg", "VGG", vgg.Trunk, vgg.Branch, vgg.args, vgg.check, vgg.OPTIONS),
    **family("densenet", "DenseNet", densenet.Trunk, densenet.Branch, densenet.args,
             densenet.check, densenet.OPTIONS),
    **family("resnext", "ResNeXt", resnext.Trunk, resnext.Branch, resnext.args, resnext.check,
             resnext.OPTIONS),
    **family("imagenet_resnet", "ImageNet ResNet", imagenet_resnet.Trunk,
             imagenet_resnet.Branch, imagenet_resnet.args, imagenet_resnet.check,
             imagenet_resnet.OPTIONS, imagenet_resnet.details),
}


def architecture(kind) -> Architecture:
  """The registry entry of a model kind; an unknown kind is a one-line error naming them all."""
  if kind not in ARCHITECTURES:
    names = " or ".join(f"{k!r} ({'ONE' if a.branched else 'the baseline'})"
                        for k, a in ARCHITECTURES.items())
    raise ValueError(f"model={kind!r} is unknown: use {names}")
  return ARCHITECTURES[kind]

"""Every config field's valid values, in one table, checked before anything is read or written.

`check(config)` goes through RULES (one row per field of configs/common.py, step1.py, step2.py
and imagenet.py) and raises a one-line ValueError naming the first bad field, the value and what
it must be. Checks that need more than the config (batch size vs devices, num_classes vs the
dataset, the data itself, checkpoints) stay where those are read.

The integer helpers every layer uses (`is_int`, `check_int`) live in the leaf module
one_jax.validate.
"""
import dataclasses
import math
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import numpy as np

from one_jax import validate
from one_jax.architectures import cifar_resnet, model_spec, models
from one_jax.cpu import kernels, xla_options
from one_jax.data import device_data, sources
from one_jax.surgery import operations
from one_jax.training import losses, optimizer, two_stage

Bound = Union[None, int, float, str]  # a number, or the name of another field


# ----------------------------------------------------------------------------- kinds of rule


@dataclasses.dataclass(frozen=True)
class Number:
  """An int (integer=True, never a bool) or a finite float in a range whose ends may name
  other fields ('num_epochs')."""
  integer: bool
  low: Bound = None
  high: Bound = None
  low_open: bool = False
  high_open: bool = False
  also: Tuple[Any, ...] = ()   # special values outside the range (steps_per_epoch = -1)

  def bounds(self, config) -> Tuple[Optional[float], Optional[float]]:
    def value(b):
      return config.get(b) if isinstance(b, str) else b
    return value(self.low), value(self.high)

  def valid(self, value, config) -> bool:
    if value in self.also and (validate.is_int(value) or not self.integer):
      return True
    if self.integer and not validate.is_int(value):
      return False
    if not self.integer and (isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)) or not math.isfinite(value)):
      return False
    low, high = self.bounds(config)
    if low is not None and (value <= low if self.low_open else value < low):
      return False
    if high is not None and (value >= high if self.high_open else value > high):
      return False
    return True

  def describe(self) -> str:
    kind = "an integer" if self.integer else "a number"
    low = None if self.low is None else f"{'>' if self.low_open else '>='} {self.low}"
    high = None if self.high is None else f"{'<' if self.high_open else '<='} {self.high}"
    text = f"{kind} {' and '.join(p for p in (low, high) if p)}".strip()
    if self.also:
      text += f" (or {', '.join(map(str, self.also))})"
    return text


@dataclasses.dataclass(frozen=True)
class OneOf:
  choices: Tuple[Any, ...]

  def valid(self, value, config) -> bool:  # pylint: disable=unused-argument
    return isinstance(value, str) and value in self.choices

  def describe(self) -> str:
    return "one of " + ", ".join(repr(c) if c == "" else c for c in self.choices)


@dataclasses.dataclass(frozen=True)
class Flag:
  def valid(self, value, config) -> bool:  # pylint: disable=unused-argument
    return isinstance(value, (bool, np.bool_))

  def describe(self) -> str:
    return "True or False"


@dataclasses.dataclass(frozen=True)
class Text:
  """A string; `check` (optional) raises its own one-line ValueError for a bad one."""
  check: Optional[Callable[[str, Any], None]] = None

  def valid(self, value, config) -> bool:
    if not isinstance(value, str):
      return False
    if self.check is not None:
      self.check(value, config)
    return True

  def describe(self) -> str:
    return "a string"


@dataclasses.dataclass(frozen=True)
class Epochs:
  """A tuple of integer epochs, each in [1, num_epochs] (milestones inside the run)."""

  def valid(self, value, config) -> bool:
    if not isinstance(value, (tuple, list)) or not all(validate.is_int(m) for m in value):
      return False
    if config.get("schedule", "multistep") != "multistep":
      return True  # only the multistep schedule uses them
    return all(1 <= m <= config.get("num_epochs", m) for m in value)

  def describe(self, config=None) -> str:
    """The rule, with an example that is valid for this config's num_epochs (half and three
    quarters of the run, the reference's 150 and 225 of 300)."""
    n = config.get("num_epochs", 300) if config is not None else 300
    example = (sorted({max(1, n // 2), max(1, 3 * n // 4)}) if validate.is_int(n) and n >= 1
               else [150, 225])
    example = f"({example[0]},)" if len(example) == 1 else f"({', '.join(map(str, example))})"
    return (f"integer epochs inside the run, each in [1, num_epochs={n}], e.g. "
            f"--config.milestones='{example}' (or change --config.num_epochs)")


@dataclasses.dataclass(frozen=True)
class Rule:
  field: str
  kind: Any
  why: str = ""  # replaces "it must be <kind>" when the reason is worth saying
  extra: Optional[Callable[[Any, Any], None]] = None  # a further check with its own message


# ----------------------------------------------------------------------------- custom checks


def _depth(value, config) -> None:
  """A depth of the model's family (6n+2 for the CIFAR ResNet, 6n+4 for WRN, ...); the family's
  options (width, growth_rate, ...) are checked with it, as they shape the same network."""
  model_spec.check_architecture(config.get("model", "one_resnet"), value, config)


def _method(value, config) -> None:
  """A method other than ONE needs a branched model (a baseline trains with cross-entropy);
  KDCL's and PCL's view per peer needs an in-memory dataset's pipeline."""
  kind = config.get("model", "one_resnet")
  if value in ("kdcl", "pcl") and config.get("dataset") in sources.IMAGENET_DATASETS:
    raise ValueError(f"method={value!r} feeds each peer its own augmentation, which the "
                     f"{config.dataset} pipeline does not draw (one crop per example): use "
                     "another method on it, or an in-memory dataset (CIFAR, SVHN, .npz)")
  if value != "one" and kind in model_spec.ARCHITECTURES and not model_spec.ARCHITECTURES[
      kind].branched:
    raise ValueError(f"method={value!r} trains several branches, and model={kind!r} has one: "
                     "use its branched kind (e.g. one_resnet for cifar_resnet), or "
                     "method='one' for a baseline")


def _active_branches(value, config) -> None:
  model_spec.parse_active_branches(value, config.num_branches)


def _compute_dtype(value, config) -> None:
  if value in models.COMPUTE_DTYPES:   # an unknown name gets the table's message
    models.resolve_compute_dtype(value, config.get("conv_impl", "auto"))


def _int_list(name):
  def check(value, config) -> None:  # pylint: disable=unused-argument
    parts = validate.comma_list(value)
    if not all(p.isdigit() for p in parts):
      raise ValueError(f"{name}={value!r} is invalid: give 0-based indices separated by commas, "
                       f"e.g. --config.{name}=0,1")
  return check


def _trunk_from(value, config) -> None:  # pylint: disable=unused-argument
  operations.parse_trunk_from(value)


def parse_profile_steps(value: str) -> Optional[Tuple[int, int]]:
  """'START,END' -> (START, END), the global steps (1-based) to trace; '' -> None."""
  if not value:
    return None
  parts = [p.strip() for p in value.split(",")]
  if len(parts) != 2 or not all(p.isdigit() for p in parts) or not (
      1 <= int(parts[0]) <= int(parts[1])):
    raise ValueError(f"profile_steps={value!r} is invalid: give the first and last global "
                     "step to trace, 1 <= START <= END, e.g. --config.profile_steps=20,30")
  return int(parts[0]), int(parts[1])


def _profile_steps(value, config) -> None:  # pylint: disable=unused-argument
  parse_profile_steps(value)


_POSITIVE_INT = Number(integer=True, low=1)
_COUNT = Number(integer=True, low=0)
_RATIO = Number(integer=False, low=0, high=1, high_open=True)

RULES: Sequence[Rule] = (
    # Model.
    Rule("model", OneOf(tuple(model_spec.ARCHITECTURES))),
    Rule("depth", Number(integer=True, low=8), extra=_depth),  # the family's: 6n+2, 6n+4, ...
    # Architecture options (model_spec.OPTIONS; 0 = the family's default): refused for a
    # family that does not take them (by the depth row's check, which reads them).
    Rule("width", _COUNT, why="it must be 0 (the default) or >= 1: WRN's widening factor k, "
         "VGG's channels of block 1, ResNeXt's stage-1 outputs / 64"),
    Rule("cardinality", _COUNT, why="it must be 0 (the default) or ResNeXt's groups >= 1"),
    Rule("group_width", _COUNT,
         why="it must be 0 (the default) or ResNeXt's channels per group >= 1"),
    Rule("growth_rate", _COUNT, why="it must be 0 (the default) or DenseNet's k >= 1"),
    Rule("bottleneck", Flag()),  # DenseNet: True = DenseNet-BC, False = the original DenseNet
    Rule("depth_rule", OneOf(("",) + cifar_resnet.DEPTH_RULES),
         why="it must be '' (the default, 'one'), 'one' (the ONE code's 6n+2) or 'peers' "
         "(9n+2 bottleneck depths, as OKDDip and PCL count)"),
    Rule("num_branches", _POSITIVE_INT,
         why="a model has at least one branch (--config.num_branches=1 or more)"),
    Rule("branch_impl", OneOf(tuple(models.BRANCH_IMPLS))),
    Rule("cpu_conv_library", OneOf(tuple(xla_options.CPU_CONV_LIBRARIES))),
    Rule("conv_impl", OneOf(tuple(kernels.CONV_IMPLS))),
    Rule("compute_dtype", OneOf(tuple(models.COMPUTE_DTYPES)), extra=_compute_dtype),
    Rule("active_branches", Text(_active_branches)),
    # Data.
    Rule("dataset", OneOf(tuple(sources.DATASETS))),
    Rule("num_classes", Number(integer=True, low=2),
         why="a classifier needs at least two classes"),
    Rule("npz_path", Text()),
    Rule("data_dir", Text()),
    Rule("download", Flag()),
    Rule("synthetic_train_size", _POSITIVE_INT),
    Rule("synthetic_test_size", _POSITIVE_INT),
    Rule("image_size", Number(integer=True, low=validate.MIN_IMAGE_SIZE),
         why=f"it must be the model's input side in pixels, >= {validate.MIN_IMAGE_SIZE} "
             "(ImageNet: 224)"),
    Rule("data_workers", _COUNT,
         why="it must be 0 (threads of this process) or the number of worker processes"),
    Rule("data_on_device", OneOf(tuple(device_data.MODES))),
    # Optimisation.
    Rule("batch_size", _POSITIVE_INT),
    Rule("eval_batch_size", _POSITIVE_INT),
    Rule("num_epochs", _POSITIVE_INT),
    Rule("lr", Number(integer=False, low=0, low_open=True)),
    Rule("momentum", _RATIO),
    Rule("weight_decay", Number(integer=False, low=0)),
    Rule("nesterov", Flag()),
    Rule("schedule", OneOf(tuple(optimizer.SCHEDULES))),
    Rule("milestones", Epochs()),
    Rule("gamma", Number(integer=False, low=0, low_open=True)),
    Rule("warmup_epochs", Number(integer=True, low=0, high="num_epochs", high_open=True)),
    Rule("geo_lr", _COUNT, why="it must be 0 (off) or the period k >= 1 of the factors"),
    Rule("geo_lr_max", Number(integer=False, low=0, low_open=True)),
    Rule("geo_lr_min", Number(integer=False, low=0, low_open=True, high="geo_lr_max")),
    Rule("geo_lr_ema", _RATIO),
    Rule("steps_per_epoch", Number(integer=True, low=1, also=(-1,)),
         why="it must be -1 (every step of the data) or a positive cap"),
    # The method and its loss.
    Rule("method", OneOf(tuple(models.ENSEMBLES)), extra=_method),
    Rule("temperature", Number(integer=False, low=0, low_open=True),
         why="it must be > 0 (the logits are divided by it; the reference uses 3)"),
    Rule("rampup_epochs", Number(integer=False, low=0),
         why="it must be a number of epochs >= 0 (0: full KL weight from the start)"),
    Rule("kl_scale", Number(integer=False, low=0)),
    Rule("ensemble_ce", Flag()),
    Rule("stop_gradient", Flag()),
    Rule("cl_ilr_temperature", Number(integer=False, low=0, low_open=True),
         why="it must be > 0 (the logits are divided by it; the OKDDip code uses 3)"),
    Rule("cl_ilr_kl_scale", Number(integer=False, low=0)),
    Rule("cl_ilr_ce_weight", Number(integer=False, low=0)),
    Rule("cl_ilr_detach", Flag()),
    Rule("cl_ilr_backprop_scale", Flag()),
    Rule("okddip_temperature", Number(integer=False, low=0, low_open=True),
         why="it must be > 0 (the logits are divided by it; the OKDDip code uses 3)"),
    Rule("okddip_kl_scale", Number(integer=False, low=0)),
    Rule("okddip_detach", Flag()),
    Rule("dml_temperature", Number(integer=False, low=0, low_open=True),
         why="it must be > 0 (the logits are divided by it; the DML paper uses 1)"),
    Rule("dml_kl_scale", Number(integer=False, low=0)),
    Rule("dml_rampup_epochs", Number(integer=False, low=0),
         why="it must be a number of epochs >= 0 (0: full KL weight from the start)"),
    Rule("dml_target", OneOf(losses.DML_TARGETS)),
    Rule("dml_detach", Flag()),
    Rule("kdcl_temperature", Number(integer=False, low=0, low_open=True),
         why="it must be > 0 (the logits are divided by it; the KDCL code uses 4)"),
    Rule("ffl_temperature", Number(integer=False, low=0, low_open=True),
         why="it must be > 0 (the logits are divided by it; the FFL code uses 3)"),
    Rule("ffl_kl_scale", Number(integer=False, low=0)),
    Rule("pcl_temperature", Number(integer=False, low=0, low_open=True),
         why="it must be > 0 (the logits are divided by it; the PCL code uses 3)"),
    Rule("pcl_kl_scale", Number(integer=False, low=0)),
    Rule("pcl_ema_decay", Number(integer=False, low=0, high=1, high_open=True),
         why="it must be in [0, 1) (the temporal mean's largest decay; the PCL code uses 0.999)"),
    Rule("kdcl_alpha", Number(integer=False, low=0, high=1),
         why="it weighs KL against cross-entropy: between 0 and 1 (the KDCL code uses 0.5)"),
    # Run.
    Rule("seed", Number(integer=True, low=0, high=2**32 - 1)),
    Rule("deterministic", Flag()),
    Rule("keep_checkpoints", _POSITIVE_INT),
    Rule("init_from", Text()),
    Rule("init_optimizer_state", Flag()),
    Rule("eval_only", Flag()),
    Rule("vote", Flag()),
    Rule("progress_bar", Flag()),
    Rule("compilation_cache_dir", Text()),
    Rule("steps_per_dispatch", _POSITIVE_INT,
         why="it must be a positive integer: the train steps of one jitted call (1 = one each)"),
    Rule("log_every_steps", _COUNT, why="it must be 0 (off) or the period >= 1 in steps"),
    Rule("profile_steps", Text(_profile_steps)),
    Rule("resume_fallback", Flag()),
    Rule("new_run", Flag()),
    Rule("adopt_checkpoints", Flag()),
    Rule("variant", Text()),
    # Step 2 (configs/step2.py).
    Rule("source", Text()),
    Rule("sources", Text()),
    Rule("surgery", OneOf(tuple(two_stage.SURGERIES))),
    Rule("expand_mode", OneOf(("copy", "fresh"))),
    Rule("expand_from", Text(_int_list("expand_from"))),
    Rule("trunk_from", Text(_trunk_from)),
    Rule("symmetry_noise", Number(integer=False, low=0)),
    Rule("symmetry_break", OneOf(tuple(two_stage.SYMMETRY_BREAKS))),
    Rule("reset_optimizer", Flag()),
)
FIELDS = tuple(r.field for r in RULES)


def _kind(rule: Rule):
  return rule.kind


def kind_of(field: str):
  """The checked kind of a field (Number, OneOf, Flag, Text or Epochs), for docs and tests."""
  return _kind(next(r for r in RULES if r.field == field))


def check(config) -> None:
  """Raises a one-line ValueError for the first field of config outside its valid values.

  Fields the config lacks are skipped (configs of older versions, library configs).
  """
  for rule in RULES:
    if rule.field not in config:
      continue
    value = config[rule.field]
    if rule.extra is not None:
      rule.extra(value, config)
    kind = _kind(rule)
    if kind.valid(value, config):
      continue
    if isinstance(kind, OneOf):
      raise ValueError(f"{rule.field}={value!r} is unknown: use {kind.describe()}")
    raise ValueError(f"{rule.field}={value!r} is invalid: " + (
        rule.why or f"it must be {_describe(kind, config)}"))


def _describe(kind, config) -> str:
  return kind.describe(config) if isinstance(kind, Epochs) else kind.describe()

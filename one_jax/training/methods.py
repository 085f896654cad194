"""The learning method of a run: what training asks a model's method for, in one place.

Training never branches on the kind of model. It asks the run's `Method` for:

  loss(output, labels, epoch, weights)  the scalar to minimise and its named terms
  head_logits(output)                   the named outputs whose accuracy is measured
  heads                                 the names of the evaluated heads, derived ones included
  with_derived(metrics, split)          the derived metrics (the branches' mean accuracy)
  epoch_metrics(epoch)                  per-epoch scalars the method logs (the KL weight)
  best_metric                           the metric that picks the best checkpoint
  update_mask                           the branches that are updated (None: all)
  votes                                 whether voting over branches applies
  views                                 augmentations of each training example per step

`for_model(config, spec)` picks the method of a model (spec.method, which the config's
`method` field sets); it is the one place that knows which model learns how. A new method is a
class here (its loss in one_jax.training.losses), its entry in METHODS (its options and the
config fields that set them), and what its model has besides trunk and branches
(architectures/models.py ENSEMBLES).
"""
import dataclasses
from typing import Any, Dict, FrozenSet, List, Optional, Tuple

import jax
import numpy as np

from one_jax.architectures import model_spec
from one_jax.training import losses


@dataclasses.dataclass(frozen=True)
class CrossEntropy:
  """A single-branch model (a baseline) trained with cross-entropy: one head, 'model'."""
  spec: model_spec.ModelSpec

  heads = ("model",)
  deployed_head = "model"
  views = 1
  best_metric = f"test/top1/{deployed_head}"
  update_mask = None
  votes = False

  def loss(self, output, labels, epoch, weights=None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    del epoch  # the same loss in every epoch
    return losses.baseline_loss(output, labels, weights=weights)

  def head_logits(self, output) -> Dict[str, jax.Array]:
    return {"model": output}

  def with_derived(self, metrics: Dict[str, float], split: str) -> Dict[str, float]:
    del split
    return metrics

  def epoch_metrics(self, epoch) -> Dict[str, float]:
    del epoch
    return {"kl_weight": 0.0}


class _Branches:
  """What every branched method shares: heads 'branch_b', the method's ensemble head, and the
  branches' mean accuracy 'mean_branch'; the active-branch update mask; voting."""
  ensemble_head = "ensemble"
  deployed_head = "ensemble"   # the head a trained model deploys; it picks the best checkpoint
  votes = True
  views = 1                    # augmentations of each example per step (KDCL: one per peer)

  @property
  def best_metric(self) -> str:
    return f"test/top1/{self.deployed_head}"

  extra_heads: Tuple[str, ...] = ()   # the method's heads besides branches and ensemble

  @property
  def heads(self) -> Tuple[str, ...]:
    return tuple(f"branch_{b}" for b in range(self.spec.num_branches)) + (
        self.ensemble_head,) + self.extra_heads + ("mean_branch",)

  @property
  def update_mask(self) -> Optional[Tuple[bool, ...]]:
    return self.spec.active_branches

  def head_logits(self, output) -> Dict[str, jax.Array]:
    named = {f"branch_{b}": output.branch_logits[b] for b in range(self.spec.num_branches)}
    named[self.ensemble_head] = output.ensemble_logits
    return named

  def with_derived(self, metrics: Dict[str, float], split: str) -> Dict[str, float]:
    """Adds '{split}/top{k}/mean_branch', the mean of the branches' accuracies."""
    metrics = dict(metrics)
    for k in ((1, 5) if split == "test" else (1,)):
      keys: List[str] = [f"{split}/top{k}/branch_{b}" for b in range(self.spec.num_branches)
                         if f"{split}/top{k}/branch_{b}" in metrics]
      if keys:
        metrics[f"{split}/top{k}/mean_branch"] = float(np.mean([metrics[x] for x in keys]))
    return metrics

  def epoch_metrics(self, epoch) -> Dict[str, float]:
    return {"kl_weight": float(losses.kl_weight(epoch, self.rampup_epochs) * self.kl_scale)}


@dataclasses.dataclass(frozen=True)
class One(_Branches):
  """ONE (Lan et al., 2018): B branches on a shared trunk, each distilled from the gated
  ensemble (losses.one_loss); heads 'branch_b', 'ensemble' (deployed) and the branches' mean."""
  spec: model_spec.ModelSpec
  temperature: float = 3.0
  rampup_epochs: float = 80.0
  kl_scale: float = 1.0
  ensemble_ce: bool = True
  stop_gradient: bool = True

  def loss(self, output, labels, epoch, weights=None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    return losses.one_loss(output, labels, epoch=epoch, temperature=self.temperature,
                           rampup_epochs=self.rampup_epochs, kl_scale=self.kl_scale,
                           ensemble_ce=self.ensemble_ce, stop_gradient=self.stop_gradient,
                           active_branches=self.spec.active_branches, weights=weights)


@dataclasses.dataclass(frozen=True)
class ClIlr(_Branches):
  """CL-ILR (Song & Chai, 2018): B branches on a shared trunk, each distilled from the mean of
  the others (losses.cl_ilr_loss); no gate. Heads 'branch_b' and 'peers_mean' (the mean of all
  branches' logits: deployed, picks the best checkpoint). ILR, the 1/B gradient into the trunk,
  is the model's (ModelSpec.trunk_grad_scale)."""
  spec: model_spec.ModelSpec
  temperature: float = 3.0
  rampup_epochs: float = 80.0
  kl_scale: float = 1.0
  ce_weight: float = 1.0
  detach: bool = False

  ensemble_head = deployed_head = "peers_mean"

  def loss(self, output, labels, epoch, weights=None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    return losses.cl_ilr_loss(output, labels, epoch=epoch, temperature=self.temperature,
                              rampup_epochs=self.rampup_epochs, kl_scale=self.kl_scale,
                              ce_weight=self.ce_weight, detach=self.detach,
                              active_branches=self.spec.active_branches, weights=weights)


@dataclasses.dataclass(frozen=True)
class Okddip(_Branches):
  """OKDDip (Chen et al., 2020): peers on a shared trunk distilled from attention-weighted
  targets, and a group leader (the last branch) distilled from the peers' mean
  (losses.okddip_loss). Heads 'branch_b' (the leader's too), 'peers_mean' and 'leader' (the
  deployed model: it picks the best checkpoint)."""
  spec: model_spec.ModelSpec
  temperature: float = 3.0
  rampup_epochs: float = 80.0
  kl_scale: float = 1.0
  detach: bool = False

  ensemble_head = "peers_mean"
  deployed_head = "leader"

  extra_heads = ("leader",)

  def head_logits(self, output) -> Dict[str, jax.Array]:
    return dict(super().head_logits(output), leader=output.branch_logits[-1])

  def loss(self, output, labels, epoch, weights=None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    return losses.okddip_loss(output, labels, epoch=epoch, temperature=self.temperature,
                              rampup_epochs=self.rampup_epochs, kl_scale=self.kl_scale,
                              detach=self.detach, active_branches=self.spec.active_branches,
                              weights=weights)


@dataclasses.dataclass(frozen=True)
class Dml(_Branches):
  """DML (Zhang et al., 2018): B independent networks (the model's branches start at the
  input), each distilled from the others (losses.dml_loss). Heads 'branch_b' and 'peers_mean'
  (the mean of their logits: deployed, picks the best checkpoint)."""
  spec: model_spec.ModelSpec
  temperature: float = 1.0
  rampup_epochs: float = 0.0
  kl_scale: float = 1.0
  target: str = "pairwise"
  detach: bool = True

  ensemble_head = deployed_head = "peers_mean"

  def loss(self, output, labels, epoch, weights=None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    return losses.dml_loss(output, labels, epoch=epoch, temperature=self.temperature,
                           rampup_epochs=self.rampup_epochs, kl_scale=self.kl_scale,
                           target=self.target, detach=self.detach,
                           active_branches=self.spec.active_branches, weights=weights)


@dataclasses.dataclass(frozen=True)
class Kdcl(_Branches):
  """KDCL (Guo et al., 2020), the naive ensemble: B independent networks, each fed its own
  augmentation of the batch (views = B) and distilled from the detached mean of all peers'
  logits (losses.kdcl_loss). Heads 'branch_b' and 'peers_mean' (deployed)."""
  spec: model_spec.ModelSpec
  temperature: float = 4.0
  alpha: float = 0.5

  ensemble_head = deployed_head = "peers_mean"
  rampup_epochs = 0.0   # none: the KL's weight is alpha from the first step

  @property
  def kl_scale(self) -> float:
    return self.alpha

  @property
  def views(self) -> int:
    return self.spec.num_branches

  def loss(self, output, labels, epoch, weights=None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    del epoch  # no ramp-up
    return losses.kdcl_loss(output, labels, temperature=self.temperature, alpha=self.alpha,
                            active_branches=self.spec.active_branches, weights=weights)


@dataclasses.dataclass(frozen=True)
class Ffl(_Branches):
  """FFL-S (Kim et al., 2019): B branches on a shared trunk and a fusion module over their last
  feature maps whose fused classifier is the ensemble (losses.ffl_loss). Heads 'branch_b',
  'fused' (deployed: it picks the best checkpoint) and 'peers_mean'."""
  spec: model_spec.ModelSpec
  temperature: float = 3.0
  rampup_epochs: float = 80.0
  kl_scale: float = 1.0

  ensemble_head = deployed_head = "fused"

  extra_heads = ("peers_mean",)

  def head_logits(self, output) -> Dict[str, jax.Array]:
    return dict(super().head_logits(output),
                peers_mean=jax.numpy.einsum("nb,bnc->nc", output.gate, output.branch_logits))

  def loss(self, output, labels, epoch, weights=None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    return losses.ffl_loss(output, labels, epoch=epoch, temperature=self.temperature,
                           rampup_epochs=self.rampup_epochs, kl_scale=self.kl_scale,
                           active_branches=self.spec.active_branches, weights=weights)


@dataclasses.dataclass(frozen=True)
class Pcl(_Branches):
  """PCL (Wu & Gong, 2021): B peers on a shared trunk, each fed its own augmentation of the
  batch (views = B), distilled from the peer-ensemble teacher (a fusion classifier on their
  concatenated pooled features: 'fused') and from the other peers' temporal means
  (losses.pcl_loss). The model's temporal mean (training/temporal_mean.py) is deployed: heads
  'branch_b' and 'fused' (the live model), 'temporal_b' (each temporal-mean peer) and
  'temporal_ensemble' (their logits' mean: deployed, picks the best checkpoint); derived, the
  live peers' 'mean_branch' and the temporal-mean peers' 'mean_temporal'."""
  spec: model_spec.ModelSpec
  temperature: float = 3.0
  rampup_epochs: float = 80.0
  kl_scale: float = 1.0
  max_decay: float = 0.999

  ensemble_head = "fused"
  deployed_head = "temporal_ensemble"

  @property
  def heads(self) -> Tuple[str, ...]:
    temporal = tuple(f"temporal_{b}" for b in range(self.spec.num_branches))
    return super().heads + temporal + (self.deployed_head, "mean_temporal")

  @property
  def views(self) -> int:
    return self.spec.num_branches

  def head_logits(self, output) -> Dict[str, jax.Array]:
    named = super().head_logits(output)
    temporal = output.temporal_logits
    named.update({f"temporal_{b}": temporal[b] for b in range(self.spec.num_branches)})
    named[self.deployed_head] = jax.numpy.einsum("nb,bnc->nc", output.gate, temporal)
    return named

  def with_derived(self, metrics: Dict[str, float], split: str) -> Dict[str, float]:
    """Adds 'mean_branch' and '{split}/top{k}/mean_temporal' (the temporal-mean peers')."""
    metrics = super().with_derived(metrics, split)
    for k in ((1, 5) if split == "test" else (1,)):
      keys = [f"{split}/top{k}/temporal_{b}" for b in range(self.spec.num_branches)]
      if all(key in metrics for key in keys):
        metrics[f"{split}/top{k}/mean_temporal"] = float(np.mean([metrics[x] for x in keys]))
    return metrics

  def loss(self, output, labels, epoch, weights=None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    return losses.pcl_loss(output, labels, epoch=epoch, temperature=self.temperature,
                           rampup_epochs=self.rampup_epochs, kl_scale=self.kl_scale,
                           active_branches=self.spec.active_branches, weights=weights)


Method = Any  # One | ClIlr | Okddip | Dml | Kdcl | Ffl | Pcl | CrossEntropy: the docstring's
              # interface

# config.method -> (its class, {its option: the config field that sets it}). ONE's fields keep
# their historical names; every other method's carry its name (the shared ramp-up
# 'rampup_epochs' but for DML, which has none by default).
METHODS = {
    "one": (One, dict(temperature="temperature", rampup_epochs="rampup_epochs",
                      kl_scale="kl_scale", ensemble_ce="ensemble_ce",
                      stop_gradient="stop_gradient")),
    "cl_ilr": (ClIlr, dict(temperature="cl_ilr_temperature", rampup_epochs="rampup_epochs",
                           kl_scale="cl_ilr_kl_scale", ce_weight="cl_ilr_ce_weight",
                           detach="cl_ilr_detach")),
    "okddip": (Okddip, dict(temperature="okddip_temperature", rampup_epochs="rampup_epochs",
                            kl_scale="okddip_kl_scale", detach="okddip_detach")),
    "dml": (Dml, dict(temperature="dml_temperature", rampup_epochs="dml_rampup_epochs",
                      kl_scale="dml_kl_scale", target="dml_target", detach="dml_detach")),
    "kdcl": (Kdcl, dict(temperature="kdcl_temperature", alpha="kdcl_alpha")),
    "ffl": (Ffl, dict(temperature="ffl_temperature", rampup_epochs="rampup_epochs",
                      kl_scale="ffl_kl_scale")),
    "pcl": (Pcl, dict(temperature="pcl_temperature", rampup_epochs="rampup_epochs",
                      kl_scale="pcl_kl_scale", max_decay="pcl_ema_decay")),
}


# Config fields that a method's model reads (architectures/model_spec.py), besides its loss
# options above.
MODEL_FIELDS = {"cl_ilr": ("cl_ilr_backprop_scale",)}


def config_fields(method: Optional[str]) -> FrozenSet[str]:
  """The method-specific config fields that a run of `method` reads (None, a baseline: none)."""
  if method is None:
    return frozenset()
  return frozenset(METHODS[method][1].values()) | frozenset(MODEL_FIELDS.get(method, ()))


def unread_fields(method: Optional[str]) -> FrozenSet[str]:
  """The other methods' config fields: whatever their values, a run of `method` computes the
  same (a report neither groups nor labels its runs by them)."""
  every = frozenset().union(*(config_fields(m) for m in METHODS))
  return every - config_fields(method)


def deployed_head(method: Optional[str]) -> str:
  """The head a model of `method` deploys and picks its best checkpoint by: ONE's ensemble,
  CL-ILR's, DML's and KDCL's peers' mean, OKDDip's leader, FFL's fused classifier, PCL's
  temporal-mean peers' ensemble, a baseline's (method None) model."""
  return (CrossEntropy if method is None else METHODS[method][0]).deployed_head


def branch_count(method: str, peers: int) -> int:
  """The branches of a `method` model with `peers` peers, as comparisons count them (B = 3:
  three students): OKDDip's group leader is one more (its papers' 3 peers + 1 leader)."""
  return peers + 1 if method == "okddip" else peers


def for_model(config, spec: model_spec.ModelSpec) -> Method:
  """The method that trains and evaluates `spec` (its spec.method) under `config`'s settings;
  a field the config lacks keeps the method's default."""
  if not spec.branched:
    return CrossEntropy(spec)
  cls, fields = METHODS[spec.method]
  return cls(spec, **{option: config[field] for option, field in fields.items()
                      if field in config})

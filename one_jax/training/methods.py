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

`for_model(config, spec)` picks the method of a model; it is the one place that knows which
model kind learns how. A new method is a class here (its loss in one_jax.training.losses) and
one line in `for_model`.
"""
import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np

from one_jax.architectures import model_spec
from one_jax.training import losses


@dataclasses.dataclass(frozen=True)
class CrossEntropy:
  """A single-branch model (a baseline) trained with cross-entropy: one head, 'model'."""
  spec: model_spec.ModelSpec

  heads = ("model",)
  best_metric = "test/top1/model"
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


@dataclasses.dataclass(frozen=True)
class One:
  """ONE (Lan et al., 2018): B branches on a shared trunk, each distilled from the gated
  ensemble (losses.one_loss); heads 'branch_b', 'ensemble' and the branches' mean."""
  spec: model_spec.ModelSpec
  temperature: float = 3.0
  rampup_epochs: float = 80.0
  kl_scale: float = 1.0
  ensemble_ce: bool = True
  stop_gradient: bool = True

  best_metric = "test/top1/ensemble"
  votes = True

  @property
  def heads(self) -> Tuple[str, ...]:
    return tuple(f"branch_{b}" for b in range(self.spec.num_branches)) + (
        "ensemble", "mean_branch")

  @property
  def update_mask(self) -> Optional[Tuple[bool, ...]]:
    return self.spec.active_branches

  def loss(self, output, labels, epoch, weights=None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    return losses.one_loss(output, labels, epoch=epoch, temperature=self.temperature,
                           rampup_epochs=self.rampup_epochs, kl_scale=self.kl_scale,
                           ensemble_ce=self.ensemble_ce, stop_gradient=self.stop_gradient,
                           active_branches=self.spec.active_branches, weights=weights)

  def head_logits(self, output) -> Dict[str, jax.Array]:
    named = {f"branch_{b}": output.branch_logits[b] for b in range(self.spec.num_branches)}
    named["ensemble"] = output.ensemble_logits
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


Method = Any  # CrossEntropy | One: the interface of the module docstring


def for_model(config, spec: model_spec.ModelSpec) -> Method:
  """The method that trains and evaluates `spec` under `config`'s loss settings."""
  if not spec.branched:
    return CrossEntropy(spec)
  return One(spec, temperature=config.temperature, rampup_epochs=config.rampup_epochs,
             kl_scale=config.kl_scale, ensemble_ce=config.ensemble_ce,
             stop_gradient=config.stop_gradient)

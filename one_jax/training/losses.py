"""The methods' losses (DESIGN.md section 3): ONE's, CL-ILR's, OKDDip's, DML's, KDCL's, FFL's,
PCL's and the baseline's cross-entropy. ONE's:

    L = sum_b CE(z_b, y) + CE(e, y) + w(epoch) * sum_b T^2 KL(softmax(sg(e)/T) || softmax(z_b/T))

KL follows the reference exactly: the teacher probabilities get +1e-7 before the log
(and are not renormalised), summed over classes, averaged over the batch.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from one_jax.architectures import layers

REFERENCE_TEACHER_EPS = 1e-7


def kl_weight(epoch, rampup_epochs: float = 80.0):
  """Sigmoid-shaped ramp-up exp(-5 (1 - clip(epoch / R, 0, 1))^2); R = 0 gives 1.

  In the default float type (float64 where x64 is enabled, as the reference's Python float).
  """
  if rampup_epochs <= 0:
    return jnp.ones_like(jnp.asarray(epoch, float))
  phase = 1.0 - jnp.clip(jnp.asarray(epoch, float) / rampup_epochs, 0.0, 1.0)
  return jnp.exp(-5.0 * phase * phase)


def _mean_over_examples(values, weights):
  """Mean over examples; `weights` (0/1) leaves out padding examples when given."""
  if weights is None:
    return jnp.mean(values)
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def cross_entropy(logits, labels, weights=None):
  """Mean softmax cross-entropy with integer labels, as torch.nn.CrossEntropyLoss."""
  log_probs = jax.nn.log_softmax(layers.at_least_float32(logits), axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  return _mean_over_examples(nll, weights)


def distillation_kl(student_logits, teacher_logits, temperature: float,
                    teacher_eps: float = REFERENCE_TEACHER_EPS, weights=None):
  """T^2 * KL(softmax(teacher/T) + eps || softmax(student/T)), summed over classes. With eps 0
  (torch's KLDivLoss on softmax targets) the teacher's log is its log_softmax: a class whose
  probability underflows to 0 adds 0, not NaN."""
  scaled_teacher = layers.at_least_float32(teacher_logits) / temperature
  teacher = jax.nn.softmax(scaled_teacher, axis=-1) + teacher_eps
  log_teacher = (jax.nn.log_softmax(scaled_teacher, axis=-1) if teacher_eps == 0
                 else jnp.log(teacher))
  log_student = jax.nn.log_softmax(layers.at_least_float32(student_logits) / temperature, axis=-1)
  per_example = jnp.sum(teacher * (log_teacher - log_student), axis=-1)
  return temperature ** 2 * _mean_over_examples(per_example, weights)


def _members(output, active_branches) -> List[int]:
  """The branches a loss includes: all, or those the static mask marks active."""
  num_branches = output.branch_logits.shape[0]
  return [b for b in range(num_branches) if active_branches is None or active_branches[b]]


def _branch_cross_entropies(output, labels, members, weights):
  """({'ce_branch_b': CE(z_b, y)} of the member branches, their sum): every method's first
  terms. The sum starts as a float32 zero, promoted to float64 by float64 terms."""
  terms = {f"ce_branch_{b}": cross_entropy(output.branch_logits[b], labels, weights)
           for b in members}
  return terms, sum(terms.values(), jnp.zeros((), jnp.float32))


def _kl_sum(pairs, temperature, teacher_eps, weights):
  """sum of KL_T(student, teacher) over (student, teacher) pairs, from a float32 zero."""
  return sum((distillation_kl(s, t, temperature, teacher_eps, weights) for s, t in pairs),
             jnp.zeros((), jnp.float32))


def one_loss(output, labels, *, epoch, temperature: float = 3.0, rampup_epochs: float = 80.0,
             kl_scale: float = 1.0, ensemble_ce: bool = True, stop_gradient: bool = True,
             active_branches: Optional[Sequence[bool]] = None,
             teacher_eps: float = REFERENCE_TEACHER_EPS,
             weights=None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """The ONE objective for a models.OneOutput; returns (loss, named terms).

  Args:
    output: models.OneOutput (branch_logits [B, N, C], gate [N, B], ensemble_logits [N, C]).
    labels: int [N].
    epoch: the (possibly fractional) epoch for the KL ramp-up.
    temperature: T of the distillation softmax.
    rampup_epochs: R of the ramp-up; 0 disables it (weight 1).
    kl_scale: a constant multiplier on the KL term (0 turns distillation off).
    ensemble_ce: include CE(ensemble, y).
    stop_gradient: the teacher is a constant in the KL term (the reference's behaviour).
    active_branches: optional static mask; inactive branches are left out of every term.
    teacher_eps: added to the teacher probabilities before the log (reference: 1e-7).
    weights: optional per-example 0/1 weights (padding), [N].

  Terms: 'ce_branch_b' per branch, 'ce_branches' (their sum), 'ce_ensemble', 'kl' (the
  unweighted sum over branches), 'kl_weight' (w(epoch) * kl_scale) and 'loss'.
  """
  members = _members(output, active_branches)
  teacher = output.ensemble_logits
  if stop_gradient:
    teacher = jax.lax.stop_gradient(teacher)
  terms, ce_sum = _branch_cross_entropies(output, labels, members, weights)
  kl_sum = _kl_sum([(output.branch_logits[b], teacher) for b in members], temperature,
                   teacher_eps, weights)
  ce_ens = cross_entropy(output.ensemble_logits, labels, weights)
  weight = kl_weight(epoch, rampup_epochs) * kl_scale
  loss = ce_sum + weight * kl_sum
  if ensemble_ce:
    loss = loss + ce_ens
  terms.update(ce_branches=ce_sum, ce_ensemble=ce_ens, kl=kl_sum, kl_weight=weight, loss=loss)
  return loss, terms


def cl_ilr_loss(output, labels, *, epoch, temperature: float = 3.0, rampup_epochs: float = 80.0,
                kl_scale: float = 1.0, ce_weight: float = 1.0, detach: bool = False,
                active_branches: Optional[Sequence[bool]] = None,
                teacher_eps: float = REFERENCE_TEACHER_EPS,
                weights=None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Collaborative learning (Song & Chai, 2018): each branch distilled from the mean of the
  OTHER branches' logits; no cross-entropy on an ensemble.

    L = ce_weight * sum_b CE(z_b) + kl_scale * w(epoch) * sum_b KL_T(z_b, t_b),
    t_b = mean_{j != b} z_j

  With the defaults (T = 3, kl_scale 1, ce_weight 1, targets not detached) it is the OKDDip
  code's CL (`train_one.py --avg`); MCL-OKD's is ce_weight 0.5, kl_scale 0.5, T = 2, detach.
  Not detached, a branch's KL term also trains the branches its target is made of. Inactive
  branches (active_branches False) are left out of every term and of the others' targets.

  Terms: 'ce_branch_b', 'ce_branches' (their sum), 'kl' (the unweighted sum over branches),
  'kl_weight' (w(epoch) * kl_scale) and 'loss'.
  """
  members = _members(output, active_branches)
  z = output.branch_logits
  stop = jax.lax.stop_gradient if detach else (lambda t: t)
  terms, ce_sum = _branch_cross_entropies(output, labels, members, weights)
  pairs = []
  for b in members:
    others = [j for j in members if j != b]
    if others:
      pairs.append((z[b], stop(sum(z[j] for j in others) / len(others))))
  kl_sum = _kl_sum(pairs, temperature, teacher_eps, weights)
  weight = kl_weight(epoch, rampup_epochs) * kl_scale
  loss = ce_weight * ce_sum + weight * kl_sum
  terms.update(ce_branches=ce_sum, kl=kl_sum, kl_weight=weight, loss=loss)
  return loss, terms


def okddip_loss(output, labels, *, epoch, temperature: float = 3.0, rampup_epochs: float = 80.0,
                kl_scale: float = 1.0, detach: bool = False,
                active_branches: Optional[Sequence[bool]] = None,
                teacher_eps: float = REFERENCE_TEACHER_EPS,
                weights=None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """OKDDip (Chen et al., 2020): peers 0..B-2 distilled from their attention targets
  (output.peer_targets), the leader B-1 from the peers' mean (output.ensemble_logits).

    L = sum_b CE(z_b) + kl_scale * w(epoch) * [sum_{i<B-1} KL_T(z_i, t_i) + KL_T(z_L, mean_i z_i)]

  With the defaults (T = 3, kl_scale 1, targets not detached: the KL terms are what trains the
  attention's projections at all) it is the OKDDip code's `train_GL.py`; detach=True makes
  every target a constant. Inactive branches are left out of every term (and the model leaves
  inactive peers out of the targets).

  Terms: 'ce_branch_b', 'ce_branches' (their sum, the leader's included), 'kl' (the peers'
  unweighted sum), 'kl_leader', 'kl_weight' (w(epoch) * kl_scale) and 'loss'.
  """
  members = _members(output, active_branches)
  leader = output.branch_logits.shape[0] - 1
  z = output.branch_logits
  stop = jax.lax.stop_gradient if detach else (lambda t: t)
  terms, ce_sum = _branch_cross_entropies(output, labels, members, weights)
  kl_sum = _kl_sum([(z[b], stop(output.peer_targets[b])) for b in members if b < leader],
                   temperature, teacher_eps, weights)
  kl_leader = _kl_sum([(z[leader], stop(output.ensemble_logits))] if leader in members else [],
                      temperature, teacher_eps, weights)
  weight = kl_weight(epoch, rampup_epochs) * kl_scale
  loss = ce_sum + weight * (kl_sum + kl_leader)
  terms.update(ce_branches=ce_sum, kl=kl_sum, kl_leader=kl_leader, kl_weight=weight, loss=loss)
  return loss, terms


DML_TARGETS = ("pairwise", "others_mean")


def dml_loss(output, labels, *, epoch, temperature: float = 1.0, rampup_epochs: float = 0.0,
             kl_scale: float = 1.0, target: str = "pairwise", detach: bool = True,
             active_branches: Optional[Sequence[bool]] = None,
             teacher_eps: float = REFERENCE_TEACHER_EPS,
             weights=None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Deep mutual learning (Zhang et al., 2018) over independent peers:

    pairwise:     L = sum_b CE(z_b) + kl_scale * w(epoch) * sum_b mean_{j != b} KL_T(z_b, z_j)
    others_mean:  L = sum_b CE(z_b) + kl_scale * w(epoch) * sum_b KL_T(z_b, mean_{j != b} z_j)

  The defaults are the paper's (pairwise, T = 1, each peer's targets constants, no ramp-up);
  the OKDDip code's `train_DML.py` is others_mean (pairwise with --type), detach False, T 3;
  MCL-OKD's is pairwise, detached, T 2. Inactive branches are left out of every term and of
  the others' targets.

  Terms: 'ce_branch_b', 'ce_branches' (their sum), 'kl' (the unweighted sum over branches),
  'kl_weight' (w(epoch) * kl_scale) and 'loss'.
  """
  if target not in DML_TARGETS:
    raise ValueError(f"dml target={target!r} is unknown: use one of {', '.join(DML_TARGETS)}")
  members = _members(output, active_branches)
  stop = jax.lax.stop_gradient if detach else (lambda t: t)
  z = output.branch_logits
  terms, ce_sum = _branch_cross_entropies(output, labels, members, weights)
  kl_sum = jnp.zeros((), jnp.float32)
  for b in members:
    others = [j for j in members if j != b]
    if others and target == "pairwise":
      kl_sum = kl_sum + _kl_sum([(z[b], stop(z[j])) for j in others], temperature, teacher_eps,
                                weights) / len(others)
    elif others:
      kl_sum = kl_sum + _kl_sum([(z[b], stop(sum(z[j] for j in others) / len(others)))],
                                temperature, teacher_eps, weights)
  weight = kl_weight(epoch, rampup_epochs) * kl_scale
  loss = ce_sum + weight * kl_sum
  terms.update(ce_branches=ce_sum, kl=kl_sum, kl_weight=weight, loss=loss)
  return loss, terms


def kdcl_loss(output, labels, *, temperature: float = 4.0, alpha: float = 0.5,
              active_branches: Optional[Sequence[bool]] = None,
              teacher_eps: float = REFERENCE_TEACHER_EPS,
              weights=None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """KDCL (Guo et al., 2020), its naive ensemble: every peer distilled from the detached mean
  of all (active) peers' logits, output.ensemble_logits:

    L = sum_b [(1 - alpha) CE(z_b) + alpha KL_T(z_b, sg(mean_j z_j))]

  as the KDCL reproduction's train.py (T = 4, alpha = 0.5, no ramp-up; its KL has no 1e-7 on
  the teacher, which moves the loss by about 1e-7). Each peer sees its own augmentation of the
  batch: the model's input, not the loss.

  Terms: 'ce_branch_b', 'ce_branches' (their sum), 'kl' (the unweighted sum over peers),
  'kl_weight' (alpha) and 'loss'.
  """
  members = _members(output, active_branches)
  teacher = jax.lax.stop_gradient(output.ensemble_logits)
  terms, ce_sum = _branch_cross_entropies(output, labels, members, weights)
  kl_sum = _kl_sum([(output.branch_logits[b], teacher) for b in members], temperature,
                   teacher_eps, weights)
  loss = (1.0 - alpha) * ce_sum + alpha * kl_sum
  terms.update(ce_branches=ce_sum, kl=kl_sum, kl_weight=jnp.asarray(alpha, jnp.float32),
               loss=loss)
  return loss, terms


def ffl_loss(output, labels, *, epoch, temperature: float = 3.0, rampup_epochs: float = 80.0,
             kl_scale: float = 1.0, active_branches: Optional[Sequence[bool]] = None,
             teacher_eps: float = REFERENCE_TEACHER_EPS,
             weights=None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """FFL-S (Kim et al., 2019) with mutual knowledge distillation: the branches learn from the
  fused classifier (output.ensemble_logits, z_f), the fused classifier from the branches' mean:

    L = sum_b CE(z_b) + CE(z_f)
        + kl_scale * w(epoch) * [sum_b KL_T(z_b, sg(z_f)) + KL_T(z_f, sg(mean_b z_b))]

  as FFL-pytorch's train_FFL.py (T = 3 and the 1e-7 in its KLLoss, which detaches its
  target; the ramp-up over 80 epochs). Inactive branches are left out of every term.

  Terms: 'ce_branch_b', 'ce_branches' (their sum), 'ce_fused', 'kl' (the branches' unweighted
  sum), 'kl_fused', 'kl_weight' (w(epoch) * kl_scale) and 'loss'.
  """
  members = _members(output, active_branches)
  z, fused = output.branch_logits, output.ensemble_logits
  sg = jax.lax.stop_gradient
  terms, ce_sum = _branch_cross_entropies(output, labels, members, weights)
  ce_fused = cross_entropy(fused, labels, weights)
  kl_sum = _kl_sum([(z[b], sg(fused)) for b in members], temperature, teacher_eps, weights)
  mean = sum(z[b] for b in members) / len(members)
  kl_fused = _kl_sum([(fused, sg(mean))], temperature, teacher_eps, weights)
  weight = kl_weight(epoch, rampup_epochs) * kl_scale
  loss = ce_sum + ce_fused + weight * (kl_sum + kl_fused)
  terms.update(ce_branches=ce_sum, ce_fused=ce_fused, kl=kl_sum, kl_fused=kl_fused,
               kl_weight=weight, loss=loss)
  return loss, terms


def pcl_loss(output, labels, *, epoch, temperature: float = 3.0, rampup_epochs: float = 80.0,
             kl_scale: float = 1.0, active_branches: Optional[Sequence[bool]] = None,
             weights=None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """PCL (Wu & Gong, 2021): each peer learns from the peer-ensemble teacher (the fusion
  classifier, output.ensemble_logits, z_e) and from the other peers' temporal means
  (output.temporal_logits, zbar_j), both detached:

    L = CE(z_e) + sum_b [CE(z_b) + kl_scale * w(epoch) * (KL_T(z_b, sg(z_e))
                                     + mean_{j != b} KL_T(z_b, sg(zbar_j)))]

  as the PCL reproduction's loss_wrapper.py (its KDLoss and PMLoss: T = 3, no 1e-7 on the
  teacher) with ONE's ramp-up over 80 epochs (the reproduction's divides by 1 instead: a bug
  METHODS notes). Inactive branches are left out as students; as teachers every other peer's
  temporal mean counts (a frozen peer's is a fixed network, still a teacher).

  Terms: 'ce_branch_b', 'ce_branches' (their sum), 'ce_fused', 'kl' (the peers' unweighted
  KL to z_e), 'kl_temporal' (their unweighted KL to the temporal means), 'kl_weight' and 'loss'.
  """
  members = _members(output, active_branches)
  z, fused, temporal = output.branch_logits, output.ensemble_logits, output.temporal_logits
  if temporal is None:
    raise ValueError("pcl_loss needs the temporal-mean peers' logits (output.temporal_logits): "
                     "the steps add them (training/temporal_mean.py)")
  others = lambda b: [j for j in range(z.shape[0]) if j != b]
  sg = jax.lax.stop_gradient
  terms, ce_sum = _branch_cross_entropies(output, labels, members, weights)
  ce_fused = cross_entropy(fused, labels, weights)
  kl_sum = _kl_sum([(z[b], sg(fused)) for b in members], temperature, 0.0, weights)
  kl_temporal = sum((_kl_sum([(z[b], sg(temporal[j])) for j in others(b)], temperature, 0.0,
                             weights) / len(others(b)) for b in members),
                    jnp.zeros((), jnp.float32))
  weight = kl_weight(epoch, rampup_epochs) * kl_scale
  loss = ce_fused + ce_sum + weight * (kl_sum + kl_temporal)
  terms.update(ce_branches=ce_sum, ce_fused=ce_fused, kl=kl_sum, kl_temporal=kl_temporal,
               kl_weight=weight, loss=loss)
  return loss, terms


def baseline_loss(logits, labels, weights=None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """The baseline ResNet's objective: cross-entropy only."""
  ce = cross_entropy(logits, labels, weights)
  return ce, {"ce": ce, "loss": ce}

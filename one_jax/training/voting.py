"""Voting evaluation of a ONE model: the accuracy of every subset of its branches (DESIGN.md 6).

For each non-empty subset S of the B branches (sorted by size, then lexicographically; 31
subsets for B = 5), three top-1 accuracies:

  gate     argmax of sum_{b in S} gate_b z_b / sum_{b in S} gate_b: the gate renormalised over
           S, which is the softmax restricted to S (for S = all branches: the ensemble)
  average  argmax of the plain mean of the branch logits z_b over S
  vote     the class predicted by most branches of S; among classes with equally many votes,
           the one with the largest summed logits over S, then the lowest class index

A model without a gate (CL-ILR: its ensemble is the plain mean) has no 'gate' rule: it would
repeat 'average' (rules_for).

The model runs once per batch (a jitted apply in eval mode, or the caller's kept program:
steps.make_vote_forward); every subset is scored from those outputs. Only real examples count
(mask 1; padding rows have mask 0).
"""
import csv
import itertools
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

RULES = ("gate", "average", "vote")


def rules_for(has_gate: bool) -> Tuple[str, ...]:
  """The rules that tell something about a model: 'gate' only where it has one."""
  return RULES if has_gate else tuple(r for r in RULES if r != "gate")


def _rules(rows: Sequence[Mapping[str, Any]]) -> List[str]:
  return [rule for rule in RULES if rule in rows[0]]


def branch_subsets(num_branches: int) -> List[Tuple[int, ...]]:
  """Every non-empty subset of range(num_branches), by size and then lexicographically."""
  return [s for k in range(1, num_branches + 1)
          for s in itertools.combinations(range(num_branches), k)]


def subset_matrix(subsets: Sequence[Tuple[int, ...]], num_branches: int) -> np.ndarray:
  """[K, B] 0/1 membership of each branch in each subset."""
  member = np.zeros((len(subsets), num_branches), np.float32)
  for k, subset in enumerate(subsets):
    member[k, list(subset)] = 1.0
  return member


@jax.jit
def subset_predictions(branch_logits, gate, member):
  """Predictions [3, K, N] of the three rules for K subsets from one batch of outputs.

  branch_logits [B, N, C], gate [N, B], member [K, B] (0/1).
  """
  num_classes = branch_logits.shape[-1]
  weights = gate[None] * member[:, None, :]                            # [K, N, B]
  weights = weights / jnp.maximum(jnp.sum(weights, -1, keepdims=True), 1e-30)
  gated = jnp.einsum("knb,bnc->knc", weights, branch_logits)
  summed = jnp.einsum("kb,bnc->knc", member, branch_logits)             # average * |S|
  votes = jnp.einsum("kb,bnc->knc", member,
                     jax.nn.one_hot(jnp.argmax(branch_logits, -1), num_classes))
  tied = votes == jnp.max(votes, -1, keepdims=True)
  vote = jnp.argmax(jnp.where(tied, summed, -jnp.inf), -1)  # argmax: first (lowest) on ties
  return jnp.stack([jnp.argmax(gated, -1), jnp.argmax(summed, -1), vote])


@jax.jit
def subset_correct(branch_logits, gate, member, labels, mask):
  """Correct real examples [3, K] (rules x subsets) in one batch."""
  hits = subset_predictions(branch_logits, gate, member) == labels[None, None, :]
  return jnp.sum(hits * (mask[None, None, :] > 0), axis=-1)


def voted_outputs(output) -> Dict[str, Any]:
  """What voting reads of a model's output (models.OneOutput)."""
  return {"branch_logits": output.branch_logits, "gate": output.gate}


def vote_accuracies(model, variables, batches: Iterable[Mapping[str, Any]],
                    rules: Sequence[str] = RULES,
                    forward: Optional[Callable] = None) -> List[Dict[str, Any]]:
  """One row per subset: {'branches': (0, 2), 'size': 2, then each of `rules` ('gate',
  'average', 'vote': fractions of the real examples), 'examples': their count}.

  model: a ONE model of any family, models.OneModel (or anything whose apply(variables,
  images, train=False) returns branch_logits [B, N, C] and gate [N, B]), without an
  axis_name; batches yield 'image', 'label' and 'mask' (mask optional: all real).
  forward: (variables, images) -> {'branch_logits', 'gate'} in place of jitting model.apply
  (steps.make_vote_forward: a program kept between runs).
  """
  if forward is None:
    forward = jax.jit(lambda v, x: voted_outputs(model.apply(v, x, train=False)))
  subsets, member, correct, examples = None, None, None, 0
  for batch in batches:
    output = forward(variables, batch["image"])
    branch_logits, gate = output["branch_logits"], output["gate"]
    labels = jnp.asarray(batch["label"])
    mask = jnp.asarray(batch.get("mask", np.ones(labels.shape, np.float32)))
    if subsets is None:
      subsets = branch_subsets(branch_logits.shape[0])
      member = jnp.asarray(subset_matrix(subsets, branch_logits.shape[0]))
      correct = np.zeros((len(RULES), len(subsets)), np.int64)
    correct += np.asarray(subset_correct(branch_logits, gate, member, labels, mask))
    examples += int(np.sum(np.asarray(mask) > 0))
  if subsets is None or examples == 0:
    raise ValueError("voting evaluation got no examples: the batches are empty or all padding")
  return [{"branches": subset, "size": len(subset),
           **{rule: float(correct[r, k]) / examples for r, rule in enumerate(RULES)
              if rule in rules},
           "examples": examples}
          for k, subset in enumerate(subsets)]


def _name(subset: Sequence[int]) -> str:
  return "+".join(str(b) for b in subset)


def format_vote_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """A fixed-width table, accuracies in percent."""
  width = max([len("branches")] + [len(_name(r["branches"])) for r in rows])
  rules = _rules(rows)
  lines = [f"{'branches':<{width}}  size  " + "  ".join(f"{rule:>7}" for rule in rules)]
  for r in rows:
    lines.append(f"{_name(r['branches']):<{width}}  {r['size']:>4}  "
                 + "  ".join(f"{100 * r[rule]:>7.2f}" for rule in rules))
  return "\n".join(lines)


def write_vote_csv(rows: Sequence[Mapping[str, Any]], path: str) -> None:
  """CSV with columns branches ('0+2'), size, the rules (gate, average, vote: fractions),
  examples."""
  rules = _rules(rows)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["branches", "size", *rules, "examples"])
    for r in rows:
      writer.writerow([_name(r["branches"]), r["size"], *(f"{r[rule]:.6f}" for rule in rules),
                       r["examples"]])

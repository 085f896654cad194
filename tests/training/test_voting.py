"""Voting evaluation: hand-computed accuracies for the three rules, padding, the real model."""
import csv

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from one_jax.architectures import model_spec, models
from one_jax.training import voting

# Four real examples, three branches, three classes. Branch predictions per example:
# ex0 (label 0): 0 1 2   ex1 (label 1): 0 1 1   ex2 (label 2): 2 2 0   ex3 (label 1): 1 0 2
LOGITS = np.array([
    [[2, 0, 0], [1, 0, 0], [0, 0, 1], [0, 2, 0]],      # branch 0
    [[0, 3, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]],      # branch 1
    [[0, 0, 1], [0, 1.5, 0], [5, 0, 0], [0, 0, .5]],   # branch 2
], np.float32)
GATE = np.array([[.6, .2, .2], [.8, .1, .1], [.1, .1, .8], [1 / 3, 1 / 3, 1 / 3]], np.float32)
LABELS = np.array([0, 1, 2, 1])
# Worked out by hand (see the comments in test_hand_computed_accuracies).
EXPECTED = {  # subset: (gate, average, vote) correct out of 4
    (0,): (3, 3, 3), (1,): (2, 2, 2), (2,): (1, 1, 1),
    (0, 1): (3, 2, 2),
    (0, 1, 2): (2, 2, 3),
}


class TableModel:
  """A stand-in model whose 'images' are example indices into fixed outputs."""

  def __init__(self, logits, gate):
    self.logits, self.gate = jnp.asarray(logits), jnp.asarray(gate)

  def apply(self, variables, images, train=False):
    assert not train
    z, g = self.logits[:, images], self.gate[images]
    return models.OneOutput(branch_logits=z, gate=g, ensemble_logits=jnp.einsum("nb,bnc->nc", g, z))


def padded_batches(batch_size):
  """The 4 examples plus 2 padding rows that every rule would get right (mask 0), in batches."""
  logits = np.concatenate([LOGITS, np.tile([[[9., 0, 0]]], (3, 2, 1))], axis=1)
  gate = np.concatenate([GATE, np.full((2, 3), 1 / 3, np.float32)])
  labels = np.concatenate([LABELS, [0, 0]])
  mask = np.array([1, 1, 1, 1, 0, 0], np.float32)
  batches = [{"image": np.arange(i, min(i + batch_size, 6)), "label": labels[i:i + batch_size],
              "mask": mask[i:i + batch_size]} for i in range(0, 6, batch_size)]
  return TableModel(logits, gate), batches


def test_subsets_are_ordered_by_size_then_lexicographically():
  subsets = voting.branch_subsets(5)
  assert len(subsets) == 31
  assert subsets[:6] == [(0,), (1,), (2,), (3,), (4,), (0, 1)] and subsets[-1] == (0, 1, 2, 3, 4)
  assert subsets == sorted(subsets, key=lambda s: (len(s), s))


@pytest.mark.parametrize("batch_size", [6, 4])
def test_hand_computed_accuracies(batch_size):
  # {0,1}: gate ex0 [1.5,.75,0]->0 ok, ex1 [.89,.11,0]->0, ex2 ->2 ok, ex3 [.5,1,0]->1 ok: 3;
  #        average ex0 [1,1.5,0]->1, ex1 [.5,.5,0] tie->0, ex2 ok, ex3 ok: 2;
  #        vote ex0 0 vs 1, summed logits [2,3,0]->1; ex1 0 vs 1, summed tie->0; ex2, ex3 ok: 2.
  # all:   gate [1.2,.6,.2]->0 ok, [.8,.25,0]->0, [4,0,.2]->0, [1/3,2/3,1/6]->1 ok: 2;
  #        average [2,3,1]->1, [1,2.5,0]->1 ok, [5,0,2]->0, [1,2,.5]->1 ok: 2;
  #        vote 3-way tie [2,3,1]->1, 1 1 ->1 ok, 2 2 ->2 ok, 3-way tie [1,2,.5]->1 ok: 3.
  model, batches = padded_batches(batch_size)
  rows = {r["branches"]: r for r in voting.vote_accuracies(model, {}, batches)}
  assert len(rows) == 7
  for subset, expected in EXPECTED.items():
    got = tuple(rows[subset][rule] * 4 for rule in voting.RULES)
    chex.assert_trees_all_close(got, tuple(float(e) for e in expected))
    assert rows[subset]["examples"] == 4 and rows[subset]["size"] == len(subset)


def test_vote_ties_go_to_the_larger_summed_logits_then_the_lower_class():
  z = jnp.asarray([[[0., 1, 0, 0]], [[0., 0, 3, 0]], [[0., 0, 0, 2]], [[0., 5, 0, 0]]])  # B=4, N=1
  member = jnp.asarray(voting.subset_matrix([(0, 1), (0, 1, 2), (2, 3)], 4))
  preds = voting.subset_predictions(z, jnp.full((1, 4), .25), member)
  # (0,1): classes 1 and 2 tie on votes, summed logits 1 < 3 -> 2; (0,1,2): 1/2/3 tie -> 2 (3);
  # (2,3): 3 vs 1, summed 2 < 5 -> 1.
  np.testing.assert_array_equal(preds[2, :, 0], [2, 2, 1])
  z = jnp.zeros((2, 1, 3)).at[0, 0, 2].set(1.).at[1, 0, 1].set(1.)
  preds = voting.subset_predictions(z, jnp.full((1, 2), .5), jnp.ones((1, 2)))
  assert int(preds[2, 0, 0]) == 1  # equal votes and equal sums: the lower class index


def test_gate_renormalised_over_the_subset_equals_the_softmax_restricted_to_it():
  rng = np.random.RandomState(0)
  z = jnp.asarray(rng.normal(size=(3, 5, 4)).astype(np.float32))
  pre = rng.normal(size=(5, 3)).astype(np.float32)
  gate = jax.nn.softmax(pre, -1)
  member = jnp.asarray(voting.subset_matrix([(0, 2)], 3))
  restricted = jax.nn.softmax(pre[:, [0, 2]], -1)
  want = jnp.argmax(jnp.einsum("nb,bnc->nc", restricted, z[jnp.asarray([0, 2])]), -1)
  np.testing.assert_array_equal(voting.subset_predictions(z, gate, member)[0, 0], want)


def test_full_set_gate_accuracy_is_the_ensemble_accuracy():
  model = model_spec.ModelSpec("one_resnet", 8, 4, num_branches=3).build()
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  rng = np.random.RandomState(1)
  variables = jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
                           if s.ndim == 1 else (0.3 * rng.normal(size=s.shape)).astype(np.float32),
                           shapes)
  images = rng.normal(size=(12, 8, 8, 3)).astype(np.float32)
  labels = rng.randint(0, 4, size=12)
  mask = np.ones(12, np.float32)
  mask[10:] = 0  # the last two rows are padding
  batches = [{"image": images[i:i + 8], "label": labels[i:i + 8], "mask": mask[i:i + 8]}
             for i in (0, 8)]
  rows = voting.vote_accuracies(model, variables, batches)
  assert len(rows) == 7
  out = model.apply(variables, images[:10], train=False)
  ensemble = np.mean(np.argmax(out.ensemble_logits, -1) == labels[:10])
  full = rows[-1]
  assert full["branches"] == (0, 1, 2) and full["examples"] == 10
  assert full["gate"] == pytest.approx(ensemble)
  for b in range(3):
    single = np.mean(np.argmax(out.branch_logits[b], -1) == labels[:10])
    assert rows[b]["gate"] == rows[b]["average"] == rows[b]["vote"] == pytest.approx(single)


def test_table_and_csv(tmp_path):
  model, batches = padded_batches(6)
  rows = voting.vote_accuracies(model, {}, batches)
  table = voting.format_vote_table(rows)
  lines = table.splitlines()
  assert len(lines) == 8 and lines[0].split() == ["branches", "size", "gate", "average", "vote"]
  assert lines[-1].split() == ["0+1+2", "3", "50.00", "50.00", "75.00"]
  path = tmp_path / "votes.csv"
  voting.write_vote_csv(rows, str(path))
  with open(path) as f:
    read = list(csv.DictReader(f))
  assert [r["branches"] for r in read][:4] == ["0", "1", "2", "0+1"]
  assert float(read[-1]["vote"]) == pytest.approx(0.75) and read[-1]["examples"] == "4"


def test_no_real_examples_is_an_error():
  model, batches = padded_batches(6)
  batches[0]["mask"] = np.zeros(6, np.float32)
  with pytest.raises(ValueError, match="no examples"):
    voting.vote_accuracies(model, {}, batches)

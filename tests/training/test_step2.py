"""Step 2 end to end: every configs/step2.py variant from tiny stage-1 runs."""
import os

import chex
import jax
import numpy as np
import pytest

from configs import step2
from one_jax.storage import checkpoints
from one_jax.training import train, two_stage

SHORT = dict(num_epochs=1, steps_per_epoch=2)  # one epoch of two steps


def _run(config, workdir):
  return train.run(config, str(workdir))  # what `python -m one_jax.main` runs


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_config):
  """Tiny stage-1 runs: a 3-branch, a 5-branch, three 1-branch and three baseline models."""
  root = tmp_path_factory.mktemp("stage1")
  paths = {}
  for name, (variant, seeds) in {
      "three": ("step2:three_branch", [0]), "five": ("step2:five_branch", [0]),
      "one": ("step2:one_branch", [0, 1, 2]), "base": ("step1:baseline", [0, 1, 2])}.items():
    paths[name] = []
    for seed in seeds:
      workdir = root / f"{name}{seed}"
      _run(tiny_config(variant, seed=seed, **SHORT), workdir)
      paths[name].append(str(workdir))
  return paths


def _branches_identical(workdir):
  _, variables = checkpoints.load_model(str(workdir))
  leaves = jax.tree.leaves(variables["params"]["branches"])
  return all(np.array_equal(l[0], l[b]) for l in leaves for b in range(1, l.shape[0]))


def test_three_into_five(sources, tmp_path, tiny_config):
  config = tiny_config("step2:three_into_five", source=sources["three"][0], **SHORT)
  metrics = _run(config, tmp_path)
  assert "test/top1/branch_4" in metrics
  init_model, init_vars = checkpoints.load_model(str(tmp_path / two_stage.INIT_SUBDIR))
  src_model, src_vars = checkpoints.load_model(sources["three"][0])
  images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  chex.assert_trees_all_close(init_model.apply(init_vars, images).ensemble_logits,
                              src_model.apply(src_vars, images).ensemble_logits, atol=1e-5)
  # The copies (slots 3, 4 of branches 0, 1) start identical and part during training.
  copies = lambda v: [np.array_equal(l[3], l[0]) for l in jax.tree.leaves(  # noqa: E731
      v["params"]["branches"])]
  assert all(copies(init_vars))
  _, trained = checkpoints.load_model(str(tmp_path))
  assert not all(copies(trained))


@pytest.mark.parametrize("variant,key", [("merge_baselines", "base"),
                                         ("merge_one_branch", "one")])
def test_merges(sources, tmp_path, tiny_config, variant, key):
  config = tiny_config(f"step2:{variant}", sources=",".join(sources[key]), **SHORT)
  metrics = _run(config, tmp_path)
  assert "test/top1/branch_2" in metrics
  model, _ = checkpoints.load_model(str(tmp_path))
  assert model.num_branches == 3


def test_one_inside_three_stays_identical_and_one_into_three_diverges(sources, tmp_path,
                                                                      tiny_config):
  _run(tiny_config("step2:one_inside_three", source=sources["one"][0], num_epochs=1,
                   steps_per_epoch=3), tmp_path / "inside")
  assert _branches_identical(tmp_path / "inside")
  _run(tiny_config("step2:one_into_three", source=sources["one"][0], num_epochs=1,
                   steps_per_epoch=3), tmp_path / "into")
  assert not _branches_identical(tmp_path / "into")


def test_five_branch_vote(sources, tmp_path, tiny_config):
  config = tiny_config("step2:five_branch_vote", source=sources["five"][0], **SHORT)
  _run(config, tmp_path)
  with open(tmp_path / "voting.csv") as f:
    rows = f.read().strip().splitlines()
  assert len(rows) == 1 + 31   # header + every non-empty subset of 5 branches


def test_stage1_variant_configs():
  assert step2.get_config("one_branch").num_branches == 1
  assert step2.get_config("three_into_five").surgery == "expand"
  assert step2.get_config("merge_baselines").surgery == "merge"
  assert step2.get_config("one_into_three").symmetry_noise > 0
  assert step2.get_config("one_inside_three").symmetry_noise == 0


def test_missing_source_is_a_clear_error(tmp_path, tiny_config):
  config = tiny_config("step2:three_into_five", **SHORT)
  with pytest.raises(ValueError, match="--config.source"):
    _run(config, tmp_path / "run")
  config = tiny_config("step2:three_into_five", source=str(tmp_path / "nope"), **SHORT)
  with pytest.raises(ValueError, match="does not exist"):
    _run(config, tmp_path / "run")
  assert not os.path.exists(tmp_path / "run" / two_stage.INIT_SUBDIR)


def test_a_failed_start_leaves_no_init_and_a_leftover_init_is_replaced(sources, tmp_path,
                                                                       tiny_config):
  workdir = tmp_path / "run"
  # Refused after the surgery (the batch does not split over the 4 devices): no init stays,
  # nor the workdir the start created.
  config = tiny_config("step2:three_into_five", source=sources["three"][0], batch_size=66,
                       **SHORT)
  with pytest.raises(ValueError, match="batch_size=66"):
    _run(config, workdir)
  assert not workdir.exists()
  # An init left behind by an older version's failed start (from another source) is never
  # trained from: without a checkpoint the surgery is done again from this run's source.
  stale = workdir / two_stage.INIT_SUBDIR
  stale.mkdir(parents=True)
  (stale / "left_over").write_text("")
  config = tiny_config("step2:three_into_five", source=sources["three"][0], **SHORT)
  _run(config, workdir)
  _, meta = checkpoints.restore_raw(str(stale))
  assert meta["surgery"]["sources"][0]["path"] == os.path.abspath(sources["three"][0])
  assert not (stale / "left_over").exists()


def test_a_source_that_does_not_fit_the_variant_is_refused_before_writing(sources, tmp_path,
                                                                         tiny_config):
  config = tiny_config("step2:merge_baselines", sources=",".join(sources["base"]), depth=14,
                       **SHORT)
  with pytest.raises(ValueError, match="but variant 'merge_baselines' trains a"):
    _run(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()

"""The non-finite guard: the first non-finite step is named, none of its state is saved, the last
good checkpoint stays the latest.

Faults are injected into real `python -m one_jax.main` processes (tests/fault_injection.py).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from one_jax.storage import checkpoints
from one_jax.training import nonfinite, steps, train_state

from tests.reliability import runs


def test_diverging_learning_rate_stops_at_the_first_non_finite_step(tmp_path):
  workdir = str(tmp_path / "run")
  # Epoch 1 at lr 0.05, then lr x 1e8: the second epoch blows up.
  result = runs.main(runs.SMOKE + [f"--workdir={workdir}", "--config.milestones=(1,)",
                          "--config.gamma=1e8"])
  assert result.returncode == 1
  message = result.stderr.strip()
  assert message.startswith("error: non-finite values at step ") and "\n" not in message
  assert "(epoch 2, step " in message and " of 4) in: " in message
  assert any(w in message for w in ("loss term", "gradients", "parameter update"))
  assert f"the last good checkpoint, step 4 in {workdir}/checkpoints, is kept" in message
  assert message.endswith("then start again with a new --workdir or --config.new_run=True "
                          "(this workdir keeps the run's config)")
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["4"]
  state, _ = checkpoints.restore_raw(workdir)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state)
             if np.issubdtype(x.dtype, np.floating))
  assert len(runs.metrics_rows(workdir)) == 1


def test_non_finite_step_is_reported_exactly(tmp_path):
  workdir = str(tmp_path / "run")
  result = runs.main(runs.SMOKE + [f"--workdir={workdir}"], fault="nan_at_step=7")
  assert result.returncode == 1
  assert "non-finite values at step 7 (epoch 2, step 3 of 4) in: " in result.stderr
  assert "gradients" in result.stderr
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["4"]


def test_non_finite_step_inside_a_dispatch_is_reported_by_its_own_number(tmp_path):
  workdir = str(tmp_path / "run")
  result = runs.main(runs.SMOKE + [f"--workdir={workdir}", "--config.steps_per_dispatch=3"],
                 fault="nan_at_step=6")   # the second step of the dispatch of steps 5-7
  assert result.returncode == 1
  assert "non-finite values at step 6 (epoch 2, step 2 of 4) in: " in result.stderr
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["4"]


@pytest.mark.parametrize("per_dispatch", [1, 3])
def test_an_overflowing_update_is_named_and_never_saved(tmp_path, per_dispatch):
  """At lr 1e39 (infinity in float32) the first step's loss and gradients are finite and its
  update is not: found alone and as the first step of a dispatch of three; nothing is saved."""
  workdir = str(tmp_path / "run")
  result = runs.main([f"--config={runs.STEP1}:three_branch,smoke", "--config.progress_bar=False",
                      f"--workdir={workdir}", "--config.lr=1e39",
                      f"--config.steps_per_dispatch={per_dispatch}"])
  assert result.returncode == 1, result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(
      "error: non-finite values at step 1 (epoch 1, step 1 of 4) in: parameter update. "
      "Training stopped without saving that update and no checkpoint had been written yet"
  ), result.stderr
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert not os.path.isdir(ckpt_dir) or not os.listdir(ckpt_dir)


def test_flags_name_each_part_and_do_not_overflow():
  big = np.float32(3e38)   # finite, but its square (a norm) would overflow
  clean = nonfinite.Flags.of_step({"loss": jnp.float32(1.0)}, {"w": jnp.full(3, big)},
                                  {"w": jnp.full(3, big)})
  assert bool(clean.ok()) and clean.bad_parts() == []
  flags = nonfinite.Flags.of_step(
      {"loss": jnp.float32(np.nan), "kl": jnp.float32(0.5), "ce": jnp.float32(np.inf)},
      {"w": jnp.array([1.0, np.nan]), "b": jnp.zeros(2)}, {"w": jnp.array([-np.inf, 0.0])})
  assert not bool(flags.ok())
  assert flags.bad_parts() == ["loss terms ce, loss", "gradients", "parameter update"]
  only_update = nonfinite.Flags.of_step({"loss": jnp.float32(2.0)}, {"w": jnp.ones(2)},
                                        {"w": jnp.array([np.nan, 1.0])})
  assert only_update.bad_parts() == ["parameter update"]


def _one_step(config, images):
  from one_jax import parallel  # pylint: disable=g-import-not-at-top
  from one_jax.architectures import model_spec  # pylint: disable=g-import-not-at-top
  from one_jax.training import optimizer  # pylint: disable=g-import-not-at-top
  config.batch_size = 32
  mesh = parallel.make_mesh(jax.devices()[:1])
  spec = model_spec.ModelSpec.from_config(config)
  tx = optimizer.create_optimizer(config, 4, spec.abstract_variables()["params"])
  state = train_state.initial_state(spec, tx, (32, 32, 3), jax.random.key(0))
  step = steps.make_train_step(config, spec, tx, mesh)
  batch = {"image": images, "label": np.zeros(32, np.int32)}
  _, metrics, flags = step(parallel.replicate(state, mesh), parallel.shard_batch(batch, mesh),
                           np.float32(0))
  return parallel.to_host(metrics), parallel.to_host(flags)


def test_train_step_flags_a_non_finite_loss_and_an_overflowing_update():
  from configs import step1  # pylint: disable=g-import-not-at-top
  images = np.random.default_rng(0).normal(size=(32, 32, 32, 3)).astype(np.float32)
  metrics, flags = _one_step(step1.get_config("three_branch,smoke"),
                             np.full_like(images, np.inf))
  assert not flags.gradients and not flags.terms["loss"] and not np.isfinite(
      metrics["train/loss"])
  assert set(flags.terms) == {k[len("train/"):] for k in metrics if "/top" not in k}
  config = step1.get_config("three_branch,smoke")
  config.lr = 3e38   # finite, but times the first step's gradients it overflows
  metrics, flags = _one_step(config, images)
  assert all(flags.terms.values()) and flags.gradients and not flags.update


def test_a_nan_anywhere_in_a_large_leaf_is_seen():
  """XLA:CPU's vectorised max reduction drops NaN in large arrays; the flag must not."""
  tree = {"big": jnp.ones(300_000), "conv": jnp.ones((64, 64, 3, 3)), "bias": jnp.ones(10)}
  check = jax.jit(nonfinite.all_finite)
  assert bool(check(tree))
  for leaf in tree:
    for position in (0, 7, -1):
      for bad in (np.nan, np.inf, -np.inf):
        broken = dict(tree)
        flat = tree[leaf].ravel().at[position].set(bad)
        broken[leaf] = flat.reshape(tree[leaf].shape)
        assert not bool(check(broken)), (leaf, position, bad)

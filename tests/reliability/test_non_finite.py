"""The non-finite guard: the first non-finite step is named, none of its state is saved, the last
good checkpoint stays the latest.

Faults are injected into real `python -m one_jax.main` processes (tests/fault_injection.py).
"""
import os

import jax
import numpy as np

from one_jax.storage import checkpoints
from one_jax.training import steps, train_state

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


def test_train_step_does_not_apply_a_non_finite_update():
  from configs import step1  # pylint: disable=g-import-not-at-top
  from one_jax import parallel  # pylint: disable=g-import-not-at-top
  from one_jax.architectures import model_spec
  from one_jax.training import optimizer
  config = step1.get_config("three_branch,smoke")
  config.batch_size = 32
  mesh = parallel.make_mesh(jax.devices()[:1])
  spec = model_spec.ModelSpec.from_config(config)
  rng = jax.random.key(0)
  tx = optimizer.create_optimizer(config, 4, spec.abstract_variables()["params"])
  before = train_state.initial_state(spec, tx, (32, 32, 3), rng)
  step = steps.make_train_step(config, spec, tx, mesh)
  batch = {"image": np.full((32, 32, 32, 3), np.inf, np.float32),
           "label": np.zeros(32, np.int32)}
  after, metrics = step(parallel.replicate(before, mesh), parallel.shard_batch(batch, mesh),
                        np.float32(0))
  metrics = parallel.to_host(metrics)
  assert metrics[steps.FINITE_ALL] == 0.0 and metrics[f"{steps.FINITE}gradients"] == 0.0
  assert {f"{steps.FINITE}{t}" for t in ("loss", "kl", "ce_ensemble")} <= set(metrics)
  jax.tree.map(np.testing.assert_array_equal, before, parallel.to_host(after))

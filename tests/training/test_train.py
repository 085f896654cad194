"""Step 1 end to end: the train step, data parallelism, resume, data sources, the variants."""
import os

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import step1
from one_jax import parallel
from one_jax.architectures import model_spec
from one_jax.data import in_memory, sources
from one_jax.storage import checkpoints
from one_jax.training import evaluation, methods, optimizer, steps, train, train_state


def _states_after_steps(config, devices, num_steps):
  """Parameters after num_steps train steps on a mesh over `devices` (same global batches)."""
  mesh = parallel.make_mesh(devices)
  train_source, _, info = sources.get_datasets(config)
  spec = model_spec.ModelSpec.from_config(config)
  rng = jax.random.key(config.seed)
  tx = optimizer.create_optimizer(config, 10, spec.abstract_variables(info.image_shape)["params"])
  state = parallel.replicate(train_state.initial_state(spec, tx, info.image_shape, rng), mesh)
  step = steps.make_train_step(config, spec, tx, mesh)
  batches = in_memory.train_batches(train_source, global_batch=config.batch_size,
                                         seed=config.seed, epoch=0)
  for _, batch in zip(range(num_steps), batches):
    state, metrics, _ = step(state, parallel.shard_batch(batch, mesh), jnp.float32(3.0))
  return parallel.to_host(state), parallel.to_host(metrics)


def test_one_device_and_four_devices_agree(tiny_config):
  assert jax.device_count() == 4
  config = tiny_config(batch_size=32)
  s1, m1 = _states_after_steps(config, jax.devices()[:1], 3)
  s4, m4 = _states_after_steps(config, jax.devices(), 3)
  # float32 sums in another order (one device against four), amplified over three steps by
  # BatchNorm on 8 examples per device: up to ~8e-5 seen on a few of conv1's weights.
  chex.assert_trees_all_close(s1["params"], s4["params"], atol=2e-4, rtol=2e-4)
  chex.assert_trees_all_close(s1["batch_stats"], s4["batch_stats"], atol=2e-5, rtol=2e-4)
  chex.assert_trees_all_close(m1, m4, atol=1e-4, rtol=1e-4)


def test_masked_branch_keeps_everything(tiny_config):
  config = tiny_config(active_branches="0,2", batch_size=32)
  mesh = parallel.make_mesh(jax.devices()[:1])
  before, _ = _states_after_steps(config, jax.devices()[:1], 0 + 1)
  # One more comparison point: the slice of branch 1 equals its initial value.
  init = model_spec.ModelSpec.from_config(config).init(jax.random.key(config.seed))
  for after, start in ((before["params"], init["params"]),
                       (before["batch_stats"], init["batch_stats"])):
    for a, s in zip(jax.tree.leaves(after["branches"]), jax.tree.leaves(start["branches"])):
      np.testing.assert_array_equal(a[1], s[1])
  assert mesh.devices.size == 1


def test_training_learns_a_learnable_task(tmp_path, tiny_config):
  config = tiny_config("three_branch", num_epochs=6, steps_per_epoch=12, batch_size=64,
                       synthetic_train_size=768, lr=0.05, milestones=(3, 5), rampup_epochs=2)
  metrics = train.train_and_evaluate(config, str(tmp_path))
  rows = _csv_rows(tmp_path / "metrics.csv")
  assert len(rows) == 6
  assert float(rows[-1]["train/loss"]) < 0.7 * float(rows[0]["train/loss"])
  assert metrics["test/top1/ensemble"] > 0.5        # chance is 0.1
  for name in ("metrics.csv", "metrics.jsonl", "curves.png", "summary.txt", "config.json"):
    assert (tmp_path / name).exists(), name
  assert os.listdir(tmp_path / "tensorboard")
  assert "deployed head: ensemble" in (tmp_path / "summary.txt").read_text()


def _csv_rows(path):
  import csv
  with open(path) as f:
    return list(csv.DictReader(f))


def test_resume_continues_identically(tmp_path, tiny_config):
  config = tiny_config("five_branch_after_lr", num_epochs=2)
  straight = train.train_and_evaluate(config, str(tmp_path / "straight"))
  first = ml_collections.ConfigDict(config.to_dict())
  first.num_epochs = 1
  train.train_and_evaluate(first, str(tmp_path / "resumed"))
  resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  for key in ("train/loss", "test/loss", "test/top1/ensemble"):
    np.testing.assert_allclose(resumed[key], straight[key], rtol=1e-5, err_msg=key)
  _, a = checkpoints.load_model(str(tmp_path / "straight"))
  _, b = checkpoints.load_model(str(tmp_path / "resumed"))
  chex.assert_trees_all_close(a, b, atol=1e-6)
  raw_a, _ = checkpoints.restore_raw(str(tmp_path / "straight"))
  raw_b, _ = checkpoints.restore_raw(str(tmp_path / "resumed"))
  chex.assert_trees_all_close(raw_a["opt_state"], raw_b["opt_state"], atol=1e-6)
  assert len(_csv_rows(tmp_path / "resumed" / "metrics.csv")) == 2


@pytest.mark.parametrize("variant", step1.VARIANTS)
def test_step1_variant_smoke(variant, tmp_path, tiny_config):
  config = tiny_config(variant, num_epochs=1, steps_per_epoch=2)
  metrics = train.train_and_evaluate(config, str(tmp_path))
  head = "model" if variant.startswith("baseline") else "ensemble"
  assert 0.0 <= metrics[f"test/top1/{head}"] <= 1.0
  assert metrics["test/count"] == config.synthetic_test_size
  spec, _ = checkpoints.load(str(tmp_path))
  assert spec.to_dict() == model_spec.ModelSpec.from_config(config).to_dict()


def test_eval_covers_every_example_once(tiny_config):
  config = tiny_config(synthetic_test_size=203, eval_batch_size=40)
  mesh = parallel.make_mesh()
  _, test_source, info = sources.get_datasets(config)
  spec = model_spec.ModelSpec.from_config(config)
  model, variables = spec.build(), spec.init(jax.random.key(0), info.image_shape)
  metrics = evaluation.evaluate(
      methods.for_model(config, spec), steps.make_eval_step(config, spec, mesh), mesh,
      parallel.replicate(jax.tree.map(np.asarray, variables), mesh), test_source,
      batch_size=config.eval_batch_size)
  assert metrics["test/count"] == 203
  # The ensemble's accuracy equals a plain host-side computation over all 203 examples.
  images = np.stack([test_source[i]["image"] for i in range(203)])
  labels = np.asarray([test_source[i]["label"] for i in range(203)])
  out = model.apply(variables, in_memory.normalize(images))
  expected = float(np.mean(np.argmax(out.ensemble_logits, -1) == labels))
  np.testing.assert_allclose(metrics["test/top1/ensemble"], expected, atol=1e-6)


def test_npz_source_trains(tmp_path, tiny_config):
  rng = np.random.default_rng(0)
  path = tmp_path / "data.npz"
  np.savez(path, x_train=rng.integers(0, 255, (96, 32, 32, 3), dtype=np.uint8),
           y_train=rng.integers(0, 10, 96), x_test=rng.integers(0, 255, (37, 32, 32, 3),
                                                                 dtype=np.uint8),
           y_test=rng.integers(0, 10, 37))
  config = tiny_config("baseline", npz_path=str(path), num_epochs=1, batch_size=32)
  metrics = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert metrics["test/count"] == 37


def test_tfds_source_under_mock_data(tmp_path, tiny_config):
  import tensorflow_datasets as tfds
  config = tiny_config("baseline", dataset="cifar10", num_epochs=1, batch_size=32,
                       steps_per_epoch=2, eval_batch_size=48)
  with tfds.testing.mock_data(num_examples=70):
    metrics = train.train_and_evaluate(config, str(tmp_path))
  assert metrics["test/count"] == 70


def test_eval_only_and_load_model(tmp_path, capsys, tiny_config):
  config = tiny_config("three_branch", num_epochs=1, steps_per_epoch=2)
  trained = train.train_and_evaluate(config, str(tmp_path / "run"))
  eval_config = tiny_config("three_branch", init_from=str(tmp_path / "run"), eval_only=True)
  metrics = evaluation.run_eval_only(eval_config, str(tmp_path / "eval"))
  np.testing.assert_allclose(metrics["test/top1/ensemble"], trained["test/top1/ensemble"],
                             atol=1e-6)
  assert "Evaluation of" in capsys.readouterr().out


def test_config_variants():
  for variant in step1.VARIANTS:
    c = step1.get_config(variant)
    assert (c.depth, c.batch_size, c.num_epochs, c.lr, c.weight_decay) == (32, 128, 300, 0.1, 1e-4)
    assert tuple(c.milestones) == (150, 225) and c.rampup_epochs == 80 and c.temperature == 3.0
  assert step1.get_config("five_branch").num_branches == 5
  assert step1.get_config("baseline").model == "cifar_resnet"
  assert step1.get_config("five_branch_after_lr").geo_lr == 1
  assert step1.get_config("baseline_top5").gamma == 0.333
  assert step1.get_config("three_branch,deterministic").deterministic
  with pytest.raises(ValueError, match="unknown config variant 'seven_branch'"):
    step1.get_config("seven_branch")


def test_top_k_never_counts_a_non_finite_logit_or_an_unknown_label_as_right():
  logits = jnp.asarray([[1.0, 2.0, 0.0],          # label 1: right at top-1
                        [jnp.nan, 0.0, 1.0],      # a NaN logit: wrong
                        [0.0, jnp.nan, 1.0],      # the label's own logit is NaN: wrong
                        [jnp.inf, 0.0, 1.0],      # an infinite logit: wrong
                        [1.0, 2.0, 0.0],          # label 5 of a 3-class model: wrong
                        [1.0, 2.0, 0.0]])         # label 0: right at top-2 only
  labels = jnp.asarray([1, 2, 1, 0, 5, 0])
  np.testing.assert_array_equal(steps.topk_correct(logits, labels, 1), [1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(steps.topk_correct(logits, labels, 2), [1, 0, 0, 0, 0, 1])

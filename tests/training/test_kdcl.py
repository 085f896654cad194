"""KDCL (--config.method=kdcl): independent networks, each fed its own augmentation of the
batch; its loss and gradients against a PyTorch transcription of the KDCL reproduction's
train.py (tests/torch_reference.py), the detached teacher, the views on the host pipeline and
on the device (bit-identical, view 0 the one-view batch), and the commands on a KDCL model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from one_jax import parallel
from one_jax.architectures import model_spec, models
from one_jax.data import device_data, in_memory
from one_jax.training import config_checks, losses, methods

from configs import imagenet, step1
from tests import torch_reference as tr
from tests.training import method_commands

B, N, C = 3, 8, 10


def _output(logits):
  weights = models.mean_weights(logits.shape[1], logits.shape[0])
  return models.OneOutput(branch_logits=logits, gate=weights.astype(logits.dtype),
                          ensemble_logits=jnp.mean(logits, axis=0))


@pytest.mark.parametrize("temperature,alpha", [(4.0, 0.5), (2.0, 0.8)])
def test_loss_and_gradients_match_the_kdcl_code(temperature, alpha):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(B, N, C)) * 3
  labels = rng.integers(0, C, size=N)
  with jax.enable_x64(True):
    loss, grads = jax.value_and_grad(lambda z: losses.kdcl_loss(
        _output(z), jnp.asarray(labels), temperature=temperature, alpha=alpha)[0])(
            jnp.asarray(logits))
  z = [torch.tensor(x, requires_grad=True) for x in logits]
  expected = tr.kdcl_loss(z, torch.tensor(labels), temperature, alpha)
  expected.backward()
  # The code's KL has no 1e-7 on the teacher: about 1e-7 apart.
  np.testing.assert_allclose(float(loss), expected.item(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grads), np.stack([x.grad.numpy() for x in z]),
                             rtol=1e-5, atol=1e-7)


def test_the_teacher_is_detached():
  """A peer's KL term trains that peer only: the KL's gradient is each term's own."""
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(B, N, C)), jnp.float32)
  kl = jax.grad(lambda z: losses.kdcl_loss(_output(z), jnp.zeros(N, jnp.int32))[1]["kl"])(logits)
  own = jax.grad(lambda z: sum(losses.distillation_kl(
      z[b], jax.lax.stop_gradient(jnp.mean(z, axis=0)), 4.0) for b in range(B)))(logits)
  np.testing.assert_allclose(kl, own, rtol=1e-6, atol=1e-9)


def test_the_method_takes_a_view_per_peer():
  config = step1.get_config("three_branch,smoke")
  config.method = "kdcl"
  method = methods.for_model(config, model_spec.ModelSpec.from_config(config))
  assert isinstance(method, methods.Kdcl) and method.views == 3
  assert (method.temperature, method.alpha) == (4.0, 0.5)
  assert method.epoch_metrics(0)["kl_weight"] == 0.5 and method.best_metric.endswith("peers_mean")
  config.method = "dml"
  assert methods.for_model(config, model_spec.ModelSpec.from_config(config)).views == 1
  bad = imagenet.get_config("resnet18_one,smoke")
  bad.method = "kdcl"
  with pytest.raises(ValueError, match="method='kdcl' feeds each peer its own augmentation"):
    config_checks.check(bad)


def test_views_on_the_host_and_on_the_device_are_one_batch():
  """train_batches with views: view 0 is the one-view batch, the other views other crops of
  the same examples; the device path gives the same bits from the plans."""
  source, _ = in_memory.synthetic_sources(64, 1, C, 0)
  where = dict(global_batch=16, seed=5, epoch=2)
  one = list(in_memory.train_batches(source, num_threads=0, **where))
  three = list(in_memory.train_batches(source, num_threads=0, views=3, **where))
  plans = list(in_memory.train_plans(len(source), views=3, **where))
  data = device_data.put(source, parallel.make_mesh())
  augment = jax.jit(device_data.augment)
  for single, multi, plan in zip(one, three, plans):
    assert multi["image"].shape == (16, 3, 32, 32, 3)
    np.testing.assert_array_equal(multi["image"][:, 0], single["image"])
    np.testing.assert_array_equal(multi["label"], single["label"])
    assert not np.array_equal(multi["image"][:, 1], multi["image"][:, 2])
    on_device = augment(data, plan)
    np.testing.assert_array_equal(np.asarray(on_device["image"]), multi["image"])
  # A second process's rows are the same rows of the same views.
  rows = list(in_memory.train_batches(source, num_threads=0, views=3, process_index=1,
                                      process_count=2, **where))
  np.testing.assert_array_equal(rows[0]["image"], three[0]["image"][8:])


def test_each_network_sees_its_own_view():
  spec = model_spec.ModelSpec("one_resnet", 8, C, B, method="kdcl")
  variables = spec.init(jax.random.key(0))
  views = jax.random.normal(jax.random.key(1), (4, B, 32, 32, 3))
  out = spec.build().apply(variables, views)
  single = spec.with_branches(None).build()
  for b in range(B):
    peer = {c: {"trunk": jax.tree.map(lambda x, b=b: x[b], variables[c]["trunk"]),
                "branch": jax.tree.map(lambda x, b=b: x[b], variables[c]["branches"])}
            for c in ("params", "batch_stats")}
    np.testing.assert_allclose(single.apply(peer, views[:, b]), out.branch_logits[b],
                               rtol=1e-5, atol=1e-5)
  # Evaluation's one view goes to every network.
  plain = spec.build().apply(variables, views[:, 0])
  np.testing.assert_allclose(plain.branch_logits[0], out.branch_logits[0], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="hold 2 views per example"):
    spec.build().apply(variables, views[:, :2])


def test_train_resume_vote_inspect_extract(tmp_path):
  """The device pipeline trains the run the host pipeline trains; then the commands."""
  done = method_commands.train_resume_vote_inspect_extract(
      tmp_path, "kdcl", deployed="peers_mean", branch=1,
      describe="3 independent networks (kdcl)", first_args=("--config.data_on_device=true",))
  host = str(tmp_path / "host")
  on_host = method_commands.main("kdcl", f"--workdir={host}", "--config.num_epochs=1",
                                 "--config.data_on_device=false")
  assert on_host.returncode == 0, on_host.stderr
  # The first epoch's row, without its timings (the last two columns).
  first_row = lambda path: [line.split(",")[:-2] for line in open(f"{path}/metrics.csv")][:2]
  assert first_row(done["run"]) == first_row(host)

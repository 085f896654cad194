"""CL-ILR (--config.method=cl_ilr): its loss and gradients against a PyTorch transcription of
the OKDDip code (tests/torch_reference.py), what is detached, ILR's 1/B into the trunk, and the
commands on a CL-ILR model (train, resume, vote, inspect, extract)."""
import csv

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from one_jax.architectures import model_spec, models
from one_jax.surgery import layout, operations
from one_jax.training import losses, methods

from configs import step1
from tests import torch_reference as tr
from tests.training import method_commands

B, N, C = 3, 8, 10


def _output(branch_logits):
  weights = models.mean_weights(branch_logits.shape[1], branch_logits.shape[0])
  return models.OneOutput(branch_logits=branch_logits, gate=weights.astype(branch_logits.dtype),
                          ensemble_logits=jnp.mean(branch_logits, axis=0))


def _jax_loss(logits, labels, epoch, **options):
  return losses.cl_ilr_loss(_output(logits), labels, epoch=epoch, **options)[0]


@pytest.mark.parametrize("options,epoch", [
    (dict(), 40.0),                                               # the OKDDip code's CL
    (dict(temperature=2.0, kl_scale=0.5, ce_weight=0.5, detach=True), 40.0),   # MCL-OKD's
    (dict(rampup_epochs=0.0), 3.0),                               # full KL weight
])
def test_loss_and_gradients_match_the_okddip_code(options, epoch):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(B, N, C)) * 3
  labels = rng.integers(0, C, size=N)
  with jax.enable_x64(True):
    loss, grads = jax.value_and_grad(_jax_loss)(jnp.asarray(logits), jnp.asarray(labels),
                                                epoch, **options)
  pro = torch.tensor(np.moveaxis(logits, 0, -1), dtype=torch.float64, requires_grad=True)
  weight = tr.sigmoid_rampup(epoch, options.get("rampup_epochs", 80.0))
  expected = tr.cl_loss(pro, torch.tensor(labels), weight,
                        temperature=options.get("temperature", 3.0),
                        alpha=options.get("kl_scale", 1.0),
                        ce_weight=options.get("ce_weight", 1.0),
                        detach=options.get("detach", False))
  expected.backward()
  np.testing.assert_allclose(float(loss), expected.item(), rtol=1e-10)
  np.testing.assert_allclose(np.asarray(grads), np.moveaxis(pro.grad.numpy(), -1, 0),
                             rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("detach", [False, True])
def test_what_is_detached(detach):
  """Branch 0's KL term reaches the other branches' logits exactly when not detached."""
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(B, N, C)), jnp.float32)

  def kl_of_branch_0(z):
    target = jnp.mean(z[1:], axis=0)
    if detach:
      target = jax.lax.stop_gradient(target)
    return losses.distillation_kl(z[0], target, 3.0)

  def full(z):
    return losses.cl_ilr_loss(_output(z), jnp.zeros(N, jnp.int32), epoch=1e9, detach=detach,
                              ce_weight=0.0)[1]["kl"]

  grads = jax.grad(kl_of_branch_0)(logits)
  assert bool(jnp.any(grads[0] != 0))
  assert bool(jnp.all(grads[1:] == 0)) == detach
  # The whole KL: each branch's gradient is its own term's, plus (not detached) the others'.
  own = jax.grad(lambda z: sum(losses.distillation_kl(
      z[b], jax.lax.stop_gradient(jnp.mean(jnp.delete(z, b, axis=0), axis=0)), 3.0)
      for b in range(B)))(logits)
  np.testing.assert_array_equal(np.isclose(jax.grad(full)(logits), own, atol=0).all(), detach)


def test_ilr_divides_the_trunk_gradient_by_the_branch_count():
  """trunk_grad_scale = 1/B (config.cl_ilr_backprop_scale) scales exactly the gradient that
  reaches the trunk; the branches' gradients are unchanged."""
  spec = model_spec.ModelSpec("one_resnet", 8, C, B, method="cl_ilr")
  with jax.enable_x64(True):   # float64: the trunk's sums cancel too much in float32 to compare
    variables = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64),
                             spec.init(jax.random.key(0), (8, 8, 3)))
    images = jax.random.normal(jax.random.key(1), (4, 8, 8, 3), jnp.float64)
    labels = jnp.arange(4) % C

    def grads(scale):
      model = spec.build(trunk_grad_scale=scale)

      def loss(params):
        out, _ = model.apply(dict(variables, params=params), images, train=True,
                             mutable=["batch_stats"])
        return losses.cl_ilr_loss(out, labels, epoch=10.0)[0]
      return jax.grad(loss)(variables["params"])

    plain, scaled = grads(1.0), grads(1.0 / B)
    expected_trunk = jax.tree.map(lambda g: g / B, plain["trunk"])
    chex.assert_trees_all_close(scaled["branches"], plain["branches"], rtol=1e-12, atol=1e-15)
    chex.assert_trees_all_close(scaled["trunk"], expected_trunk, rtol=1e-10, atol=1e-15)
  config = step1.get_config("three_branch,smoke")
  config.method = "cl_ilr"
  assert model_spec.ModelSpec.from_config(config).trunk_grad_scale == 1.0 / 3
  config.cl_ilr_backprop_scale = False
  assert model_spec.ModelSpec.from_config(config).trunk_grad_scale == 1.0


def test_the_model_has_no_gate_and_the_method_is_recorded():
  spec = model_spec.ModelSpec("one_resnet", 8, C, B, method="cl_ilr")
  assert set(spec.abstract_variables()) == {"params", "batch_stats"}
  assert set(spec.abstract_variables()["params"]) == {"trunk", "branches"}
  assert spec.to_dict()["method"] == "cl_ilr" and not spec.has_gate
  assert "method" not in model_spec.ModelSpec("one_resnet", 8, C, B).to_dict()
  assert model_spec.ModelSpec.from_dict(spec.to_dict()) == spec
  assert spec.with_branches(None).method is None and spec.with_branches(5).method == "cl_ilr"
  method = methods.for_model(step1.get_config("three_branch,smoke"), spec)
  assert isinstance(method, methods.ClIlr) and method.best_metric == "test/top1/peers_mean"
  with pytest.raises(ValueError, match="method='cl_ilr' trains several branches"):
    model_spec.ModelSpec("cifar_resnet", 8, C, method="cl_ilr")


def test_merging_models_of_two_methods_is_refused():
  one = model_spec.ModelSpec("one_resnet", 8, C, 2)
  cl = model_spec.ModelSpec("one_resnet", 8, C, 2, method="cl_ilr")
  states = [jax.tree.map(np.asarray, dict(s.init(jax.random.key(0), (8, 8, 3)))) for s in (one, cl)]
  with pytest.raises(layout.SurgeryError, match="the sources name different methods"):
    operations.merge(states, [one.to_dict(), cl.to_dict()])
  with pytest.raises(layout.SurgeryError, match="the sources and --method name different"):
    operations.merge(states[:1], [one.to_dict()], method="cl_ilr")
  merged, info = operations.merge([states[1], states[1]], [cl.to_dict(), cl.to_dict()])
  assert info["method"] == "cl_ilr" and "gate" not in merged["params"]
  # Baselines merge into any method: three 1-branch models -> a CL-ILR group.
  base = model_spec.ModelSpec("cifar_resnet", 8, C)
  base_state = jax.tree.map(np.asarray, dict(base.init(jax.random.key(1), (8, 8, 3))))
  merged, info = operations.merge([base_state] * 3, [base.to_dict()] * 3, method="cl_ilr")
  assert (info["method"], info["num_branches"]) == ("cl_ilr", 3) and "gate" not in merged["params"]
  np.testing.assert_array_equal(merged["params"]["branches"]["classifier"]["kernel"][2],
                                base_state["params"]["branch"]["classifier"]["kernel"])
  with pytest.raises(layout.SurgeryError, match="--method='nope' is unknown"):
    operations.merge([base_state], [base.to_dict()], method="nope")


def test_train_resume_vote_inspect_extract(tmp_path):
  done = method_commands.train_resume_vote_inspect_extract(
      tmp_path, "cl_ilr", deployed="peers_mean", branch=0, describe="(cl_ilr: no gate)")
  assert {"test/top1/branch_0", "test/top1/peers_mean", "train/kl"} <= set(done["header"])
  assert "test/top1/ensemble" not in done["header"]
  # No gate, so no 'gate' rule (it would repeat 'average', the plain mean the method deploys).
  with open(f"{done['vote']}/voting.csv") as f:
    table = list(csv.DictReader(f))
  assert list(table[0]) == ["branches", "size", "average", "vote", "examples"]
  assert len(table) == 7 and table[-1]["branches"] == "0+1+2"
  assert " gate " not in done["voted"].stdout and "average" in done["voted"].stdout

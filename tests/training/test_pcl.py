"""PCL (--config.method=pcl): the loss against a PyTorch transcription of the PCL
reproduction (tests/torch_reference.py: KDLoss, PMLoss, LossWrapper), what is detached, the
peer-ensemble teacher (en_fc on the concatenated features), the temporal mean (its update is
ema.py's, step by step, inside the jitted step; it resumes bit for bit), a view per peer
through the shared trunk, surgery (expand keeps the fused output and copies the temporal mean
with the branch; extract takes the temporal mean's branch or the live one; transplant; merge
refused in one line), and the commands on a PCL model."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch

from one_jax import parallel
from one_jax.architectures import model_spec, models
from one_jax.storage import checkpoints
from one_jax.surgery import layout, operations
from one_jax.training import losses, methods, steps, temporal_mean, train

from configs import step1
from tests import torch_reference as tr
from tests.training import method_commands

B, N, C = 3, 8, 10


def _spec(num_branches=B):
  return model_spec.ModelSpec("one_resnet", 8, C, num_branches, method="pcl")


def _state(spec, seed=0):
  return jax.tree.map(np.asarray, dict(spec.init(jax.random.key(seed), (8, 8, 3))))


@pytest.mark.parametrize("epoch", [40.0, 100.0])
def test_loss_and_gradients_match_the_pcl_code(epoch):
  rng = np.random.default_rng(0)
  logits, fused = rng.normal(size=(B, N, C)) * 3, rng.normal(size=(N, C)) * 3
  temporal = rng.normal(size=(B, N, C)) * 3
  labels = rng.integers(0, C, size=N)

  def jax_loss(z, f, t):
    out = models.OneOutput(branch_logits=z, gate=models.mean_weights(N, B).astype(z.dtype),
                           ensemble_logits=f, temporal_logits=t)
    return losses.pcl_loss(out, jnp.asarray(labels), epoch=epoch)[0]

  with jax.enable_x64(True):
    loss, (grad_z, grad_f, grad_t) = jax.value_and_grad(jax_loss, argnums=(0, 1, 2))(
        jnp.asarray(logits), jnp.asarray(fused), jnp.asarray(temporal))
  z = [torch.tensor(x, requires_grad=True) for x in logits]
  f = torch.tensor(fused, requires_grad=True)
  t = [torch.tensor(x, requires_grad=True) for x in temporal]
  expected = tr.pcl_loss(z, f, t, torch.tensor(labels), tr.sigmoid_rampup(epoch, 80.0))
  expected.backward()
  np.testing.assert_allclose(float(loss), expected.item(), rtol=1e-10)
  np.testing.assert_allclose(np.asarray(grad_z), np.stack([x.grad.numpy() for x in z]),
                             rtol=1e-7, atol=1e-12)
  np.testing.assert_allclose(np.asarray(grad_f), f.grad.numpy(), rtol=1e-7, atol=1e-12)
  # The temporal means are teachers only: no gradient reaches them, here or in the code.
  assert not np.any(np.asarray(grad_t)) and all(x.grad is None for x in t)


def test_the_teachers_are_detached():
  """KL to the fused logits reaches only the peers (the fused classifier learns from its CE);
  the peers' KL to the temporal means reaches only the peers."""
  rng = np.random.default_rng(2)
  z, f, t = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((B, N, C), (N, C), (B, N, C)))

  def grads(name):
    def fn(z, f, t):
      out = models.OneOutput(branch_logits=z, gate=models.mean_weights(N, B), ensemble_logits=f,
                             temporal_logits=t)
      return losses.pcl_loss(out, jnp.zeros(N, jnp.int32), epoch=1e9)[1][name]
    return jax.grad(fn, argnums=(0, 1, 2))(z, f, t)

  for name in ("kl", "kl_temporal"):
    grad_z, grad_f, grad_t = grads(name)
    assert bool(jnp.any(grad_z != 0)) and not bool(jnp.any(grad_f)) and not bool(jnp.any(grad_t))
  _, grad_f, _ = grads("ce_fused")
  assert bool(jnp.any(grad_f != 0))


def test_the_fusion_classifier_is_the_codes_en_fc():
  rng = np.random.default_rng(1)
  pooled = rng.normal(size=(B, 4, 16))
  with jax.enable_x64(True):
    module = models.PeerFusion(C)
    variables = module.init(jax.random.key(0), jnp.asarray(pooled))
    fused = module.apply(variables, jnp.asarray(pooled))
  en_fc = torch.nn.Linear(B * 16, C).double()
  with torch.no_grad():
    en_fc.weight.copy_(torch.tensor(np.asarray(variables["params"]["classifier"]["kernel"]).T))
    en_fc.bias.copy_(torch.tensor(np.asarray(variables["params"]["classifier"]["bias"])))
  expected = tr.pcl_fusion([torch.tensor(p) for p in pooled], en_fc)
  np.testing.assert_allclose(np.asarray(fused), expected.detach().numpy(), rtol=1e-12)


def test_the_temporal_mean_update_is_the_codes_step_by_step():
  """ema.py on a torch module and temporal_mean.update on the same numbers, 1200 steps (past
  the point where 1 - 1/(step + 1) reaches 0.999)."""
  rng = np.random.default_rng(3)
  live, ema = torch.nn.Linear(4, 3).double(), torch.nn.Linear(4, 3).double()
  update = jax.jit(temporal_mean.update)
  with jax.enable_x64(True):
    temporal = {"params": {"w": jnp.asarray(ema.weight.detach().numpy()),
                           "b": jnp.asarray(ema.bias.detach().numpy())},
                "batch_stats": {}, "count": jnp.zeros((), jnp.int32)}
    for step in range(1200):
      with torch.no_grad():
        live.weight.copy_(torch.tensor(rng.normal(size=(3, 4))))
        live.bias.copy_(torch.tensor(rng.normal(size=3)))
      tr.update_ema_variables(live, ema, alpha=0.999, global_step=step)
      temporal = update(temporal, {"w": jnp.asarray(live.weight.detach().numpy()),
                                   "b": jnp.asarray(live.bias.detach().numpy())}, {})
      if step in (0, 1, 2, 998, 999, 1000, 1199):
        np.testing.assert_allclose(np.asarray(temporal["params"]["w"]),
                                   ema.weight.detach().numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(np.asarray(temporal["params"]["b"]),
                                   ema.bias.detach().numpy(), rtol=1e-12, atol=1e-14)
  assert int(temporal["count"]) == 1200


def test_the_model_feeds_each_view_to_its_peer_and_starts_its_temporal_mean_as_itself():
  spec = _spec()
  variables = spec.init(jax.random.key(0))
  assert set(variables["params"]) == {"trunk", "branches", "fusion"}
  chex.assert_trees_all_equal(variables["temporal_mean"]["params"], variables["params"])
  chex.assert_trees_all_equal(variables["temporal_mean"]["batch_stats"], variables["batch_stats"])
  assert int(variables["temporal_mean"]["count"]) == 0
  model = spec.build()
  views = jax.random.normal(jax.random.key(1), (4, B, 32, 32, 3))
  out, _ = model.apply(variables, views, train=True, mutable=["batch_stats"])
  for b in range(B):   # the trunk's batch statistics are each view's own, as in the code
    alone, _ = model.apply(variables, views[:, b], train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(out.branch_logits[b], alone.branch_logits[b], rtol=1e-5,
                               atol=1e-5)
  method = methods.for_model(step1.get_config("three_branch,smoke"), spec)
  assert isinstance(method, methods.Pcl) and method.views == B
  assert method.best_metric == "test/top1/temporal_ensemble"
  assert method.heads == ("branch_0", "branch_1", "branch_2", "fused", "mean_branch",
                          "temporal_0", "temporal_1", "temporal_2", "temporal_ensemble",
                          "mean_temporal")
  assert "(pcl: a fusion classifier and a temporal mean)" in spec.describe()


def test_the_step_updates_the_temporal_mean_by_the_codes_formula():
  """Inside the jitted step: after step k the temporal mean is a_k ema + (1 - a_k) params with
  a_0 = 0, a_1 = 1/2; its statistics come from its own forward pass, not the live model's."""
  config = step1.get_config("three_branch,smoke")
  config.method = "pcl"
  spec = model_spec.ModelSpec.from_config(config)
  mesh = parallel.make_mesh()
  tx = optax.sgd(0.1, momentum=0.9)
  state = dict(spec.init(jax.random.key(0)))
  state["opt_state"] = tx.init(state["params"])
  step = steps.make_train_step(config, spec, tx, mesh)
  rng = np.random.default_rng(0)
  for k in range(3):
    batch = {"image": rng.normal(size=(8, B, 32, 32, 3)).astype(np.float32),
             "label": rng.integers(0, C, 8).astype(np.int32)}
    old = jax.tree.map(np.asarray, state["temporal_mean"])
    state, _, flags = step(state, batch, jnp.float32(1.0))
    assert bool(flags.ok())
    a = min(1 - 1 / (k + 1), 0.999)
    chex.assert_trees_all_close(
        state["temporal_mean"]["params"],
        jax.tree.map(lambda e, p: a * e + (1 - a) * np.asarray(p), old["params"],
                     state["params"]), rtol=1e-6, atol=1e-7)
    assert int(state["temporal_mean"]["count"]) == k + 1
  live = jax.tree.leaves(state["batch_stats"])
  mean = jax.tree.leaves(state["temporal_mean"]["batch_stats"])
  assert any(not np.array_equal(x, y) for x, y in zip(live, mean))


def test_resume_restores_the_temporal_mean_bit_for_bit(tmp_path, tiny_config):
  config = tiny_config("three_branch", num_epochs=2, method="pcl")
  train.train_and_evaluate(config, str(tmp_path / "straight"))
  first = ml_collections.ConfigDict(config.to_dict())
  first.num_epochs = 1
  train.train_and_evaluate(first, str(tmp_path / "resumed"))
  train.train_and_evaluate(config, str(tmp_path / "resumed"))
  a, _ = checkpoints.restore_raw(str(tmp_path / "straight"))
  b, _ = checkpoints.restore_raw(str(tmp_path / "resumed"))
  chex.assert_trees_all_equal(a["temporal_mean"], b["temporal_mean"])
  assert int(a["temporal_mean"]["count"]) == int(a["step"]) > 0


@pytest.mark.parametrize("mode", ["copy", "fresh"])
def test_expand_keeps_the_fused_output_and_copies_the_temporal_mean(mode):
  spec = _spec()
  state = _state(spec)
  state["temporal_mean"] = jax.tree.map(lambda x: x + 1, state["temporal_mean"])  # not live
  grown, info = operations.expand(state, spec.to_dict(), 5, mode=mode)
  big = model_spec.ModelSpec.from_dict(info)
  layout.view(grown, info, "the grown model")
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  for pick in (lambda v: v, lambda v: temporal_mean.model_variables(v["temporal_mean"])):
    before = spec.build().apply(pick(models.variables_in(state)), images)
    after = big.build().apply(pick(models.variables_in(grown)), images)
    np.testing.assert_array_equal(np.asarray(after.ensemble_logits),
                                  np.asarray(before.ensemble_logits))
    np.testing.assert_allclose(after.branch_logits[:B], before.branch_logits, rtol=1e-6)
    if mode == "copy":   # slots 3 and 4 copy branches 0 and 1, temporal means included
      np.testing.assert_allclose(after.branch_logits[3:], before.branch_logits[:2], rtol=1e-6)
  assert int(grown["temporal_mean"]["count"]) == int(state["temporal_mean"]["count"])
  kernel = grown["params"]["fusion"]["classifier"]["kernel"]
  assert kernel.shape[0] == 5 * 64 and not np.any(kernel[3 * 64:])


def test_extract_takes_the_temporal_mean_or_the_live_branch():
  spec = _spec()
  state = _state(spec)
  state["temporal_mean"]["params"] = jax.tree.map(lambda x: x * 0.5,
                                                  state["temporal_mean"]["params"])
  state["opt_state"] = {"0": {"trace": jax.tree.map(np.ones_like, state["params"])}}
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  model = spec.build()
  live = model.apply(models.variables_in(state), images).branch_logits
  mean = model.apply(temporal_mean.model_variables(state["temporal_mean"]), images).branch_logits
  for weights, expected in (("deployed", mean), ("temporal_mean", mean), ("live", live)):
    student, info = operations.extract(state, spec.to_dict(), branch=1, weights=weights)
    base = model_spec.ModelSpec.from_dict(info)
    assert info["kind"] == "cifar_resnet" and "fusion" not in student["params"]
    assert ("opt_state" in student) == (weights == "live")   # the mean never had momentum
    np.testing.assert_allclose(base.build().apply(models.variables_in(student), images),
                               expected[1], rtol=1e-5, atol=1e-5)
  one = model_spec.ModelSpec("one_resnet", 8, C, B)
  with pytest.raises(layout.SurgeryError, match="keeps no temporal mean"):
    operations.extract(_state(one), one.to_dict(), branch=0, weights="temporal_mean")
  with pytest.raises(layout.SurgeryError, match="--weights='best' is unknown"):
    operations.extract(state, spec.to_dict(), branch=0, weights="best")


def test_transplant_moves_the_temporal_mean_and_merge_refuses():
  spec = _spec()
  state, other = _state(spec), _state(spec, seed=1)
  other["temporal_mean"]["params"] = jax.tree.map(lambda x: x * 0.5,
                                                  other["temporal_mean"]["params"])
  moved, _ = operations.transplant(state, spec.to_dict(), other, spec.to_dict(), branch=0, slot=1)
  np.testing.assert_array_equal(moved["temporal_mean"]["params"]["branches"]["classifier"]["kernel"][1],
                                other["temporal_mean"]["params"]["branches"]["classifier"]["kernel"][0])
  np.testing.assert_array_equal(moved["params"]["fusion"]["classifier"]["kernel"],
                                state["params"]["fusion"]["classifier"]["kernel"])
  # A baseline lends its live weights as its temporal mean.
  base = model_spec.ModelSpec("cifar_resnet", 8, C)
  base_state = _state(base, seed=2)
  moved, _ = operations.transplant(state, spec.to_dict(), base_state, base.to_dict(), branch=0,
                                   slot=2)
  np.testing.assert_array_equal(moved["temporal_mean"]["params"]["branches"]["classifier"]["kernel"][2],
                                base_state["params"]["branch"]["classifier"]["kernel"])
  with pytest.raises(layout.SurgeryError, match="merge: a PCL model's fusion part"):
    operations.merge([state, state], [spec.to_dict()] * 2)
  with pytest.raises(layout.SurgeryError, match="merge: a PCL model's fusion part"):
    operations.merge([base_state] * 2, [base.to_dict()] * 2, method="pcl")


def test_pcl_needs_its_views_from_an_in_memory_pipeline():
  from one_jax.training import config_checks  # pylint: disable=g-import-not-at-top
  from configs import imagenet  # pylint: disable=g-import-not-at-top
  config = imagenet.get_config("resnet18_one,smoke")
  config.method = "pcl"
  with pytest.raises(ValueError, match="method='pcl' feeds each peer its own augmentation"):
    config_checks.check(config)
  with pytest.raises(ValueError, match="too few for method='pcl'"):
    dataclasses.replace(_spec(), num_branches=1)


def test_train_resume_vote_inspect_extract(tmp_path):
  done = method_commands.train_resume_vote_inspect_extract(
      tmp_path, "pcl", deployed="temporal_ensemble", branch=1,
      describe="(pcl: a fusion classifier and a temporal mean)",
      deployed_variables=lambda v: temporal_mean.model_variables(v["temporal_mean"]))
  assert {"test/top1/fused", "test/top1/temporal_ensemble", "test/top1/temporal_2",
          "test/top1/mean_temporal", "train/kl_temporal", "train/ce_fused"} <= set(done["header"])
  assert "temporal mean: 8 updates" in done["inspect"].stdout


def test_a_pcl_branch_exports_to_the_reference_names_after_extract():
  """The whole model has no place in the reference names (one line); its extracted temporal
  mean branch exports, and the reference ResNet loaded with it computes that branch's logits."""
  from one_jax.interop import pytorch  # pylint: disable=g-import-not-at-top
  spec = _spec()
  state = _state(spec)
  state["temporal_mean"]["params"] = jax.tree.map(lambda x: x * 0.9,
                                                  state["temporal_mean"]["params"])
  with pytest.raises(ValueError, match="a pcl model .* extract the branch you want"):
    pytorch.export_torch_state_dict(spec, models.variables_in(state))
  student, info = operations.extract(state, spec.to_dict(), branch=2)
  exported = pytorch.export_torch_state_dict(model_spec.ModelSpec.from_dict(info),
                                             models.variables_in(student))
  reference = tr.ResNet(8, C)
  reference.load_state_dict({k[len("module."):]: v for k, v in exported.items()})
  reference.eval()
  images = np.random.default_rng(4).normal(size=(4, 32, 32, 3)).astype(np.float32)
  expected = spec.build().apply(temporal_mean.model_variables(state["temporal_mean"]),
                                jnp.asarray(images)).branch_logits[2]
  got = reference(torch.tensor(images.transpose(0, 3, 1, 2))).detach().numpy()
  np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-4, atol=1e-4)

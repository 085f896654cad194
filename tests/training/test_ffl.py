"""FFL-S (--config.method=ffl): the fusion module and the loss against PyTorch transcriptions
of FFL-pytorch (tests/torch_reference.py: our_network.Fusion_module, train_FFL.py's loss),
what is detached, surgery (expand grows the fusion module with the fused output unchanged;
extract and transplant; merge refused in one line), and the commands on an FFL model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from one_jax.architectures import layers, model_spec, models
from one_jax.surgery import layout, operations
from one_jax.training import losses, methods

from configs import step1
from tests import torch_reference as tr
from tests.training import method_commands

B, N, C = 3, 8, 10


@pytest.mark.parametrize("epoch", [40.0, 100.0])
def test_loss_and_gradients_match_the_ffl_code(epoch):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(B, N, C)) * 3
  fused = rng.normal(size=(N, C)) * 3
  labels = rng.integers(0, C, size=N)

  def jax_loss(z, f):
    out = models.OneOutput(branch_logits=z, gate=models.mean_weights(N, B).astype(z.dtype),
                           ensemble_logits=f)
    return losses.ffl_loss(out, jnp.asarray(labels), epoch=epoch)[0]

  with jax.enable_x64(True):
    loss, (grad_z, grad_f) = jax.value_and_grad(jax_loss, argnums=(0, 1))(
        jnp.asarray(logits), jnp.asarray(fused))
  z = [torch.tensor(x, requires_grad=True) for x in logits]
  f = torch.tensor(fused, requires_grad=True)
  expected = tr.ffl_loss(z, f, torch.tensor(labels), tr.sigmoid_rampup(epoch, 80.0))
  expected.backward()
  np.testing.assert_allclose(float(loss), expected.item(), rtol=1e-10)
  np.testing.assert_allclose(np.asarray(grad_z), np.stack([x.grad.numpy() for x in z]),
                             rtol=1e-7, atol=1e-12)
  np.testing.assert_allclose(np.asarray(grad_f), f.grad.numpy(), rtol=1e-7, atol=1e-12)


def test_the_fusion_module_is_the_codes():
  """Training mode (batch statistics), float64: the fused logits of the same weights agree."""
  rng = np.random.default_rng(1)
  channels, classes = 16, 10
  maps = rng.normal(size=(B, 4, 8, 8, channels))
  with jax.enable_x64(True):
    _, norm = layers.conv_and_norm(train=True, conv_impl="xla")
    module = models.FusionModule(classes, norm)
    variables = module.init(jax.random.key(0), jnp.asarray(maps))
    variables = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.5 + (
        1.0 if x.ndim == 1 else 0.0)), variables)   # every weight drawn, BN scales near 1
    fused, _ = module.apply(variables, jnp.asarray(maps), mutable=["batch_stats"])
  p = variables["params"]
  reference = tr.FusionModule(channels, classes, B).double()
  with torch.no_grad():
    reference.conv1.weight.copy_(torch.tensor(np.asarray(p["dw"]["kernel"]).transpose(3, 2, 0, 1)))
    reference.conv1_1.weight.copy_(torch.tensor(np.asarray(p["pw"]["kernel"]).transpose(3, 2, 0, 1)))
    for bn, name in ((reference.bn1, "bn_dw"), (reference.bn1_1, "bn_pw")):
      bn.weight.copy_(torch.tensor(np.asarray(p[name]["scale"])))
      bn.bias.copy_(torch.tensor(np.asarray(p[name]["bias"])))
    reference.fc2.weight.copy_(torch.tensor(np.asarray(p["classifier"]["kernel"]).T))
    reference.fc2.bias.copy_(torch.tensor(np.asarray(p["classifier"]["bias"])))
  reference.train()
  expected = reference(*[torch.tensor(m.transpose(0, 3, 1, 2)) for m in maps])
  np.testing.assert_allclose(np.asarray(fused), expected.detach().numpy(), rtol=1e-9, atol=1e-10)


def test_the_fused_logits_teach_the_branches_and_learn_from_their_mean():
  """The targets are constants (the code's KLLoss detaches them): the branches' KL terms reach
  only the branches, the fused term only the fused classifier."""
  rng = np.random.default_rng(2)
  z = jnp.asarray(rng.normal(size=(B, N, C)), jnp.float32)
  f = jnp.asarray(rng.normal(size=(N, C)), jnp.float32)

  def term(name):
    def fn(z, f):
      out = models.OneOutput(branch_logits=z, gate=models.mean_weights(N, B), ensemble_logits=f)
      return losses.ffl_loss(out, jnp.zeros(N, jnp.int32), epoch=1e9)[1][name]
    return jax.grad(fn, argnums=(0, 1))(z, f)

  grad_z, grad_f = term("kl")
  assert bool(jnp.all(grad_f == 0)) and bool(jnp.any(grad_z != 0))
  grad_z, grad_f = term("kl_fused")
  assert bool(jnp.all(grad_z == 0)) and bool(jnp.any(grad_f != 0))


def test_the_method_deploys_the_fused_classifier():
  spec = model_spec.ModelSpec("one_resnet", 8, C, B, method="ffl")
  assert set(spec.abstract_variables()["params"]) == {"trunk", "branches", "fusion"}
  assert "(ffl: a fusion module)" in spec.describe()
  method = methods.for_model(step1.get_config("three_branch,smoke"), spec)
  assert isinstance(method, methods.Ffl) and method.best_metric == "test/top1/fused"
  assert method.heads == ("branch_0", "branch_1", "branch_2", "fused", "peers_mean",
                          "mean_branch")
  variables = spec.init(jax.random.key(0))
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  out = spec.build().apply(variables, images)
  np.testing.assert_allclose(method.head_logits(out)["peers_mean"],
                             jnp.mean(out.branch_logits, axis=0), rtol=1e-6, atol=1e-6)


def test_surgery_keeps_the_fusion_module_or_refuses_to_merge_it():
  spec = model_spec.ModelSpec("one_resnet", 8, C, B, method="ffl")
  state = jax.tree.map(np.asarray, dict(spec.init(jax.random.key(0), (8, 8, 3))))
  other = jax.tree.map(np.asarray, dict(spec.init(jax.random.key(1), (8, 8, 3))))
  moved, _ = operations.transplant(state, spec.to_dict(), other, spec.to_dict(), branch=0, slot=1)
  np.testing.assert_array_equal(moved["params"]["fusion"]["pw"]["kernel"],
                                state["params"]["fusion"]["pw"]["kernel"])
  student, info = operations.extract(state, spec.to_dict(), branch=2)
  assert info["kind"] == "cifar_resnet" and "fusion" not in student["params"]
  with pytest.raises(layout.SurgeryError, match="merge: an FFL model.s fusion part"):
    operations.merge([state, state], [spec.to_dict()] * 2)
  base = model_spec.ModelSpec("cifar_resnet", 8, C)
  base_state = jax.tree.map(np.asarray, dict(base.init(jax.random.key(2), (8, 8, 3))))
  with pytest.raises(layout.SurgeryError, match="merge: an FFL model.s fusion part"):
    operations.merge([base_state] * 2, [base.to_dict()] * 2, method="ffl")


def test_train_resume_vote_inspect_extract(tmp_path):
  done = method_commands.train_resume_vote_inspect_extract(
      tmp_path, "ffl", deployed="fused", branch=1, describe="(ffl: a fusion module)")
  assert {"test/top1/fused", "test/top1/peers_mean", "train/kl", "train/kl_fused",
          "train/ce_fused"} <= set(done["header"])
  assert "fusion" in done["inspect"].stdout


@pytest.mark.parametrize("mode", ["copy", "fresh"])
def test_expand_grows_the_fusion_module_and_keeps_its_output(mode):
  """3 -> 5 branches: each new slot's depthwise channels (and momentum) come from its source
  (a copied branch, or a fresh model), its 1x1 weights are zero, so the fused logits are
  unchanged; the old branches' blocks are kept."""
  spec = model_spec.ModelSpec("one_resnet", 8, C, B, method="ffl")
  state = jax.tree.map(np.asarray, dict(spec.init(jax.random.key(0), (8, 8, 3))))
  state["opt_state"] = {"0": {"trace": jax.tree.map(lambda x: x + 1.0, state["params"])}}
  grown, info = operations.expand(state, spec.to_dict(), 5, mode=mode)
  layout.view(grown, info, "the grown model")   # every shape (momentum too) is a 5-branch one
  big = model_spec.ModelSpec.from_dict(info)
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  before = spec.build().apply(models.variables_in(state), images).ensemble_logits
  after = big.build().apply(models.variables_in(grown), images).ensemble_logits
  np.testing.assert_array_equal(np.asarray(after), np.asarray(before))
  width = 64
  pw = grown["params"]["fusion"]["pw"]["kernel"]
  assert pw.shape[2] == 5 * width and not np.any(pw[:, :, 3 * width:])
  np.testing.assert_array_equal(pw[:, :, :3 * width], state["params"]["fusion"]["pw"]["kernel"])
  dw = grown["params"]["fusion"]["dw"]["kernel"]
  dw_trace = grown["opt_state"]["0"]["trace"]["fusion"]["dw"]["kernel"]
  old_dw = state["params"]["fusion"]["dw"]["kernel"]
  if mode == "copy":   # slots 3 and 4 copy branches 0 and 1
    np.testing.assert_array_equal(dw[..., 3 * width:4 * width], old_dw[..., :width])
    np.testing.assert_array_equal(dw_trace[..., 4 * width:], old_dw[..., width:2 * width] + 1.0)
  else:
    assert np.std(dw[..., 3 * width:]) > 0 and not np.any(dw_trace[..., 3 * width:])

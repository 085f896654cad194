"""OKDDip (--config.method=okddip): its attention and loss against a PyTorch transcription of
the OKDDip code (tests/torch_reference.py: resnet_GL.py's heads, train_GL.py's loss), what is
detached, the model's wiring (pooled features -> projections -> targets; the leader last),
surgery that keeps the leader last and the projections shared, and the commands on an OKDDip
model (train, resume, vote, inspect, extract)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from one_jax.architectures import cifar_resnet, layers, model_spec, models
from one_jax.surgery import layout, operations
from one_jax.training import losses, methods

from configs import step1
from tests import torch_reference as tr
from tests.training import method_commands

B, N, C, F = 4, 8, 10, 16   # 3 peers and a leader; projections F -> F // 8 = 2


def _output(logits, targets):
  peers = logits.shape[0] - 1
  weights = models.mean_weights(logits.shape[1], logits.shape[0], (True,) * peers + (False,))
  return models.OneOutput(branch_logits=logits, gate=weights.astype(logits.dtype),
                          ensemble_logits=jnp.mean(logits[:-1], axis=0), peer_targets=targets)


def _jax_loss(features, logits, params, labels, epoch, **options):
  targets = models.PeerAttention().apply({"params": params}, features[:-1], logits[:-1])
  return losses.okddip_loss(_output(logits, targets), labels, epoch=epoch, **options)[0]


def _torch_linear(kernel):
  linear = torch.nn.Linear(kernel.shape[0], kernel.shape[1], bias=False).double()
  with torch.no_grad():
    linear.weight.copy_(torch.tensor(np.asarray(kernel).T))
  return linear


@pytest.mark.parametrize("options,epoch", [
    (dict(), 40.0),                                               # the OKDDip code's train_GL.py
    (dict(temperature=2.0, kl_scale=0.5, detach=True), 40.0),
    (dict(rampup_epochs=0.0), 3.0),                               # full KL weight
])
def test_loss_and_gradients_match_the_okddip_code(options, epoch):
  rng = np.random.default_rng(0)
  features = rng.normal(size=(B, N, F))
  logits = rng.normal(size=(B, N, C)) * 3
  labels = rng.integers(0, C, size=N)
  params = {"query": {"kernel": rng.normal(size=(F, F // 8))},
            "key": {"kernel": rng.normal(size=(F, F // 8))}}
  with jax.enable_x64(True):
    loss, grads = jax.value_and_grad(_jax_loss, argnums=(0, 1, 2))(
        jnp.asarray(features), jnp.asarray(logits), jax.tree.map(jnp.asarray, params),
        jnp.asarray(labels), epoch, **options)
  h = [torch.tensor(x, requires_grad=True) for x in features]
  z = [torch.tensor(x, requires_grad=True) for x in logits]
  query, key = (_torch_linear(params[k]["kernel"]) for k in ("query", "key"))
  pro, x_m, x_stu = tr.okddip_heads(h[:-1], z[:-1], z[-1], query, key)
  expected = tr.okddip_loss(pro, x_m, x_stu, torch.tensor(labels),
                            tr.sigmoid_rampup(epoch, options.get("rampup_epochs", 80.0)),
                            temperature=options.get("temperature", 3.0),
                            alpha=options.get("kl_scale", 1.0), detach=options.get("detach", False))
  expected.backward()
  grad_of = lambda x: np.zeros(x.shape) if x.grad is None else x.grad.numpy()  # None: unreached
  np.testing.assert_allclose(float(loss), expected.item(), rtol=1e-10)
  feature_grads, logit_grads, param_grads = grads
  # The leader's features feed nothing (its target is the peers' mean): zero gradient.
  np.testing.assert_allclose(np.asarray(feature_grads[:-1]),
                             np.stack([grad_of(x) for x in h[:-1]]), rtol=1e-7, atol=1e-12)
  assert not np.any(np.asarray(feature_grads[-1]))
  np.testing.assert_allclose(np.asarray(logit_grads), np.stack([grad_of(x) for x in z]),
                             rtol=1e-7, atol=1e-12)
  for k, linear in (("query", query), ("key", key)):
    np.testing.assert_allclose(np.asarray(param_grads[k]["kernel"]), grad_of(linear.weight).T,
                               rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("detach", [False, True])
def test_what_is_detached(detach):
  """Not detached (the code's choice), the KL terms are what trains the projections, and a
  peer's term reaches the others' logits and the leader's the peers'; detached, neither."""
  rng = np.random.default_rng(1)
  features = jnp.asarray(rng.normal(size=(B, N, F)), jnp.float32)
  logits = jnp.asarray(rng.normal(size=(B, N, C)), jnp.float32)
  params = models.PeerAttention().init(jax.random.key(0), features[:-1], logits[:-1])["params"]
  labels = jnp.zeros(N, jnp.int32)

  def terms(z, p):
    targets = models.PeerAttention().apply({"params": p}, features[:-1], z[:-1])
    return losses.okddip_loss(_output(z, targets), labels, epoch=1e9, detach=detach)[1]

  peer_kl = jax.grad(lambda z, p: terms(z, p)["kl"], argnums=(0, 1))(logits, params)
  leader_kl = jax.grad(lambda z: terms(z, params)["kl_leader"])(logits)
  assert bool(jnp.all(peer_kl[0][-1] == 0))      # the leader is in no peer's target
  assert all(bool(jnp.all(g == 0)) == detach for g in jax.tree.leaves(peer_kl[1]))
  assert bool(jnp.any(leader_kl[-1] != 0))
  assert bool(jnp.all(leader_kl[:-1] == 0)) == detach
  # The cross-entropy terms never reach the projections.
  ce = jax.grad(lambda p: terms(logits, p)["ce_branches"])(params)
  assert all(not jnp.any(g) for g in jax.tree.leaves(ce))


def test_the_model_attends_over_its_peers_pooled_features():
  """The model's targets are resnet_GL.py's heads applied to each peer's pooled features (the
  input of its classifier) with the model's projections; the leader's target is the peers'
  mean, which is also the ensemble."""
  spec = model_spec.ModelSpec("one_resnet", 8, C, B, method="okddip")
  variables = spec.init(jax.random.key(0))
  images = jax.random.normal(jax.random.key(1), (N, 32, 32, 3))
  out = spec.build().apply(variables, images)
  trunk = cifar_resnet.Trunk(8, *layers.conv_and_norm())
  x = trunk.apply({c: variables[c]["trunk"] for c in ("params", "batch_stats")}, images)
  pooled = []
  for b in range(B):
    v = {c: jax.tree.map(lambda a, b=b: a[b], variables[c]["branches"])
         for c in ("params", "batch_stats")}
    features, logits = cifar_resnet.Branch(8, C, *layers.conv_and_norm()).apply(v, x)
    np.testing.assert_allclose(logits, out.branch_logits[b], rtol=1e-5, atol=1e-5)
    pooled.append(torch.tensor(np.asarray(jnp.mean(features, axis=(1, 2)), np.float64)))
  attention = variables["params"]["attention"]
  z = [torch.tensor(np.asarray(out.branch_logits[b], np.float64)) for b in range(B)]
  _, x_m, _ = tr.okddip_heads(pooled[:-1], z[:-1], z[-1],
                              _torch_linear(attention["query"]["kernel"]),
                              _torch_linear(attention["key"]["kernel"]))
  np.testing.assert_allclose(np.asarray(out.peer_targets), np.moveaxis(x_m.detach().numpy(), -1, 0),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.ensemble_logits, jnp.mean(out.branch_logits[:-1], axis=0),
                             rtol=1e-6, atol=1e-6)
  assert attention["query"]["kernel"].shape == (64, 8) and "bias" not in attention["query"]


def test_the_method_deploys_the_leader_and_is_recorded():
  spec = model_spec.ModelSpec("one_resnet", 8, C, B, method="okddip")
  assert set(spec.abstract_variables()["params"]) == {"trunk", "branches", "attention"}
  assert spec.to_dict()["method"] == "okddip" and not spec.has_gate
  assert model_spec.ModelSpec.from_dict(spec.to_dict()) == spec
  assert "3 peers and a leader" in spec.describe()
  method = methods.for_model(step1.get_config("three_branch,smoke"), spec)
  assert isinstance(method, methods.Okddip) and method.best_metric == "test/top1/leader"
  assert method.heads == ("branch_0", "branch_1", "branch_2", "branch_3", "peers_mean", "leader",
                          "mean_branch")
  assert methods.deployed_head("okddip") == "leader"
  with pytest.raises(ValueError, match="too few for method='okddip'"):
    model_spec.ModelSpec("one_resnet", 8, C, 1, method="okddip")


def _state(spec, seed):
  return jax.tree.map(np.asarray, dict(spec.init(jax.random.key(seed), (8, 8, 3))))


def test_surgery_keeps_the_leader_last_and_the_projections_shared():
  spec = model_spec.ModelSpec("one_resnet", 8, C, 3, method="okddip")
  state = _state(spec, 0)
  kernel = lambda s: s["params"]["branches"]["classifier"]["kernel"]
  grown, info = operations.expand(state, spec.to_dict(), 5)
  assert (info["method"], info["num_branches"]) == ("okddip", 5)
  # New peers (copies of peers 0 and 1) go before the leader, which stays last.
  for slot, source in enumerate([0, 1, 0, 1, 2]):
    np.testing.assert_array_equal(kernel(grown)[slot], kernel(state)[source])
  np.testing.assert_array_equal(grown["params"]["attention"]["query"]["kernel"],
                                state["params"]["attention"]["query"]["kernel"])
  fresh, _ = operations.expand(state, spec.to_dict(), 4, mode="fresh")
  np.testing.assert_array_equal(kernel(fresh)[3], kernel(state)[2])
  # Transplant keeps the destination's projections; extract gives a plain network.
  other = _state(spec, 1)
  moved, _ = operations.transplant(state, spec.to_dict(), other, spec.to_dict(), branch=0, slot=2)
  np.testing.assert_array_equal(kernel(moved)[2], kernel(other)[0])
  np.testing.assert_array_equal(moved["params"]["attention"]["key"]["kernel"],
                                state["params"]["attention"]["key"]["kernel"])
  student, student_info = operations.extract(state, spec.to_dict(), branch=2)
  assert student_info["kind"] == "cifar_resnet" and set(student["params"]) == {"trunk", "branch"}
  # Merging an OKDDip model would put its leader among peers: refused, in one line.
  with pytest.raises(layout.SurgeryError, match="is an OKDDip model, whose last branch is its"):
    operations.merge([state, state], [spec.to_dict()] * 2)
  # Baselines merge into an OKDDip group: the last is the leader, the projections fresh.
  base = model_spec.ModelSpec("cifar_resnet", 8, C)
  bases = [_state(base, s) for s in range(3)]
  merged, info = operations.merge(bases, [base.to_dict()] * 3, method="okddip", rng=5)
  assert (info["method"], info["num_branches"]) == ("okddip", 3)
  np.testing.assert_array_equal(kernel(merged)[2], bases[2]["params"]["branch"]["classifier"]["kernel"])
  query = merged["params"]["attention"]["query"]["kernel"]
  assert query.shape == (64, 8) and np.std(query) > 0.01   # a fresh draw, not zeros


def test_train_resume_vote_inspect_extract(tmp_path):
  done = method_commands.train_resume_vote_inspect_extract(
      tmp_path, "okddip", deployed="leader", branch=2,
      describe="(okddip: 2 peers and a leader)")
  assert {"test/top1/branch_2", "test/top1/leader", "test/top1/peers_mean", "train/kl",
          "train/kl_leader"} <= set(done["header"])
  assert " gate " not in done["voted"].stdout
  assert "attention" in done["inspect"].stdout

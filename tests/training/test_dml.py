"""DML (--config.method=dml): B independent networks (the branches start at the input), its
loss and gradients against PyTorch transcriptions of the OKDDip code's and MCL-OKD's DML
(tests/torch_reference.py), what is detached, that the peers share nothing, surgery on
independent peers (baselines merge into a group, a peer extracts, expands and transplants with
its own trunk), and the commands on a DML model (train, resume, vote, inspect, extract)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from one_jax.architectures import model_spec, models
from one_jax.interop import pytorch
from one_jax.surgery import layout, operations
from one_jax.training import losses, methods

from configs import step1
from tests import torch_reference as tr
from tests.training import method_commands

B, N, C = 3, 8, 10


def _output(logits):
  weights = models.mean_weights(logits.shape[1], logits.shape[0])
  return models.OneOutput(branch_logits=logits, gate=weights.astype(logits.dtype),
                          ensemble_logits=jnp.mean(logits, axis=0))


def _jax_loss(logits, labels, **options):
  return losses.dml_loss(_output(logits), labels, epoch=0.0, **options)[0]


@pytest.mark.parametrize("options,reference,rtol", [
    # The OKDDip code's train_DML.py: others' mean (its default), and pairwise (--type).
    (dict(target="others_mean", temperature=3.0, detach=False),
     lambda z, y: tr.dml_okddip_loss(torch.stack(z, -1), y, 3.0, pairwise=False), 1e-10),
    (dict(target="pairwise", temperature=3.0, detach=False),
     lambda z, y: tr.dml_okddip_loss(torch.stack(z, -1), y, 3.0, pairwise=True), 1e-10),
    # MCL-OKD's main_cifar_dml.py: pairwise, detached, T 2 (its KL lacks the teacher's 1e-7).
    (dict(target="pairwise", temperature=2.0, detach=True),
     lambda z, y: tr.dml_mcl_okd_loss(z, y, 2.0), 1e-5),
])
def test_loss_and_gradients_match_the_public_code(options, reference, rtol):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(B, N, C)) * 3
  labels = rng.integers(0, C, size=N)
  with jax.enable_x64(True):
    loss, grads = jax.value_and_grad(_jax_loss)(jnp.asarray(logits), jnp.asarray(labels),
                                                **options)
  z = [torch.tensor(x, requires_grad=True) for x in logits]
  expected = reference(z, torch.tensor(labels))
  expected.backward()
  np.testing.assert_allclose(float(loss), expected.item(), rtol=rtol)
  np.testing.assert_allclose(np.asarray(grads), np.stack([x.grad.numpy() for x in z]),
                             rtol=rtol, atol=rtol * 1e-2)


@pytest.mark.parametrize("target", losses.DML_TARGETS)
@pytest.mark.parametrize("detach", [False, True])
def test_what_is_detached(target, detach):
  """Detached, each peer's KL term trains only that peer: the KL's gradient is the sum of
  each term's own-student gradient; not detached, the terms also reach the targets' peers."""
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(B, N, C)), jnp.float32)
  labels = jnp.zeros(N, jnp.int32)

  def kl(z, detached):
    return losses.dml_loss(_output(z), labels, epoch=0.0, target=target,
                           detach=detached)[1]["kl"]

  def own_terms(z):   # each term written out with its targets constants
    sg = jax.lax.stop_gradient
    others = lambda b: [z[j] for j in range(B) if j != b]
    if target == "pairwise":
      return sum(sum(losses.distillation_kl(z[b], sg(t), 1.0) for t in others(b)) / (B - 1)
                 for b in range(B))
    return sum(losses.distillation_kl(z[b], sg(sum(others(b)) / (B - 1)), 1.0) for b in range(B))

  whole, own = jax.grad(kl)(logits, detach), jax.grad(own_terms)(logits)
  assert bool(jnp.all(own != 0))
  assert bool(np.allclose(whole, own, rtol=1e-6, atol=1e-9)) == detach


def test_the_defaults_are_the_papers():
  config = step1.get_config("three_branch,smoke")
  config.method = "dml"
  method = methods.for_model(config, model_spec.ModelSpec.from_config(config))
  assert isinstance(method, methods.Dml)
  assert (method.target, method.detach, method.temperature, method.rampup_epochs) == (
      "pairwise", True, 1.0, 0.0)
  assert method.epoch_metrics(0)["kl_weight"] == 1.0   # no ramp-up: full weight at once
  assert method.best_metric == "test/top1/peers_mean"


def test_the_peers_share_nothing():
  """Every parameter, the trunk's included, has the peer axis; peer b's loss has no gradient
  on any other peer's parameters, and each peer computes what a plain network of its slices
  computes."""
  spec = model_spec.ModelSpec("one_resnet", 8, C, B, method="dml")
  variables = spec.init(jax.random.key(0))
  assert set(variables["params"]) == {"trunk", "branches"} and spec.independent
  for leaf in jax.tree.leaves(variables):
    assert leaf.shape[0] == B
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  model = spec.build()

  def peer_1_ce(params):
    out, _ = model.apply(dict(variables, params=params), images, train=True,
                         mutable=["batch_stats"])
    return losses.cross_entropy(out.branch_logits[1], jnp.arange(4))

  grads = jax.grad(peer_1_ce)(variables["params"])
  for leaf in jax.tree.leaves(grads):
    assert not np.any(np.asarray(leaf)[[0, 2]]) and np.any(np.asarray(leaf)[1])
  single = spec.with_branches(None)
  out = model.apply(variables, images)
  for b in range(B):
    peer = {c: {"trunk": jax.tree.map(lambda x, b=b: x[b], variables[c]["trunk"]),
                "branch": jax.tree.map(lambda x, b=b: x[b], variables[c]["branches"])}
            for c in ("params", "batch_stats")}
    np.testing.assert_allclose(single.build().apply(peer, images), out.branch_logits[b],
                               rtol=1e-5, atol=1e-5)
  assert "3 independent networks (dml)" in spec.describe()
  with pytest.raises(ValueError, match="extract the branch you want"):
    pytorch.export_torch_state_dict(spec, variables)


def _state(spec, seed):
  return jax.tree.map(np.asarray, dict(spec.init(jax.random.key(seed), (8, 8, 3))))


def test_surgery_moves_whole_networks():
  base = model_spec.ModelSpec("cifar_resnet", 8, C)
  bases = [_state(base, s) for s in range(B)]
  group, info = operations.merge(bases, [base.to_dict()] * B, method="dml")
  assert (info["method"], info["num_branches"]) == ("dml", B)
  conv = lambda s, part: s["params"][part]["conv1"]["kernel"] if part == "trunk" else (
      s["params"][part]["classifier"]["kernel"])
  for b in range(B):   # each baseline is one peer, its trunk included
    np.testing.assert_array_equal(conv(group, "trunk")[b], conv(bases[b], "trunk"))
    np.testing.assert_array_equal(conv(group, "branches")[b], conv(bases[b], "branch"))
  spec = model_spec.ModelSpec.from_dict(info)
  student, student_info = operations.extract(group, info, branch=1)
  assert student_info == base.to_dict()
  for tree in ("params", "batch_stats"):
    jax.tree.map(np.testing.assert_array_equal, student[tree], bases[1][tree])
  grown, grown_info = operations.expand(group, info, 5, sources=[2, 0])
  assert grown_info["num_branches"] == 5
  np.testing.assert_array_equal(conv(grown, "trunk")[3], conv(bases[2], "trunk"))
  np.testing.assert_array_equal(conv(grown, "trunk")[4], conv(bases[0], "trunk"))
  other = _state(spec, 7)
  moved, _ = operations.transplant(group, info, other, info, branch=2, slot=0)
  np.testing.assert_array_equal(conv(moved, "trunk")[0], conv(other, "trunk")[2])
  np.testing.assert_array_equal(conv(moved, "trunk")[1], conv(group, "trunk")[1])
  # A baseline's whole network transplants into a slot; groups of one method merge.
  moved, _ = operations.transplant(group, info, bases[0], base.to_dict(), branch=0, slot=2)
  np.testing.assert_array_equal(conv(moved, "trunk")[2], conv(bases[0], "trunk"))
  merged, merged_info = operations.merge([group, group], [info, info])
  assert merged_info["num_branches"] == 2 * B
  np.testing.assert_array_equal(conv(merged, "trunk")[B + 1], conv(group, "trunk")[1])
  one = model_spec.ModelSpec("one_resnet", 8, C, B)
  with pytest.raises(layout.SurgeryError, match="name different methods"):
    operations.merge([group, _state(one, 0)], [info, one.to_dict()])


def test_surgery_keeps_momentum_per_network():
  """The optimizer state follows each network: an extracted student's trunk momentum is its
  peer's, and merging baselines with momentum stacks theirs."""
  base = model_spec.ModelSpec("cifar_resnet", 8, C)
  bases = []
  for s in range(2):
    state = _state(base, s)
    state["opt_state"] = {"0": {"trace": jax.tree.map(lambda x, s=s: np.full_like(x, s + 1.0),
                                                       state["params"])}}
    bases.append(state)
  group, info = operations.merge(bases, [base.to_dict()] * 2, method="dml")
  trace = group["opt_state"]["0"]["trace"]
  np.testing.assert_array_equal(trace["trunk"]["conv1"]["kernel"][1],
                                np.full_like(bases[1]["params"]["trunk"]["conv1"]["kernel"], 2.0))
  student, _ = operations.extract(group, info, branch=1)
  np.testing.assert_array_equal(student["opt_state"]["0"]["trace"]["trunk"]["conv1"]["kernel"],
                                np.full_like(bases[1]["params"]["trunk"]["conv1"]["kernel"], 2.0))


def test_train_resume_vote_inspect_extract(tmp_path):
  done = method_commands.train_resume_vote_inspect_extract(
      tmp_path, "dml", deployed="peers_mean", branch=0, describe="3 independent networks (dml)")
  assert {"test/top1/branch_0", "test/top1/peers_mean", "train/kl"} <= set(done["header"])
  assert " gate " not in done["voted"].stdout
  # Every parameter belongs to a branch: no shared trunk line.
  counts = done["inspect"].stdout.split("parameters:")[1].split("optimizer")[0]
  assert "trunk" not in counts and "branch 2" in counts


def test_an_inactive_peer_keeps_its_whole_network():
  """--config.active_branches trains only the named peers; an inactive peer's trunk, like its
  branch, keeps its parameters, statistics and momentum (weight decay included)."""
  from one_jax import parallel   # pylint: disable=g-import-not-at-top
  from one_jax.training import optimizer, steps, train_state   # pylint: disable=g-import-not-at-top
  config = step1.get_config("three_branch,smoke")
  config.method, config.active_branches = "dml", "0,2"
  spec = model_spec.ModelSpec.from_config(config)
  mesh = parallel.make_mesh()
  tx = optimizer.create_optimizer(config, 4, spec.abstract_variables()["params"])
  state = train_state.initial_state(spec, tx, (32, 32, 3), jax.random.key(0))
  state["opt_state"] = jax.tree.map(lambda x: x + 0.5 if jnp.issubdtype(x.dtype, jnp.floating)
                                    else x, state["opt_state"])   # momentum to keep or decay
  before = jax.tree.map(np.asarray, state)
  batch = {"image": jax.random.normal(jax.random.key(1), (8, 32, 32, 3)),
           "label": jnp.arange(8) % C}
  after, _, _ = steps.make_train_step(config, spec, tx, mesh)(
      parallel.replicate(state, mesh), parallel.shard_batch(batch, mesh), jnp.float32(0))
  after = jax.tree.map(np.asarray, after)
  for tree in ("params", "batch_stats", "opt_state"):
    for path, old in jax.tree_util.tree_leaves_with_path(before[tree]):
      new = dict(jax.tree_util.tree_leaves_with_path(after[tree]))[path]
      if old.ndim and old.shape[0] == B:
        np.testing.assert_array_equal(new[1], old[1], err_msg=jax.tree_util.keystr(path))
        assert not np.array_equal(new[0], old[0]), jax.tree_util.keystr(path)


def test_after_lr_measures_each_peer_against_its_own_output_layer():
  """The gradient-ratio learning rates ("After LR") give each peer's trunk its own factors,
  from its own gradients against its own classifier's."""
  from one_jax.training import optimizer   # pylint: disable=g-import-not-at-top
  config = step1.get_config("five_branch_after_lr,smoke")
  config.method, config.num_branches = "dml", B
  spec = model_spec.ModelSpec.from_config(config)
  params = spec.init(jax.random.key(0))["params"]
  tx = optimizer.create_optimizer(config, 4, params)
  state = tx.init(params)
  ratio_state = state[0]
  for leaf in jax.tree.leaves(ratio_state.factors["trunk"]):
    assert leaf.shape == (B,)
  # Peer 1 alone has gradients (|g| 1 in its classifier, 0.5 elsewhere): only its factors
  # move, towards 2 (the others' ratios are undefined and keep theirs).
  grads = jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.zeros_like(p).at[1].set(
          1.0 if "classifier" in jax.tree_util.keystr(path) else 0.5), params)
  _, new_state = tx.update(grads, state, params)
  for leaf in jax.tree.leaves(new_state[0].factors):
    np.testing.assert_array_equal(np.asarray(leaf)[[0, 2]], 1.0)
  conv = new_state[0].factors["trunk"]["layer1_0"]["conv1"]["kernel"]
  np.testing.assert_allclose(conv[1], 0.9 * 1.0 + 0.1 * 2.0, rtol=1e-6)

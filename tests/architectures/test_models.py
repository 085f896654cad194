"""Model architecture, stacked-branch layout and branch implementations."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from one_jax.architectures import cifar_resnet, layers, model_spec, models
from one_jax.training import losses

IMAGES = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))


def one_resnet(depth=32, num_branches=3, num_classes=100, **runtime):
  return model_spec.ModelSpec("one_resnet", depth, num_classes, num_branches, **runtime).build()


def cifar_resnet_model(depth=32, num_classes=10):
  return model_spec.ModelSpec("cifar_resnet", depth, num_classes).build()


def _param_count(model):
  shapes = jax.eval_shape(model.init, jax.random.key(0), IMAGES[:1])
  return models.count_params(shapes["params"])


@pytest.mark.parametrize("model,expected", [
    (one_resnet(depth=32, num_branches=3, num_classes=100), 1_193_189),
    (one_resnet(depth=32, num_branches=5, num_classes=10), 1_884_337),
    (one_resnet(depth=56, num_branches=3, num_classes=100), 2_261_829),
    (cifar_resnet_model(depth=32, num_classes=10), 466_906),
])
def test_parameter_counts_match_reference(model, expected):
  assert _param_count(model) == expected


@pytest.mark.parametrize("depth", [8, 20, 32, 56])
@pytest.mark.parametrize("num_branches", [1, 3, 5])
def test_output_shapes(depth, num_branches):
  model = one_resnet(depth=depth, num_branches=num_branches, num_classes=7)
  variables = jax.eval_shape(model.init, jax.random.key(0), IMAGES[:1])
  out = jax.eval_shape(model.apply, variables, IMAGES)
  chex.assert_shape(out.branch_logits, (num_branches, 4, 7))
  chex.assert_shape(out.gate, (4, num_branches))
  chex.assert_shape(out.ensemble_logits, (4, 7))
  assert variables["gate_offset"]["log_weight"].shape == (num_branches,)
  assert "gate_offset" not in variables["params"]


def test_baseline_output_shape():
  model = cifar_resnet_model(depth=20, num_classes=10)
  variables = jax.eval_shape(model.init, jax.random.key(0), IMAGES[:1])
  chex.assert_shape(jax.eval_shape(model.apply, variables, IMAGES), (4, 10))


@pytest.fixture(scope="module")
def one_model():
  model = one_resnet(depth=8, num_branches=3, num_classes=10, branch_impl="loop")
  return model, model.init(jax.random.key(0), IMAGES[:1])


def test_gate_and_ensemble(one_model):
  model, variables = one_model
  out = model.apply(variables, IMAGES)
  chex.assert_trees_all_close(out.gate.sum(axis=1), jnp.ones(4), atol=1e-6)
  expected = jnp.einsum("nb,bnc->nc", out.gate, out.branch_logits)
  manual = sum(out.gate[:, b, None] * out.branch_logits[b] for b in range(3))
  chex.assert_trees_all_close(out.ensemble_logits, expected, manual, atol=1e-5)


def test_single_branch_ensemble_is_the_branch():
  model = one_resnet(depth=8, num_branches=1, num_classes=10)
  variables = model.init(jax.random.key(0), IMAGES[:1])
  out = model.apply(variables, IMAGES)
  chex.assert_trees_all_close(out.gate, jnp.ones((4, 1)))
  chex.assert_trees_all_close(out.ensemble_logits, out.branch_logits[0], atol=1e-6)


def test_gate_offset_shifts_gate(one_model):
  model, variables = one_model
  shifted = dict(variables, gate_offset={"log_weight": jnp.array([0.0, jnp.log(2.0), 0.0])})
  g0 = model.apply(variables, IMAGES).gate
  g1 = model.apply(shifted, IMAGES).gate
  # An offset of log 2 doubles that branch's unnormalised weight.
  ratio = (g1[:, 1] / g1[:, 0]) / (g0[:, 1] / g0[:, 0])
  chex.assert_trees_all_close(ratio, 2.0 * jnp.ones(4), rtol=1e-5)


def test_stacked_layout(one_model):
  model, variables = one_model
  single = cifar_resnet.Branch(8, 10, *layers.conv_and_norm())
  trunk_out = jnp.zeros((1, 16, 16, 32))
  single_vars = jax.eval_shape(single.init, jax.random.key(0), trunk_out)
  for col in ("params", "batch_stats"):
    stacked = variables[col]["branches"]
    for leaf in jax.tree.leaves(stacked):
      assert leaf.shape[0] == 3
    for b in range(3):
      sliced = jax.tree.map(lambda a, b=b: a[b], stacked)
      chex.assert_trees_all_equal_shapes(sliced, single_vars[col])


def test_slices_are_independent_branches(one_model):
  """Slicing index b and applying a plain Branch gives branch b's logits."""
  model, variables = one_model
  trunk = cifar_resnet.Trunk(8, *layers.conv_and_norm())
  feats = trunk.apply({"params": variables["params"]["trunk"],
                       "batch_stats": variables["batch_stats"]["trunk"]}, IMAGES)
  out = model.apply(variables, IMAGES)
  for b in range(3):
    v = {c: jax.tree.map(lambda a, b=b: a[b], variables[c]["branches"])
         for c in ("params", "batch_stats")}
    _, logits = cifar_resnet.Branch(8, 10, *layers.conv_and_norm()).apply(v, feats)
    chex.assert_trees_all_close(logits, out.branch_logits[b], atol=1e-5)


def _loss_and_grads(model, variables, labels):
  def loss_fn(params):
    out, new_state = model.apply(dict(variables, params=params), IMAGES, train=True,
                                 mutable=["batch_stats"])
    loss, _ = losses.one_loss(out, labels, epoch=40.0,
                              active_branches=model.active_branches)
    return loss, (out, new_state["batch_stats"])
  (loss, (out, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
  return loss, out, stats, grads


def test_vmap_and_loop_agree(one_model):
  _, variables = one_model
  labels = jnp.array([0, 1, 2, 3])
  results = []
  for impl in ("loop", "vmap"):
    model = one_resnet(depth=8, num_branches=3, num_classes=10, branch_impl=impl)
    results.append(jax.jit(lambda v, m=model: _loss_and_grads(m, v, labels))(variables))
  (l0, o0, s0, g0), (l1, o1, s1, g1) = results
  chex.assert_trees_all_close(l0, l1, rtol=1e-5)
  chex.assert_trees_all_close(o0, o1, atol=1e-4, rtol=1e-4)
  chex.assert_trees_all_close(s0, s1, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(g0, g1, atol=1e-5, rtol=1e-3)


def test_auto_impl_is_loop_on_cpu():
  assert models.resolve_branch_impl("auto") == "loop"


@pytest.mark.parametrize("impl", ["loop", "vmap"])
def test_active_branch_mask(one_model, impl):
  _, variables = one_model
  model = one_resnet(depth=8, num_branches=3, num_classes=10, branch_impl=impl,
                           active_branches=(True, False, True))
  _, out, _, grads = _loss_and_grads(model, variables, jnp.array([0, 1, 2, 3]))
  np.testing.assert_array_equal(out.gate[:, 1], 0.0)
  chex.assert_trees_all_close(out.gate.sum(axis=1), jnp.ones(4), atol=1e-6)
  for leaf in jax.tree.leaves(grads["branches"]):
    np.testing.assert_array_equal(leaf[1], 0.0)
    assert np.abs(leaf[0]).max() > 0 or np.abs(leaf[2]).max() > 0


@pytest.mark.parametrize("kwargs,needle", [
    (dict(depth=33), "depth=33"),
    (dict(depth=0), "depth=0"),
    (dict(num_branches=0), "num_branches=0"),
    (dict(num_classes=0), "num_classes=0"),
    (dict(branch_impl="pmap"), "branch_impl='pmap'"),
    (dict(num_branches=2, active_branches=(False, False)), "active_branches"),
])
def test_bad_constructor_arguments(kwargs, needle):
  with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
    one_resnet(**kwargs)


def test_bad_baseline_arguments():
  with pytest.raises(ValueError, match="depth=33"):
    cifar_resnet_model(depth=33)
  with pytest.raises(ValueError, match="num_classes=0"):
    cifar_resnet_model(num_classes=0)


def test_block_types():
  assert cifar_resnet.block_type(32) == "basic"
  assert cifar_resnet.block_type(44) == "bottleneck"
  assert cifar_resnet.block_type(56) == "bottleneck"

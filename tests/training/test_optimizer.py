"""Optimizer: schedules, SGD against torch.optim.SGD, gradient-ratio learning rates, masks."""
import types

import chex
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from one_jax.architectures import model_spec
from one_jax.training import optimizer as opt


def make_config(**overrides):
  fields = dict(lr=0.1, schedule="multistep", milestones=(150, 225), gamma=0.1, num_epochs=300,
                warmup_epochs=0, momentum=0.9, weight_decay=1e-4, nesterov=False, geo_lr=0,
                geo_lr_min=0.1, geo_lr_max=20.0, geo_lr_ema=0.9)
  fields.update(overrides)
  return types.SimpleNamespace(**fields)


def small_params(rng, num_branches=2):
  """A ONE-shaped tree: a trunk conv and BatchNorm, stacked branches with classifiers, a gate."""
  b = num_branches
  shapes = {"trunk": {"conv1": {"kernel": (3, 3, 1, 2)}, "bn1": {"scale": (2,), "bias": (2,)}},
            "branches": {"layer3_0": {"conv1": {"kernel": (b, 3, 3, 2, 2)}},
                         "classifier": {"kernel": (b, 2, 3), "bias": (b, 3)}},
            "gate": {"dense": {"kernel": (2, b), "bias": (b,)}}}
  return jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


# ---------------------------------------------------------------------------------------------
# Schedules.


@pytest.mark.parametrize("gamma", [0.1, 0.333])
def test_multistep_decays_at_the_start_of_milestone_epochs(gamma):
  config = make_config(gamma=gamma)
  spe = 7
  schedule = opt.learning_rate_schedule(config, spe)
  expected = {0: 0.1, 149: 0.1, 150: 0.1 * gamma, 224: 0.1 * gamma, 225: 0.1 * gamma ** 2,
              299: 0.1 * gamma ** 2}
  for epoch, lr in expected.items():
    np.testing.assert_allclose(float(schedule(epoch * spe)), lr, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(epoch * spe + spe - 1)), lr, rtol=1e-6)
    np.testing.assert_allclose(opt.epoch_learning_rate(config, epoch), lr, rtol=1e-6)
  # Jittable, and the last step of epoch 149 is still undecayed.
  np.testing.assert_allclose(jax.jit(schedule)(jnp.int32(150 * spe - 1)), 0.1, rtol=1e-6)


def test_multistep_without_milestones_is_constant():
  schedule = opt.learning_rate_schedule(make_config(milestones=()), 3)
  np.testing.assert_allclose([float(schedule(s)) for s in (0, 500, 899)], 0.1, rtol=1e-6)


def test_cosine_endpoints_and_warmup():
  spe = 5
  config = make_config(schedule="cosine", num_epochs=10)
  schedule = opt.learning_rate_schedule(config, spe)
  np.testing.assert_allclose(float(schedule(0)), 0.1, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(25)), 0.05, rtol=1e-5)
  np.testing.assert_allclose(float(schedule(50)), 0.0, atol=1e-8)
  np.testing.assert_allclose(opt.epoch_learning_rate(config, 5), 0.05, rtol=1e-5)
  warm = opt.learning_rate_schedule(
      make_config(schedule="cosine", num_epochs=10, warmup_epochs=2), spe)
  np.testing.assert_allclose([float(warm(s)) for s in (0, 4, 9, 10)], [0.01, 0.05, 0.1, 0.1],
                             rtol=1e-5)
  np.testing.assert_allclose(float(warm(30)), 0.05, rtol=1e-5)  # cosine over steps 10..50
  np.testing.assert_allclose(float(warm(50)), 0.0, atol=1e-8)


@pytest.mark.parametrize("overrides, match", [
    (dict(schedule="step"), "schedule='step' is unknown"),
    (dict(lr=0.0), "lr=0.0 is invalid"),
    (dict(warmup_epochs=300), "warmup_epochs=300"),
    (dict(geo_lr=-1), "geo_lr=-1 is invalid"),
])
def test_bad_config_gets_a_clear_error(overrides, match):
  with pytest.raises(ValueError, match=match):
    opt.create_optimizer(make_config(**overrides), 10, small_params(np.random.default_rng(0)))


def test_gradient_ratio_needs_an_output_layer():
  with pytest.raises(ValueError, match="output layer 'classifier'"):
    opt.create_optimizer(make_config(geo_lr=1), 10, {"trunk": {"conv": {"kernel": np.ones(3)}}})


# ---------------------------------------------------------------------------------------------
# SGD == torch.optim.SGD.


def run_torch_sgd(params, grads_per_step, lrs, nesterov):
  torch = pytest.importorskip("torch")
  leaves, treedef = jax.tree.flatten(params)
  tensors = [torch.nn.Parameter(torch.tensor(np.asarray(x))) for x in leaves]
  sgd = torch.optim.SGD(tensors, lr=lrs[0], momentum=0.9, weight_decay=1e-4, nesterov=nesterov)
  for grads, lr in zip(grads_per_step, lrs):
    for group in sgd.param_groups:
      group["lr"] = lr
    for t, g in zip(tensors, jax.tree.leaves(grads)):
      t.grad = torch.tensor(np.asarray(g))
    sgd.step()
  return jax.tree.unflatten(treedef, [t.detach().numpy() for t in tensors])


def run_optax(tx, params, grads_per_step):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for grads in grads_per_step:
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_torch_with_a_changing_learning_rate(nesterov):
  rng = np.random.default_rng(0)
  params = small_params(rng)
  grads = [small_params(rng) for _ in range(5)]
  # steps_per_epoch 1, milestones at epochs 1 and 3: lr 0.1, 0.01, 0.01, 0.001, 0.001.
  config = make_config(milestones=(1, 3), nesterov=nesterov)
  ours, _ = run_optax(opt.create_optimizer(config, 1, params), params, grads)
  theirs = run_torch_sgd(params, grads, [0.1, 0.01, 0.01, 0.001, 0.001], nesterov)
  chex.assert_trees_all_close(ours, theirs, atol=1e-6, rtol=0)


def test_unit_gradient_ratio_factors_give_plain_sgd():
  rng = np.random.default_rng(1)
  params = small_params(rng)
  grads = [small_params(rng) for _ in range(3)]
  config = make_config(milestones=(1,), geo_lr=1, geo_lr_min=1.0, geo_lr_max=1.0)
  ours, _ = run_optax(opt.create_optimizer(config, 1, params), params, grads)
  theirs = run_torch_sgd(params, grads, [0.1, 0.01, 0.01], nesterov=False)
  chex.assert_trees_all_close(ours, theirs, atol=1e-6, rtol=0)


def test_gradient_ratio_factor_multiplies_lr_times_momentum_buffer():
  rng = np.random.default_rng(2)
  params = small_params(rng)
  tx = opt.create_optimizer(make_config(geo_lr=1), 1, params)
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update(small_params(rng), state, params)
  buf = optax.tree_utils.tree_get(state, "trace")
  factors = state[0].factors
  assert not np.allclose(factors["trunk"]["conv1"]["kernel"], 1.0)
  expected = jax.tree.map(lambda b, f: -0.1 * b * f.reshape(f.shape + (1,) * (b.ndim - f.ndim)),
                          buf, factors)
  chex.assert_trees_all_close(updates, expected, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Gradient-ratio learning rates, computed by hand.


def hand_grads(t):
  """Gradients whose mean |g| per module is easy to see, changing with the step t."""
  s = [1.0, 3.0, 0.5, 2.0][t]
  return {
      "trunk": {"conv": {"kernel": np.array([1e-3, -1e-3, 1e-3]) * s},  # tiny: ratio clips at 20
                "bn": {"scale": np.array([0.2, -0.2]) * s, "bias": np.array([0.4, 0.0])}},
      "branches": {
          "layer3_0": {"conv1": {"kernel": np.array([[0.1, -0.3], [50.0, 70.0 * s]])}},
          "classifier": {"kernel": np.array([[[1.0, -1.0, 1.0]], [[2.0, 2.0, -2.0]]]),
                         "bias": np.array([[1.0], [2.0 * s]])}},
      "gate": {"dense": {"kernel": np.array([[0.5, -0.5], [0.5, 0.5]]),
                         "bias": np.array([2.0, -2.0])}},
  }


def hand_ratios(g):
  """The ratios of DESIGN.md section 4, module by module, written out in numpy."""
  a = lambda x: np.abs(np.asarray(x, np.float64))
  br = g["branches"]
  cls_b = (a(br["classifier"]["kernel"]).sum((1, 2)) + a(br["classifier"]["bias"]).sum(1)) / 4
  cls_all = (a(br["classifier"]["kernel"]).sum() + a(br["classifier"]["bias"]).sum()) / 8
  trunk_conv = a(g["trunk"]["conv"]["kernel"]).mean()
  trunk_bn = (a(g["trunk"]["bn"]["scale"]).sum() + a(g["trunk"]["bn"]["bias"]).sum()) / 4
  layer3 = a(br["layer3_0"]["conv1"]["kernel"]).mean(1)
  gate = (a(g["gate"]["dense"]["kernel"]).sum() + a(g["gate"]["dense"]["bias"]).sum()) / 6
  return {"trunk_conv": cls_all / trunk_conv, "trunk_bn": cls_all / trunk_bn,
          "layer3": cls_b / layer3, "classifier": np.ones(2), "gate": cls_all / gate}


def test_gradient_ratio_factors_by_hand():
  g0 = hand_grads(0)
  # Spot-check the hand formulas on step 0: classifier means [1, 2] per branch, 1.5 overall.
  r0 = hand_ratios(g0)
  np.testing.assert_allclose(r0["trunk_conv"], 1500.0)             # clipped to 20 below
  np.testing.assert_allclose(r0["trunk_bn"], 1.5 / 0.2)
  np.testing.assert_allclose(r0["layer3"], [1.0 / 0.2, 2.0 / 60.0])  # branch 1 clipped to 0.1
  np.testing.assert_allclose(r0["gate"], 1.5)  # element mean 1.0 (the mean of leaf means is 1.25)

  k, ema, lo, hi = 2, 0.9, 0.1, 20.0
  tx = opt.gradient_ratio_lr(k, clip=(lo, hi), ema=ema)
  state = tx.init(jax.tree.map(jnp.asarray, g0))
  factors = {"trunk_conv": 1.0, "trunk_bn": 1.0, "layer3": np.ones(2), "classifier": np.ones(2),
             "gate": 1.0}
  for t in range(4):
    g = hand_grads(t)
    if t % k == 0:  # steps 0 and 2 update; 1 and 3 leave the factors as they are
      factors = {m: ema * f + (1 - ema) * np.clip(hand_ratios(g)[m], lo, hi)
                 for m, f in factors.items()}
    updates, state = tx.update(jax.tree.map(jnp.asarray, g), state)
    f = state.factors
    np.testing.assert_allclose(f["trunk"]["conv"]["kernel"], factors["trunk_conv"], rtol=1e-6)
    np.testing.assert_allclose(f["trunk"]["bn"]["scale"], factors["trunk_bn"], rtol=1e-6)
    np.testing.assert_allclose(f["trunk"]["bn"]["bias"], factors["trunk_bn"], rtol=1e-6)
    np.testing.assert_allclose(f["branches"]["layer3_0"]["conv1"]["kernel"], factors["layer3"],
                               rtol=1e-6)
    np.testing.assert_allclose(f["branches"]["classifier"]["kernel"], factors["classifier"],
                               rtol=1e-6)
    np.testing.assert_allclose(f["gate"]["dense"]["bias"], factors["gate"], rtol=1e-6)
    # The factor multiplies the updates of its module, per branch slice under 'branches'.
    np.testing.assert_allclose(updates["trunk"]["conv"]["kernel"],
                               g["trunk"]["conv"]["kernel"] * factors["trunk_conv"], rtol=1e-6)
    layer3 = g["branches"]["layer3_0"]["conv1"]["kernel"]
    np.testing.assert_allclose(updates["branches"]["layer3_0"]["conv1"]["kernel"],
                               layer3 * factors["layer3"][:, None], rtol=1e-6)
    assert int(state.count) == t + 1
  np.testing.assert_allclose(factors["trunk_conv"], 0.81 + 0.19 * 20.0)  # two clipped updates


def test_a_branch_without_gradient_keeps_its_factors():
  g = jax.tree.map(jnp.asarray, hand_grads(0))
  g["branches"] = jax.tree.map(lambda x: x.at[1].set(0.0), g["branches"])
  tx = opt.gradient_ratio_lr(1)
  _, state = tx.update(g, tx.init(g))
  for leaf in jax.tree.leaves(state.factors["branches"]):
    assert np.all(np.isfinite(leaf)) and leaf[1] == 1.0
  assert state.factors["branches"]["layer3_0"]["conv1"]["kernel"][0] != 1.0


def test_factor_shapes_follow_the_model_trees():
  images = jnp.zeros((1, 8, 8, 3))
  one = jax.eval_shape(model_spec.ModelSpec("one_resnet", 8, 5, num_branches=3).build().init,
                       jax.random.key(0), images)["params"]
  base = jax.eval_shape(model_spec.ModelSpec("cifar_resnet", 8, 5).build().init,
                        jax.random.key(0), images)["params"]
  tx = opt.gradient_ratio_lr(1)
  for params, branch_shape in ((one, (3,)), (base, ())):
    factors = jax.eval_shape(tx.init, params).factors
    assert jax.tree.structure(factors) == jax.tree.structure(params)
    for path, f in jax.tree_util.tree_leaves_with_path(factors):
      under_branches = "branches" in jax.tree_util.keystr(path)
      assert f.shape == (branch_shape if under_branches else ()), jax.tree_util.keystr(path)
  # Every module of the real ResNet gets a factor on a real step, classifier ratio exactly 1.
  params = jax.tree.map(lambda s: jnp.full(s.shape, 0.5, s.dtype), base)
  _, state = tx.update(params, tx.init(params))
  np.testing.assert_allclose(state.factors["branch"]["classifier"]["kernel"], 1.0)


def test_optimizer_state_survives_a_checkpoint_round_trip():
  rng = np.random.default_rng(3)
  params = small_params(rng)
  grads = [small_params(rng) for _ in range(6)]
  tx = opt.create_optimizer(make_config(geo_lr=2, milestones=(2,)), 1, params)
  update = jax.jit(tx.update)
  state = tx.init(params)
  for g in grads[:3]:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
  blob = flax.serialization.msgpack_serialize(flax.serialization.to_state_dict(state))
  restored = flax.serialization.from_state_dict(tx.init(params),
                                                flax.serialization.msgpack_restore(blob))
  chex.assert_trees_all_equal(restored, state)
  chex.assert_trees_all_equal_structs(restored, state)
  p1, p2, s1, s2 = params, params, state, restored
  for g in grads[3:]:
    u1, s1 = update(g, s1, p1)
    u2, s2 = update(g, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  chex.assert_trees_all_equal(p1, p2)
  chex.assert_trees_all_equal(s1, s2)


# ---------------------------------------------------------------------------------------------
# Branch masks.


def test_mask_branch_updates_zeroes_exactly_the_inactive_slices():
  updates = small_params(np.random.default_rng(4), num_branches=3)
  masked = opt.mask_branch_updates(updates, (True, False, True))
  chex.assert_trees_all_equal(masked["trunk"], updates["trunk"])
  chex.assert_trees_all_equal(masked["gate"], updates["gate"])
  for new, old in zip(jax.tree.leaves(masked["branches"]), jax.tree.leaves(updates["branches"])):
    np.testing.assert_array_equal(new[1], 0.0)
    np.testing.assert_array_equal(new[0], old[0])
    np.testing.assert_array_equal(new[2], old[2])
  assert opt.mask_branch_updates(updates, None) is updates
  with pytest.raises(ValueError, match="active_branches has 2 entries"):
    opt.mask_branch_updates(updates, (True, False))


def test_select_branches_keeps_old_slices_in_optimizer_state():
  rng = np.random.default_rng(5)
  params = small_params(rng, num_branches=3)
  tx = opt.create_optimizer(make_config(geo_lr=1), 1, params)
  old = tx.init(params)
  _, new = tx.update(small_params(rng, num_branches=3), old, params)
  kept = opt.select_branches(new, old, (False, True, True))
  old_trace, new_trace = (optax.tree_utils.tree_get(s, "trace") for s in (old, new))
  kept_trace = optax.tree_utils.tree_get(kept, "trace")
  for k, o, n in zip(*(jax.tree.leaves(t["branches"]) for t in (kept_trace, old_trace, new_trace))):
    np.testing.assert_array_equal(k[0], o[0])
    np.testing.assert_array_equal(k[1:], n[1:])
  chex.assert_trees_all_equal(kept_trace["trunk"], new_trace["trunk"])
  assert int(kept[0].count) == 1

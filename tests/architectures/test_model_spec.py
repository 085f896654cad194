"""model_spec.ModelSpec: the one description of a model (config, checkpoint meta, module, shapes)."""
import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from one_jax.architectures import cifar_resnet, model_spec, models
from one_jax.storage import checkpoints
from one_jax.training import train_state

ONE = model_spec.ModelSpec("one_resnet", depth=8, num_classes=5, num_branches=3)
BASE = model_spec.ModelSpec("cifar_resnet", depth=8, num_classes=5)


@pytest.mark.parametrize("variant", ["three_branch", "baseline", "five_branch"])
def test_from_config_builds_the_configured_model(tiny_config, variant):
  config = tiny_config(variant, active_branches="0" if variant != "baseline" else "")
  spec = model_spec.ModelSpec.from_config(config)
  assert (spec.kind, spec.depth, spec.num_classes) == (config.model, 8, 10)
  if variant == "baseline":
    assert spec.num_branches == 1 and not spec.branched
    assert spec.build(axis_name="data") == models.Baseline(
        cifar_resnet.Trunk, cifar_resnet.Branch, (("depth", 8), ("depth_rule", "one")),
        (("depth", 8), ("depth_rule", "one"), ("num_classes", 10)), axis_name="data")
  else:
    assert spec.num_branches == config.num_branches and spec.branched
    assert spec.active_branches == (True,) + (False,) * (config.num_branches - 1)
    assert spec.build().active_branches == spec.active_branches
  # config_fields is the inverse of from_config (for the architecture).
  with config.unlocked():
    config.update(spec.config_fields())
  assert model_spec.ModelSpec.from_config(config) == dataclasses.replace(spec, active_branches=None)


def test_round_trip_through_checkpoint_meta(tmp_path):
  for spec in (ONE, BASE):
    path = str(tmp_path / spec.kind)
    variables = jax.tree.map(jnp.asarray, spec.init(jax.random.key(0), (8, 8, 3)))
    checkpoints.save_standalone(path, dict(variables, step=0),
                                train_state.model_meta(ml_collections.ConfigDict(), spec, 1))
    restored, restored_vars = checkpoints.load(path)
    assert restored == spec
    chex.assert_trees_all_equal(restored_vars, variables)
    model, _ = checkpoints.load_model(path, branch_impl="vmap")
    assert model == dataclasses.replace(spec, branch_impl="vmap").build()


@pytest.mark.parametrize("info,spec,written", [
    # What earlier versions wrote, which ModelSpec.to_dict writes exactly as it was.
    ({"kind": "one_resnet", "depth": 8, "num_classes": 5, "num_branches": 3, "block": "basic"},
     ONE, True),
    ({"kind": "cifar_resnet", "depth": 8, "num_classes": 5, "block": "basic"}, BASE, True),
    # Without the derived 'block', and a baseline that records its one branch.
    ({"kind": "one_resnet", "depth": 8, "num_classes": 5, "num_branches": 3}, ONE, False),
    ({"kind": "cifar_resnet", "depth": 8, "num_classes": 5, "num_branches": 1}, BASE, False),
])
def test_stored_model_infos_load(info, spec, written):
  assert model_spec.ModelSpec.from_dict(info) == spec
  assert (spec.to_dict() == info) == written


@pytest.mark.parametrize("make,needle", [
    (lambda: model_spec.ModelSpec("resnet50", 8, 10), "model='resnet50' is unknown: use 'one_resnet'"),
    (lambda: model_spec.ModelSpec.from_dict(
        {"kind": "squeezenet", "depth": 8, "num_classes": 10}), "model='squeezenet' is unknown"),
    (lambda: model_spec.ModelSpec.from_dict({"kind": "one_resnet", "depth": 8, "num_classes": 10}),
     "lacks num_branches"),
    (lambda: model_spec.ModelSpec.from_dict({"kind": "one_resnet", "depth": 8}), "lacks num_classes"),
    (lambda: model_spec.ModelSpec.from_dict(
        {"kind": "cifar_resnet", "depth": 8, "num_classes": 10, "block": "bottleneck"}),
     "claims bottleneck blocks at depth 8"),
    (lambda: model_spec.ModelSpec("one_resnet", 9, 10, 3), "depth=9"),
    (lambda: model_spec.ModelSpec("cifar_resnet", 8, 10, 3), "num_branches=3 is invalid"),
    (lambda: model_spec.ModelSpec("one_resnet", 8, 10, 2, active_branches=(False, False)),
     "active_branches"),
    (lambda: model_spec.ModelSpec("one_resnet", 8, 10, 2, conv_impl="fast"), "conv_impl='fast'"),
])
def test_bad_descriptions_are_one_line_errors(make, needle):
  with pytest.raises(ValueError) as e:
    make()
  assert needle in str(e.value) and "\n" not in str(e.value)


def test_unknown_kind_in_a_checkpoint_is_a_checkpoint_error():
  with pytest.raises(checkpoints.CheckpointError) as e:
    checkpoints.spec_of({"model": {"kind": "squeezenet", "depth": 8, "num_classes": 10}}, "ckpt")
  assert "ckpt has model metadata one_jax cannot build" in str(e.value)
  assert "model='squeezenet' is unknown" in str(e.value) and "\n" not in str(e.value)


def test_abstract_variables_are_the_shapes_of_init():
  got = ONE.abstract_variables((8, 8, 3))
  want = jax.eval_shape(ONE.build().init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
  assert ONE.abstract_variables((32, 32, 3)) == got  # shapes do not depend on the image size


def test_with_branches_moves_within_the_family():
  assert BASE.with_branches(4) == dataclasses.replace(ONE, num_branches=4)
  assert ONE.with_branches(None) == BASE
  assert ONE.describe() == "ONE ResNet (one_resnet), depth 8, basic blocks, 3 branches, 5 classes"


class _TinyNet(nn.Module):
  """A stand-in architecture: one Dense on the mean pixel."""
  num_classes: int

  @nn.compact
  def __call__(self, images, train: bool = False):
    return nn.Dense(self.num_classes, name="head")(jnp.mean(images, axis=(1, 2)))


def test_a_new_architecture_is_one_registry_entry(monkeypatch):
  monkeypatch.setitem(model_spec.ARCHITECTURES, "tiny_net", model_spec.Architecture(
      module=lambda spec, axis_name: _TinyNet(spec.num_classes), branched=False, family="tiny",
      title="Tiny net", check=lambda spec: None, details=lambda spec: {}))
  spec = model_spec.ModelSpec("tiny_net", depth=1, num_classes=4)
  assert spec.to_dict() == {"kind": "tiny_net", "depth": 1, "num_classes": 4}
  assert model_spec.ModelSpec.from_dict(spec.to_dict()) == spec
  assert spec.abstract_variables()["params"]["head"]["kernel"].shape == (3, 4)
  assert spec.describe() == "Tiny net (tiny_net), depth 1, 1 branch, 4 classes"


def test_depth_rules_name_the_two_resnet_110s():
  """'one' (the ONE code, 6n+2) and 'peers' (OKDDip, PCL: 9n+2 for bottlenecks) agree below
  depth 44; the peers' ResNet-110 is the ONE code's depth-74 network, and theirs is ours at 164."""
  def shapes(depth, rule):
    spec = model_spec.ModelSpec("cifar_resnet", depth, 10, depth_rule=rule)
    return jax.tree.map(lambda a: a.shape, spec.abstract_variables())
  peers_110 = model_spec.ModelSpec("cifar_resnet", 110, 10, depth_rule="peers")
  assert peers_110.num_params() == 1_147_738
  assert model_spec.ModelSpec("cifar_resnet", 110, 10).num_params() == 1_704_154
  assert shapes(110, "peers") == shapes(74, "one") and shapes(164, "peers") == shapes(110, "one")
  assert shapes(32, "peers") == shapes(32, "one")
  # Recorded (and described) only when not the rule older checkpoints imply.
  assert peers_110.to_dict()["depth_rule"] == "peers" and "depth rule peers" in peers_110.describe()
  assert "depth_rule" not in BASE.to_dict() and "depth rule" not in BASE.describe()
  assert model_spec.ModelSpec.from_dict(peers_110.to_dict()) == peers_110
  for depth, rule, needle in ((44, "peers", "use 9n.2"), (47, "one", "depth=47"),
                              (32, "resnet", "depth_rule='resnet' is unknown")):
    with pytest.raises(ValueError, match=needle):
      model_spec.ModelSpec("one_resnet", depth, 10, 3, depth_rule=rule)
  with pytest.raises(ValueError, match="depth_rule='peers' is not an option of one_wrn"):
    model_spec.ModelSpec("one_wrn", 16, 10, 3, depth_rule="peers")

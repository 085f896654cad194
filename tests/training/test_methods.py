"""The learning method of a run (one_jax.training.methods): training asks it, never the model
kind, for the loss, the heads, the derived metrics and the best checkpoint's metric."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import step1
from one_jax.architectures import model_spec, models
from one_jax.surgery import operations
from one_jax.training import losses, methods, temporal_mean

ONE = model_spec.ModelSpec("one_resnet", 8, 5, 3)
BASE = model_spec.ModelSpec("cifar_resnet", 8, 5)


def test_each_model_kind_has_its_method():
  config = step1.get_config("three_branch")
  one, base = methods.for_model(config, ONE), methods.for_model(config, BASE)
  assert isinstance(one, methods.One) and isinstance(base, methods.CrossEntropy)
  assert one.heads == ("branch_0", "branch_1", "branch_2", "ensemble", "mean_branch")
  assert base.heads == ("model",)
  assert (one.best_metric, base.best_metric) == ("test/top1/ensemble", "test/top1/model")
  assert one.votes and not base.votes
  assert base.update_mask is None and one.update_mask is None
  masked = model_spec.ModelSpec("one_resnet", 8, 5, 3, active_branches=(True, False, True))
  assert methods.for_model(config, masked).update_mask == (True, False, True)
  # The config's loss settings reach the method.
  config.temperature, config.rampup_epochs, config.kl_scale = 2.0, 10.0, 0.5
  one = methods.for_model(config, ONE)
  assert (one.temperature, one.rampup_epochs, one.kl_scale) == (2.0, 10.0, 0.5)
  assert one.epoch_metrics(5) == {"kl_weight": float(losses.kl_weight(5, 10.0) * 0.5)}
  assert base.epoch_metrics(5) == {"kl_weight": 0.0}


def test_every_method_option_of_the_config_belongs_to_its_method():
  """methods.config_fields knows each method's fields (a report compares runs by them): every
  config field named after a method is that method's, and ONE's are its loss options."""
  config = step1.get_config("three_branch")
  for name in set(methods.METHODS) - {"one"}:   # ONE's fields keep their historical names
    prefixed = {k for k in config if k.startswith(name + "_")}
    assert prefixed and prefixed <= methods.config_fields(name), name
    assert not prefixed & methods.config_fields(None)
  assert {"temperature", "kl_scale", "rampup_epochs", "ensemble_ce",
          "stop_gradient"} == methods.config_fields("one")
  assert "rampup_epochs" in methods.unread_fields("dml")   # DML's is dml_rampup_epochs
  assert methods.unread_fields(None) == frozenset().union(
      *(methods.config_fields(m) for m in methods.METHODS))


def test_the_one_method_computes_the_one_loss_and_names_its_heads():
  config = step1.get_config("three_branch")
  one = methods.for_model(config, ONE)
  model = ONE.build()
  images = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  labels = jnp.asarray([0, 1, 2, 3])
  output = model.apply(model.init(jax.random.key(1), images), images)
  loss, terms = one.loss(output, labels, 3.0)
  want, want_terms = losses.one_loss(output, labels, epoch=3.0, temperature=3.0,
                                     rampup_epochs=80.0)
  np.testing.assert_array_equal(loss, want)
  assert set(terms) == set(want_terms)
  heads = one.head_logits(output)
  assert list(heads) == ["branch_0", "branch_1", "branch_2", "ensemble"]
  np.testing.assert_array_equal(heads["ensemble"], output.ensemble_logits)
  derived = one.with_derived({"test/top1/branch_0": 0.5, "test/top1/branch_1": 0.7,
                              "test/top1/branch_2": 0.6, "test/top5/branch_0": 1.0}, "test")
  np.testing.assert_allclose(derived["test/top1/mean_branch"], 0.6)
  assert derived["test/top5/mean_branch"] == 1.0


def test_methods_configs_put_each_method_on_any_paper_row():
  """configs/methods.py: METHOD[:ROW] at the peers' recipe; only the method differs."""
  from configs import methods as method_configs, paper  # pylint: disable=g-import-not-at-top
  one, cl = method_configs.get_config("one"), method_configs.get_config("cl_ilr")
  assert (cl.method, cl.model, cl.depth, cl.dataset) == ("cl_ilr", "one_resnet", 32, "cifar100")
  assert (cl.weight_decay, cl.nesterov, cl.momentum, cl.milestones, cl.num_epochs,
          cl.batch_size, cl.num_branches) == (5e-4, True, 0.9, (150, 225), 300, 128, 3)
  differ = {k for k in cl.keys() if cl[k] != one[k]}
  assert differ == {"method", "variant"}
  # OKDDip's 3 peers come with their leader: 4 branches, the only other difference.
  okddip = method_configs.get_config("okddip")
  assert {k for k in okddip.keys() if okddip[k] != one[k]} == {"method", "variant",
                                                                "num_branches"}
  assert okddip.num_branches == 4 and model_spec.ModelSpec.from_config(okddip).method == "okddip"
  row = method_configs.get_config("cl_ilr:resnet110_peers_cifar100")
  assert (row.depth, row.depth_rule) == (110, "peers")
  smoke = method_configs.get_config("cl_ilr:vgg16_cifar10,smoke")
  assert smoke.model == paper.get_config("vgg16_cifar10,smoke").model and smoke.method == "cl_ilr"
  assert smoke.dataset == "synthetic"
  model = model_spec.ModelSpec.from_config(smoke)
  assert model.method == "cl_ilr" and not model.has_gate
  for bad in ("nope", "cl_ilr:resnet20_cifar10"):
    try:
      method_configs.get_config(bad)
    except ValueError as e:
      assert "\n" not in str(e)
    else:
      raise AssertionError(bad)


FAMILY_ROWS = {"vgg": "configs/methods.py:{}:vgg16_cifar10,smoke",
               "densenet": "configs/methods.py:{}:densenet40_12_cifar10,smoke",
               "wrn": "configs/methods.py:{}:wrn16_4_cifar10,smoke",
               "resnext": "configs/methods.py:{}:resnext29_8x64d_cifar10,smoke",
               "imagenet_resnet": "configs/imagenet.py:{},smoke"}


def _family_config(family, method):
  """The smoke config of `family`'s row with `method` (configs/methods.py, or ImageNet's)."""
  from configs import imagenet, methods as method_configs  # pylint: disable=g-import-not-at-top
  if family == "imagenet_resnet":
    c = imagenet.get_config("resnet18_one,smoke")
    c.method, c.num_branches = method, methods.branch_count(method, c.num_branches)
    return c
  return method_configs.get_config(FAMILY_ROWS[family].split(":", 1)[1].format(method))


# KDCL's model is DML's (its views and loss are tested in test_kdcl.py): four models cover
# every kind of method part. PCL's views need an in-memory pipeline: not on ImageNet's.
@pytest.mark.parametrize("family,method", [
    (family, method) for method in ("okddip", "dml", "ffl", "pcl") for family in FAMILY_ROWS
    if (family, method) != ("imagenet_resnet", "pcl")])
def test_each_method_trains_on_every_family_and_extracts_its_branches(family, method):
  """On every family: the method's model takes a finite gradient step (every head finite) and
  `surgery extract` gives a plain network whose outputs equal its branch's (OKDDip's leader:
  the last; DML's peer 0 with its own trunk; PCL's from its views, with its temporal mean)."""
  config = _family_config(family, method)
  spec = model_spec.ModelSpec.from_config(config)
  assert spec.method == method and spec.independent == (method == "dml")
  image_shape = (config.get("image_size", 32),) * 2 + (3,)
  variables = spec.init(jax.random.key(0), image_shape)
  images = jax.random.normal(jax.random.key(1), (4,) + image_shape)
  labels = jnp.arange(4) % spec.num_classes
  model, method_obj = spec.build(), methods.for_model(config, spec)

  views = images if method_obj.views == 1 else jnp.stack([images] * method_obj.views, axis=1)

  def loss(params):
    out, _ = model.apply(dict(variables, params=params), views, train=True,
                         mutable=["batch_stats"])
    if spec.temporal_mean:
      teacher, _ = temporal_mean.forward(model, variables["temporal_mean"], views, train=True)
      out = out.replace(temporal_logits=teacher.branch_logits)
    return method_obj.loss(out, labels, 1.0)[0]

  value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
  assert np.isfinite(float(value))
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  if method == "okddip":   # the projections learn (through the targets)
    assert np.any(np.asarray(grads["attention"]["query"]["kernel"]) != 0)
  out = model.apply(variables, images)
  if spec.temporal_mean:
    out = out.replace(temporal_logits=out.branch_logits)
  assert set(method_obj.head_logits(out)) == set(method_obj.heads) - {"mean_branch",
                                                                     "mean_temporal"}
  state = jax.tree.map(np.asarray, dict(variables))
  branch = spec.num_branches - 1 if method == "okddip" else 0
  student, info = operations.extract(state, spec.to_dict(), branch=branch)
  student_spec = model_spec.ModelSpec.from_dict(info)
  np.testing.assert_allclose(student_spec.build().apply(models.variables_in(student), images),
                             out.branch_logits[branch], rtol=2e-5, atol=2e-5)

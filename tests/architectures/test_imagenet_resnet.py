"""The ImageNet ResNet family: torchvision's parameter counts, the ONE counts derived from them,
the ONE forward pass, and conversion to and from torchvision's state-dict names (parity with a
torch model written from torchvision's definition, tests/torch_reference.py)."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from one_jax import convert
from one_jax.architectures import imagenet_resnet, model_spec, models
from one_jax.data import in_memory
from one_jax.interop import convert_torchvision, pytorch, torch_common
from one_jax.storage import checkpoints
from one_jax.surgery import __main__ as surgery_cli
from tests import torch_reference as tr

# torchvision.models.resnet{18,34,50}(num_classes=1000): parameters, and state_dict() entries.
TORCHVISION_PARAMS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032}
TORCHVISION_ENTRIES = {18: 122, 34: 218, 50: 320}
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _spec(depth, branches=None, classes=1000):
  if branches is None:
    return model_spec.ModelSpec("imagenet_resnet", depth, classes)
  return model_spec.ModelSpec("one_imagenet_resnet", depth, classes, branches)


def _params(spec):
  return spec.abstract_variables((224, 224, 3))["params"]


@functools.lru_cache(maxsize=None)
def _torch_model(depth, classes=1000, seed=0):
  torch.manual_seed(seed)
  model = tr.TorchvisionResNet(depth, classes)
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():   # BatchNorm that is not the identity, so eval mode tests the mapping
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5, generator=g)
        m.bias.uniform_(-0.2, 0.2, generator=g)
        m.running_mean.uniform_(-0.1, 0.1, generator=g)
        m.running_var.uniform_(0.5, 2.0, generator=g)
        m.num_batches_tracked.fill_(int(torch.randint(1, 10**6, (), generator=g)))
  return model.eval()


# ---------------------------------------------------------------------------------------------
# Parameter counts.


@pytest.mark.parametrize("depth", sorted(TORCHVISION_PARAMS))
def test_baseline_counts_equal_torchvision(depth):
  want = TORCHVISION_PARAMS[depth]
  assert models.count_params(_params(_spec(depth))) == want
  assert imagenet_resnet.torchvision_num_params(depth) == want
  torch_model = _torch_model(depth)
  assert sum(p.numel() for p in torch_model.parameters()) == want
  assert len(torch_model.state_dict()) == TORCHVISION_ENTRIES[depth]


@pytest.mark.parametrize("depth", sorted(TORCHVISION_PARAMS))
def test_one_counts_are_trunk_plus_branches_plus_gate(depth):
  """ONE = torchvision's model + (B - 1) copies of its stage 4 and fc + the gate
  (Dense(C3 -> B) and BatchNorm(B) on the C3 = 256 x expansion channels of stage 3)."""
  torch_model = _torch_model(depth)
  branch = sum(p.numel() for n, p in torch_model.named_parameters()
               if n.startswith(("layer4.", "fc.")))
  c3 = 256 * (4 if imagenet_resnet.block_type(depth) == "bottleneck" else 1)
  for b in (1, 3, 5):
    params = _params(_spec(depth, b))
    want = TORCHVISION_PARAMS[depth] + (b - 1) * branch + (c3 * b + b) + 2 * b
    assert models.count_params(params) == want, (depth, b)
    assert models.count_params(params["branches"]) == b * branch


def test_unknown_depth_is_one_line():
  with pytest.raises(ValueError, match=r"depth=20 is not an ImageNet ResNet depth: use one of "
                                       r"10, 18, 34, 50, 101, 152"):
    _spec(20)


# ---------------------------------------------------------------------------------------------
# Forward pass.


@pytest.fixture(scope="module")
def one10():
  """A ONE ResNet-10 with 3 branches and 5 classes, initialised once for the module."""
  spec = _spec(10, 3, classes=5)
  return spec, spec.init(jax.random.key(0), (32, 32, 3))


def test_one_forward_is_the_gate_weighted_ensemble(one10):
  spec, variables = one10
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  out = jax.jit(functools.partial(spec.build().apply, train=False),
                compiler_options=FAST_COMPILE)(variables, images)
  chex.assert_shape(out.branch_logits, (3, 2, 5))
  chex.assert_shape(out.gate, (2, 3))
  np.testing.assert_allclose(np.asarray(out.gate).sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(out.ensemble_logits,
                             jnp.einsum("nb,bnc->nc", out.gate, out.branch_logits), rtol=1e-5,
                             atol=1e-6)
  # Branches differ (separately initialised), each is a baseline on its slice.
  assert not np.allclose(out.branch_logits[0], out.branch_logits[1])
  base_spec, base_vars = convert_torchvision.branch_variables(spec, variables, 2)
  logits = base_spec.build().apply(base_vars, images, train=False)
  np.testing.assert_allclose(logits, out.branch_logits[2], rtol=1e-4, atol=1e-4)


def test_voting_over_imagenet_batches(one10):
  """Every subset of the branches scored on ImageNet-shaped batches (one_jax.data.imagenet's eval
  transform); all three branches under the gate are the ensemble."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from one_jax.training import voting  # pylint: disable=g-import-not-at-top
  from one_jax.data import sources  # pylint: disable=g-import-not-at-top
  spec, variables = one10
  config = ml_collections.ConfigDict(dict(
      dataset="synthetic_imagenet", num_classes=5, image_size=32, data_workers=0, seed=0,
      npz_path="", synthetic_train_size=8, synthetic_test_size=13))
  _, test, _ = sources.get_datasets(config)
  batches = list(in_memory.eval_batches(test, global_batch=8))
  rows = voting.vote_accuracies(spec.build(), variables, batches)
  assert len(rows) == 7 and all(r["examples"] == 13 for r in rows)
  correct = 0
  for batch in batches:
    out = spec.build().apply(variables, batch["image"], train=False)
    hits = np.argmax(out.ensemble_logits, -1) == batch["label"]
    correct += int(np.sum(hits * (batch["mask"] > 0)))
  everything = next(r for r in rows if r["branches"] == (0, 1, 2))
  assert everything["gate"] == pytest.approx(correct / 13)


# ---------------------------------------------------------------------------------------------
# Conversion.


def test_import_matches_torchvision_outputs_and_export_reproduces_the_state_dict():
  torch_model = _torch_model(18, classes=10)
  state_dict = torch_model.state_dict()
  result = pytorch.import_state_dict(state_dict, "resnet18")
  assert result.spec == _spec(18, classes=10)
  images = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    want = torch_model(images).numpy()
  got = jax.jit(functools.partial(result.model.apply, train=False),
                compiler_options=FAST_COMPILE)(result.variables,
                                               jnp.asarray(images.numpy().transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=1e-4)
  back = pytorch.export_torch_state_dict(result.spec, result.variables, module_prefix=False,
                                         num_batches_tracked=result.num_batches_tracked)
  assert list(back) == list(state_dict)
  assert all(torch.equal(back[k], v) for k, v in state_dict.items())


def test_resnet50_names_shapes_and_round_trip():
  state_dict = _torch_model(50).state_dict()
  result = pytorch.import_state_dict({f"module.{k}": v for k, v in state_dict.items()}, "r50")
  assert result.spec == _spec(50) and result.module_prefix
  back = pytorch.export_torch_state_dict(result.spec, result.variables, module_prefix=False,
                                         num_batches_tracked=result.num_batches_tracked)
  assert list(back) == list(state_dict)
  assert all(torch.equal(back[k], v) for k, v in state_dict.items())


def test_one_model_exports_a_branch_as_torchvision(one10):
  spec, variables = one10
  with pytest.raises(ValueError, match=r"pass --branch=B with B in 0..2"):
    pytorch.export_torch_state_dict(spec, variables)
  exported = pytorch.export_torch_state_dict(spec, variables, branch=1, module_prefix=False)
  assert "layer4.0.downsample.0.weight" in exported and "fc.weight" in exported
  assert not any("gate" in k or "control" in k for k in exported)
  result = pytorch.import_state_dict(exported, "branch 1")
  assert result.spec == _spec(10, classes=5)
  chex.assert_trees_all_equal(result.variables["params"]["trunk"],
                              jax.tree.map(np.asarray, variables["params"]["trunk"]))
  chex.assert_trees_all_equal(
      result.variables["params"]["branch"],
      jax.tree.map(lambda x: np.asarray(x)[1], variables["params"]["branches"]))


def test_cli_round_trip_and_one_line_errors(tmp_path, capsys):
  state_dict = _torch_model(10, classes=4).state_dict()
  path = tmp_path / "resnet10.pth"
  torch.save(state_dict, path)
  out_dir = tmp_path / "ckpt"
  assert convert.main([str(path), str(out_dir)]) == 0
  spec, _ = checkpoints.load(str(out_dir))
  assert spec == _spec(10, classes=4)
  back = tmp_path / "back.pth"
  assert convert.main(["--to_torch", str(out_dir), str(back)]) == 0
  loaded = torch.load(back, map_location="cpu", weights_only=True)["state_dict"]
  assert list(loaded) == list(state_dict)   # torchvision's names: no 'module.' prefix
  assert all(torch.equal(loaded[k], v) for k, v in state_dict.items())
  # Two converted baselines merge into a 2-branch ONE model (the trunk of the first), whose
  # branch 1 exports as that trunk with the second source's stage 4 and fc.
  other = _torch_model(10, classes=4, seed=1).state_dict()
  torch.save(other, tmp_path / "other.pth")
  assert convert.main([str(tmp_path / "other.pth"), str(tmp_path / "ckpt_other")]) == 0
  merged = tmp_path / "merged"
  assert surgery_cli.main(["merge", "--src", str(out_dir), "--src", str(tmp_path / "ckpt_other"),
                       "--dst", str(merged)]) == 0
  assert checkpoints.load(str(merged))[0] == _spec(10, 2, classes=4)
  assert convert.main(["--to_torch", "--branch", "1", str(merged), str(tmp_path / "b1.pth")]) == 0
  branch1 = torch.load(tmp_path / "b1.pth", map_location="cpu", weights_only=True)["state_dict"]
  assert list(branch1) == list(other)
  for key, value in branch1.items():
    if torch_common.NBT not in key:
      source = other if key.startswith(("layer4.", "fc.")) else state_dict
      assert torch.equal(value, source[key]), key
  capsys.readouterr()

  broken = {k: v for k, v in state_dict.items() if not k.startswith("layer2.0.downsample.1.")}
  torch.save(broken, tmp_path / "broken.pth")
  assert convert.main([str(tmp_path / "broken.pth"), str(tmp_path / "out2")]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "missing keys [layer2.0.downsample.1.bias" in err[0]
  odd = {k: v for k, v in state_dict.items() if not k.startswith("layer3.")}
  torch.save(odd, tmp_path / "odd.pth")
  assert convert.main([str(tmp_path / "odd.pth"), str(tmp_path / "out3")]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "basic blocks [1, 1, 0, 1] per stage is not one of" in err[0]
  assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()

"""Parity with the PyTorch reference (tests/torch_reference.py) through one_jax.convert.

Torch models get random weights and non-trivial BatchNorm statistics, are converted, and
must give the same eval outputs, ONE loss, gradients, BatchNorm updates and SGD step; the
export direction must reproduce the state dict exactly. One compile per config and mode.
"""
import argparse
import copy
import functools
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

from one_jax import convert
from one_jax.architectures import model_spec, models
from one_jax.interop import pytorch, torch_common
from one_jax.storage import checkpoints
from one_jax.training import losses
from tests import torch_reference as tr

ONE_CONFIGS = [(8, 1), (8, 3), (8, 5), (20, 3), (56, 3)]  # (depth, branches); 56: Bottleneck
BASELINE_DEPTH = 14
NUM_CLASSES = 10
BATCH = 4
EPOCH = 40  # KL weight exp(-5 / 4) ~ 0.29: every loss term matters
ATOL = 1e-4
GRAD_RTOL = 1e-3
GRAD_ATOL = 1e-6  # float noise of gradients that are exactly 0 (a Linear bias before BatchNorm)
# Cheap XLA codegen: the tests are compile-bound (same numerics, ~2x faster compiles).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _randomize_bn(model, g):
  """Random BN affine params, and running stats near the real ones but not equal to them.

  Running statistics come from one train-mode pass (momentum 1) and are then perturbed, so
  that eval mode depends on them while activations keep a sane scale at depth 56.
  """
  bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
  with torch.no_grad():
    for bn in bns:
      bn.weight.uniform_(0.5, 1.5, generator=g)
      # The gate's BN feeds a ReLU: positive offsets keep the gate from collapsing to uniform.
      low, high = (0.2, 1.0) if isinstance(bn, torch.nn.BatchNorm1d) else (-0.5, 0.5)
      bn.bias.uniform_(low, high, generator=g)
      bn.momentum = 1.0
    model.train()
    model(torch.randn(8, 3, 32, 32, generator=g))
    for bn in bns:
      bn.momentum = 0.1
      noise = torch.randn(bn.running_mean.shape, generator=g)
      bn.running_mean.add_(0.3 * bn.running_var.sqrt() * noise)
      bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.5, 2.0, generator=g))
      bn.num_batches_tracked.fill_(int(torch.randint(1, 10**6, (), generator=g)))
    model.eval()
    if isinstance(model, tr.ONE_ResNet):
      _calibrate_gate(model, g)
  return model


def _calibrate_gate(model, g):
  """Gate BN stats from eval-mode trunk features, so that the gate is far from uniform.

  The pooled features vary little between images: the gate's Linear is scaled up so its BN
  does not divide by a tiny variance (which would amplify float noise).
  """
  model.control_v1.weight.mul_(10.0)
  x = model.trunk(torch.randn(8, 3, 32, 32, generator=g))
  pre = model.control_v1(model.avgpool_c(x).flatten(1))
  bn = model.bn_v1
  bn.running_mean.copy_(pre.mean(0) + 0.3 * pre.std(0) * torch.randn(pre.shape[1], generator=g))
  bn.running_var.copy_(pre.var(0) * torch.empty(pre.shape[1]).uniform_(0.5, 2.0, generator=g))


@functools.lru_cache(maxsize=None)
def _torch_model(depth, branches):
  """(torch model in eval mode, images NCHW, labels); branches None: the baseline ResNet."""
  torch.manual_seed(depth * 10 + (branches or 0))
  g = torch.Generator().manual_seed(depth * 10 + (branches or 0))
  model = (tr.ResNet(depth, NUM_CLASSES) if branches is None
           else tr.ONE_ResNet(depth, NUM_CLASSES, branches))
  _randomize_bn(model, g)
  images = torch.randn(BATCH, 3, 32, 32, generator=g)
  labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)
  return model, images, labels


def _prefixed(model):
  return {"module." + k: v.clone() for k, v in model.state_dict().items()}


def _nhwc(images):
  return jnp.asarray(images.numpy().transpose(0, 2, 3, 1))


@functools.lru_cache(maxsize=None)
def _eval_fn(model):
  return jax.jit(lambda v, x: model.apply(v, x, train=False), compiler_options=FAST_COMPILE)


@functools.lru_cache(maxsize=None)
def _train_fn(model):
  """(variables, images, labels) -> ((loss, new batch_stats, output), grads of params)."""

  def loss_fn(params, variables, images, labels):
    out, updates = model.apply({**variables, "params": params}, images, train=True,
                               mutable=["batch_stats"])
    if isinstance(model, models.OneModel):
      loss, _ = losses.one_loss(out, labels, epoch=EPOCH)
    else:
      loss, _ = losses.baseline_loss(out, labels)
    return loss, (updates["batch_stats"], out)

  def step(variables, images, labels):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        variables["params"], variables, images, labels)
    return (loss,) + aux, grads

  return jax.jit(step, compiler_options=FAST_COMPILE)


def _imported(depth, branches):
  model, _, _ = _torch_model(depth, branches)
  return pytorch.import_state_dict(_prefixed(model))


ALL_CONFIGS = ONE_CONFIGS + [(BASELINE_DEPTH, None)]


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("depth,branches", ALL_CONFIGS)
def test_eval_outputs_match_reference(depth, branches):
  torch_model, images, _ = _torch_model(depth, branches)
  result = _imported(depth, branches)
  with torch.no_grad():
    want = torch_model(images)
  got = _eval_fn(result.model)(result.variables, _nhwc(images))
  if branches is None:
    assert isinstance(result.model, models.Baseline)
    chex.assert_trees_all_close(np.asarray(got), want.numpy(), atol=ATOL, rtol=0)
    return
  assert (result.spec.depth, result.spec.num_branches) == (depth, branches)
  chex.assert_trees_all_close(
      (np.asarray(got.branch_logits), np.asarray(got.gate), np.asarray(got.ensemble_logits)),
      tuple(t.numpy() for t in want), atol=ATOL, rtol=0)
  assert np.ptp(want[1].numpy()) > 0.05 or branches == 1  # the gate is not uniform


def _torch_train_forward(model, images, labels):
  """Reference loss of one train-mode forward, backpropagated (model is modified)."""
  model.train()
  model.zero_grad()
  if isinstance(model, tr.ONE_ResNet):
    logits, _, ensemble = model(images)
    loss, _ = tr.one_loss(logits, ensemble, labels, EPOCH)
  else:
    loss = F.cross_entropy(model(images), labels)
  loss.backward()
  return loss.item()


def _export_flat(spec, variables):
  return pytorch.export_torch_state_dict(spec, variables, module_prefix=False,
                                         num_batches_tracked=None)


def _float64(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


@pytest.mark.parametrize("depth,branches", ALL_CONFIGS)
def test_train_loss_gradients_and_batch_stats_match_reference(depth, branches):
  """One train-mode step in float64 on both sides.

  In float32 a deep net's gradients are not a stable quantity: float noise of ~1e-6 flips
  the odd ReLU whose input is within 1e-6 of 0 (seen at depths 20 and 56), changing single
  gradient entries by O(1) in torch float32 vs torch float64 alike. Float64 removes the
  flips, so the comparison tests the implementations, not the rounding.
  """
  torch_model, images, labels = _torch_model(depth, branches)
  torch_model = copy.deepcopy(torch_model).double()
  result = _imported(depth, branches)
  torch_loss = _torch_train_forward(torch_model, images.double(), labels)
  with jax.enable_x64(True):
    (loss, new_stats, _), grads = _train_fn(result.model)(
        _float64(result.variables), jnp.asarray(images.double().numpy().transpose(0, 2, 3, 1)),
        jnp.asarray(labels.numpy()))
    exported = _export_flat(result.spec, {"params": grads, "batch_stats": new_stats})
  assert abs(float(loss) - torch_loss) <= ATOL, (float(loss), torch_loss)
  for name, p in torch_model.named_parameters():
    want = p.grad.numpy()
    diff = _max_diff(exported[name].numpy(), want)
    assert diff <= GRAD_RTOL * np.abs(want).max() + GRAD_ATOL, (name, diff, np.abs(want).max())
  for name, buf in torch_model.named_buffers():
    if name.endswith(("running_mean", "running_var")):
      chex.assert_trees_all_close(exported[name].numpy(), buf.numpy(), atol=ATOL, rtol=ATOL)


def test_sgd_step_matches_reference():
  """torch SGD (coupled decay, momentum) == add_decayed_weights -> sgd(momentum) on the grads.

  In float32, as trained (depth 8 has no ReLU flips at this seed; see above).
  """
  torch_model, images, labels = _torch_model(8, 3)
  torch_model = copy.deepcopy(torch_model)
  result = _imported(8, 3)
  lr, wd = 0.1, 5e-4
  torch_loss = tr.train_step(torch_model, tr.sgd(torch_model, lr=lr, weight_decay=wd), images,
                             labels, EPOCH)
  (loss, _, _), grads = _train_fn(result.model)(result.variables, _nhwc(images),
                                                jnp.asarray(labels.numpy()))
  assert abs(float(loss) - float(torch_loss)) <= ATOL  # float32, as trained
  tx = optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=0.9))
  params = result.variables["params"]
  updates, _ = tx.update(grads, tx.init(params), params)
  new_vars = {**result.variables, "params": optax.apply_updates(params, updates)}
  exported = _export_flat(result.spec, new_vars)
  for name, p in torch_model.named_parameters():
    chex.assert_trees_all_close(exported[name].numpy(), p.detach().numpy(), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("depth,branches", ALL_CONFIGS)
def test_export_reproduces_state_dict_exactly(depth, branches):
  torch_model, _, _ = _torch_model(depth, branches)
  original = _prefixed(torch_model)
  result = pytorch.import_state_dict(original)
  back = pytorch.export_torch_state_dict(result.spec, result.variables,
                                         num_batches_tracked=result.num_batches_tracked)
  assert list(back) == list(original)
  for key, value in original.items():
    assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_spelling_prefix_and_missing_num_batches_tracked_round_trip():
  """A later fork's 'classifier3_b', no 'module.' prefix, no num_batches_tracked (old torch)."""
  torch_model, _, _ = _torch_model(8, 3)
  original = {k.replace("classfier3_", "classifier3_"): v.clone()
              for k, v in torch_model.state_dict().items() if not k.endswith("num_batches_tracked")}
  result = pytorch.import_state_dict(original)
  assert (result.spelling, result.module_prefix, result.num_batches_tracked) == (
      "classifier", False, None)
  reference = pytorch.import_state_dict(_prefixed(torch_model))
  chex.assert_trees_all_equal(result.variables, reference.variables)
  back = pytorch.export_torch_state_dict(result.spec, result.variables, module_prefix=False,
                                         spelling="classifier", num_batches_tracked=None)
  assert list(back) == list(original)
  assert all(torch.equal(back[k], v) for k, v in original.items())
  # The reference model loads an export with the default options (prefix stripped).
  default = pytorch.export_torch_state_dict(result.spec, result.variables, num_batches_tracked=7)
  fresh = tr.ONE_ResNet(8, NUM_CLASSES, 3)
  fresh.load_state_dict({k[len("module."):]: v for k, v in default.items()})
  assert int(fresh.bn1.num_batches_tracked) == 7


def test_torch_reference_names_and_order():
  """Keys and order as the reference registers its modules (B=3 is the published model)."""
  keys = list(tr.ONE_ResNet(8, NUM_CLASSES, 3).state_dict())
  assert keys[:2] == ["conv1.weight", "bn1.weight"]
  tail = [k for k in keys if not k.startswith(("conv1", "bn1.", "layer"))]
  assert tail == ["control_v1.weight", "control_v1.bias", "bn_v1.weight", "bn_v1.bias",
                  "bn_v1.running_mean", "bn_v1.running_var", "bn_v1.num_batches_tracked"] + [
                      f"classfier3_{b}.{w}" for b in (1, 2, 3) for w in ("weight", "bias")]
  assert "layer3_3.0.downsample.1.running_var" in keys
  assert "layer1.0.conv3.weight" in tr.ONE_ResNet(56, NUM_CLASSES, 2).state_dict()


# ----------------------------------------------------------------------------- files and CLI


def _write_pth(tmp_path, depth=8, branches=3, name="in.pth.tar", **extra):
  torch_model, _, _ = _torch_model(depth, branches)
  state = {"epoch": 7, "state_dict": _prefixed(torch_model), "best_acc": torch.tensor(91.5),
           "args": argparse.Namespace(depth=depth), **extra}  # Namespace: on the safe list
  path = tmp_path / name
  torch.save(state, path)
  return path, state


def test_cli_writes_a_checkpoint_load_model_reads_and_back(tmp_path, capsys):
  path, state = _write_pth(tmp_path)
  out_dir = tmp_path / "ckpt"
  assert convert.main([str(path), str(out_dir)]) == 0
  spec, variables = checkpoints.load(str(out_dir))
  model = spec.build()
  assert (spec.depth, spec.num_branches, spec.num_classes) == (8, 3, NUM_CLASSES)
  _, meta = checkpoints.restore_raw(str(out_dir))
  assert meta["epoch"] == 7 and meta["source"] == "torch"
  assert meta["torch"]["extras"]["best_acc"] == pytest.approx(91.5)
  torch_model, images, _ = _torch_model(8, 3)
  with torch.no_grad():
    want = torch_model(images)
  got = _eval_fn(model)(variables, _nhwc(images))
  chex.assert_trees_all_close(np.asarray(got.ensemble_logits), want[2].numpy(), atol=ATOL, rtol=0)

  back = tmp_path / "back.pth.tar"
  assert convert.main(["--to_torch", str(out_dir), str(back)]) == 0
  loaded = torch.load(back, map_location="cpu", weights_only=True)
  assert loaded["epoch"] == 7
  assert list(loaded["state_dict"]) == list(state["state_dict"])
  assert all(torch.equal(loaded["state_dict"][k], v) for k, v in state["state_dict"].items())
  # load_torch_checkpoint reads the exported file back (the safe loader suffices).
  model2, variables2 = pytorch.load_torch_checkpoint(str(back), allow_pickle=False)
  assert model2 == model
  chex.assert_trees_all_equal(variables2, variables)
  capsys.readouterr()


def test_load_torch_checkpoint_reads_bare_state_dict_and_baseline(tmp_path):
  torch_model, images, _ = _torch_model(BASELINE_DEPTH, None)
  path = tmp_path / "bare.pth"
  torch.save(torch_model.state_dict(), path)
  model, variables = pytorch.load_torch_checkpoint(str(path))
  assert model == model_spec.ModelSpec("cifar_resnet", BASELINE_DEPTH, NUM_CLASSES).build()
  assert set(variables) == {"params", "batch_stats"}
  with torch.no_grad():
    want = torch_model(images).numpy()
  chex.assert_trees_all_close(np.asarray(_eval_fn(model)(variables, _nhwc(images))), want,
                              atol=ATOL, rtol=0)


def _one_line_error(capsys, argv):
  assert convert.main(argv) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  return err


def test_missing_and_unknown_keys_are_listed(tmp_path, capsys):
  torch_model, _, _ = _torch_model(8, 3)
  sd = _prefixed(torch_model)
  del sd["module.layer3_2.0.bn1.running_var"]
  sd["module.layer3_2.0.extra.weight"] = torch.zeros(3)
  path = tmp_path / "broken.pth.tar"
  torch.save({"state_dict": sd}, path)
  with pytest.raises(ValueError, match=r"missing keys \[layer3_2\.0\.bn1\.running_var\]; unknown "
                     r"keys \[layer3_2\.0\.extra\.weight\]"):
    pytorch.load_torch_checkpoint(str(path))
  err = _one_line_error(capsys, [str(path), str(tmp_path / "out")])
  assert str(path) in err and "layer3_2.0.extra.weight" in err
  assert not os.path.exists(tmp_path / "out")


def test_shape_mismatch_and_block_type_mismatch(tmp_path):
  torch_model, _, _ = _torch_model(8, 3)
  sd = _prefixed(torch_model)
  sd["module.control_v1.weight"] = torch.zeros(4, 32)
  with pytest.raises(ValueError, match=r"shapes.*control_v1\.weight \(4, 32\)"):
    pytorch.import_state_dict(sd)
  sd = _prefixed(torch_model)
  sd["module.layer1.0.conv3.weight"] = torch.zeros(64, 16, 1, 1)
  with pytest.raises(ValueError, match="Bottleneck blocks, but the reference uses BasicBlock"):
    pytorch.import_state_dict(sd)


class NotOnTheSafeList:
  """A harmless object of a type that only a full unpickle reads."""

  def __init__(self, value=1):
    self.value = value


@pytest.mark.parametrize("kind", ["missing", "directory", "garbage", "no_state_dict", "pickle"])
def test_bad_input_files(tmp_path, capsys, kind):
  path = tmp_path / "in.pth.tar"
  if kind == "directory":
    path.mkdir()
  elif kind == "garbage":
    path.write_text("not a checkpoint\n")
  elif kind == "no_state_dict":
    torch.save({"epoch": 3, "optimizer": {"lr": torch.tensor(0.1)}}, path)
  elif kind == "pickle":
    path, _ = _write_pth(tmp_path, extra_object=NotOnTheSafeList())
  out = tmp_path / "out"
  err = _one_line_error(capsys, [str(path), str(out)])
  assert str(path) in err
  if kind == "pickle":
    assert "NotOnTheSafeList" in err and "--allow_pickle" in err
  assert not os.path.exists(out)
  assert sorted(os.listdir(tmp_path)) == sorted(["in.pth.tar"] if kind != "missing" else [])


def test_existing_outputs_are_refused(tmp_path, capsys):
  path, _ = _write_pth(tmp_path)
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  err = _one_line_error(capsys, [str(path), str(out)])
  assert "already exists" in err and os.listdir(out) == ["keep.txt"]
  ckpt = tmp_path / "ckpt"
  assert convert.main([str(path), str(ckpt)]) == 0
  err = _one_line_error(capsys, ["--to_torch", str(ckpt), str(path)])
  assert "already exists" in err
  assert torch.load(path, map_location="cpu", weights_only=False)["epoch"] == 7


def test_gate_offset_cannot_be_exported_silently():
  result = _imported(8, 3)
  variables = {**result.variables,
               "gate_offset": jax.tree.map(lambda x: x + 1.0, result.variables["gate_offset"])}
  with pytest.raises(ValueError, match="offset"):
    pytorch.export_torch_state_dict(result.spec, variables)
  pytorch.export_torch_state_dict(result.spec, variables, ignore_gate_offset=True)


def test_command_line_entry_point(tmp_path, repo_root):
  """`python -m one_jax.convert` exits non-zero with a one-line message."""
  missing = tmp_path / "nope.pth.tar"
  proc = subprocess.run([sys.executable, "-m", "one_jax.convert", str(missing),
                         str(tmp_path / "out")], capture_output=True, text=True, check=False,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"},
                        cwd=repo_root)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [f"error: {missing} does not exist: pass a PyTorch "
                                              ".pth.tar or state-dict file"]
  assert not os.path.exists(tmp_path / "out")


# ----------------------------------------------------------------------------- safe loading


class _RunsACommand:
  """What a hostile .pth.tar carries: unpickling it calls os.system."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


def test_malicious_pickle_runs_nothing_and_converts_nothing(tmp_path):
  marker = tmp_path / "marker"
  torch_model, _, _ = _torch_model(8, 3)
  path = tmp_path / "evil.pth.tar"
  torch.save({"epoch": 1, "state_dict": _prefixed(torch_model),
              "payload": _RunsACommand(f"touch {marker}")}, path)
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, "-m", "one_jax.convert", str(path), str(out)],
                        capture_output=True, text=True, check=False,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"},
                        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  assert "posix.system" in lines[0] and "--allow_pickle" in lines[0]
  assert not marker.exists() and not out.exists()
  with pytest.raises(torch_common.ConversionError, match="posix.system"):  # the library too
    pytorch.load_torch_checkpoint(str(path))
  assert not marker.exists()


@pytest.mark.parametrize("extra", ["authors", "namespace_and_numpy"])
def test_authors_layouts_convert_without_opt_in(tmp_path, capsys, extra):
  torch_model, _, _ = _torch_model(8, 3)
  sd = _prefixed(torch_model)
  optimizer = torch.optim.SGD(torch_model.parameters(), lr=0.1, momentum=0.9)
  state = {"epoch": 5, "state_dict": sd, "acc": 90.5, "best_acc": torch.tensor(91.0),
           "optimizer": optimizer.state_dict()}
  if extra == "namespace_and_numpy":
    state.update(args=argparse.Namespace(depth=8, lr=0.1), acc=np.float64(90.5),
                 top5=np.float32(99.0), history=np.array([1.0, 2.0]))
  path = tmp_path / "in.pth.tar"
  torch.save(state, path)
  assert convert.main([str(path), str(tmp_path / "out")]) == 0
  assert capsys.readouterr().err == ""
  _, meta = checkpoints.restore_raw(str(tmp_path / "out"))
  assert meta["epoch"] == 5 and meta["torch"]["extras"]["acc"] == pytest.approx(90.5)


def test_allow_pickle_reads_other_types_with_a_warning(tmp_path, capsys):
  path, _ = _write_pth(tmp_path, extra_object=NotOnTheSafeList())
  with pytest.raises(torch_common.ConversionError, match="NotOnTheSafeList"):
    pytorch.load_torch_checkpoint(str(path))
  assert convert.main(["--allow_pickle", str(path), str(tmp_path / "out")]) == 0
  err = capsys.readouterr().err
  assert err.startswith("warning: --allow_pickle") and "runs any code" in err
  model, _ = pytorch.load_torch_checkpoint(str(path), allow_pickle=True)
  assert model.num_branches == 3


def test_peers_depth_rule_exports_and_imports_by_its_blocks():
  """Names depend only on the blocks a stage: 5 bottlenecks a stage come back as the peers'
  depth 47 (no 6n+2 depth builds them), 12 as the reference's depth 74."""
  for depth, back_as in ((47, ("peers", 47)), (110, ("one", 74))):
    spec = model_spec.ModelSpec("cifar_resnet", depth, NUM_CLASSES, depth_rule="peers")
    variables = spec.init(jax.random.key(0), (8, 8, 3))
    result = pytorch.import_state_dict(pytorch.export_torch_state_dict(spec, variables))
    assert (result.spec.depth_rule, result.spec.depth) == back_as
    chex.assert_trees_all_equal(result.variables, variables)


def test_a_gateless_cl_model_converts_both_ways():
  """The OKDDip code's CL ResNet (branches, no control_v1/bn_v1) imports as a CL-ILR model and
  its export reproduces the state dict."""
  torch_model = tr.CL_ResNet(8, NUM_CLASSES, 3)
  original = {k: v.clone() for k, v in torch_model.state_dict().items()}
  result = pytorch.import_state_dict(original)
  assert (result.spec.method, result.spec.num_branches, result.spec.has_gate) == ("cl_ilr", 3, False)
  assert "gate" not in result.variables["params"]
  back = pytorch.export_torch_state_dict(result.spec, result.variables, module_prefix=False,
                                         num_batches_tracked=result.num_batches_tracked)
  assert list(back) == list(original)
  assert all(torch.equal(back[k], v) for k, v in original.items())
  images = torch.randn(2, 3, 32, 32)
  torch_model.eval()
  with torch.no_grad():
    want = torch_model(images).numpy()             # [N, C, B]
  got = result.spec.build().apply(result.variables, _nhwc(images)).branch_logits
  np.testing.assert_allclose(np.moveaxis(np.asarray(got), 0, -1), want, atol=ATOL)

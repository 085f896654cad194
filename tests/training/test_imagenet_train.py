"""ImageNet end to end: the ResNet-18 ONE smoke config trains on mock TFDS imagenet2012, resumes
and exports a branch to torchvision's names; 2 processes train it through launch/local.sh; every
configs/imagenet.py variant (and its smoke form) describes a valid model."""
import csv
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from configs import imagenet
from one_jax import convert
from one_jax.architectures import model_spec, models
from one_jax.storage import checkpoints
from one_jax.training import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(**changes):
  config = imagenet.get_config("resnet18_one,smoke")
  config.progress_bar = False
  config.update(changes)
  return config


def _rows(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_variants_follow_the_paper_and_the_batch_rule():
  for variant in imagenet.VARIANTS:
    for arg in (variant, f"{variant},smoke"):
      config = imagenet.get_config(arg)
      train.check_config(config)
      spec = model_spec.ModelSpec.from_config(config)
      depth = int(variant[6:8]) if arg == variant or variant.startswith("resnet18") else 10
      assert spec.depth == depth and spec.branched == variant.endswith("_one")
  config = imagenet.get_config("resnet18_one")
  assert (config.num_epochs, config.milestones, config.weight_decay) == (90, (30, 60), 1e-4)
  assert (config.batch_size, config.lr, config.num_classes, config.image_size) == (
      256, 0.1, 1000, 224)
  assert config.num_branches == 3 and config.model == "one_imagenet_resnet"
  config.batch_size = 1024           # the global batch of a multi-host run: lr follows
  assert math.isclose(config.lr, 0.4)
  config.lr = 0.3                    # an explicit learning rate wins
  assert config.lr == 0.3
  spec = model_spec.ModelSpec.from_config(imagenet.get_config("resnet50_baseline"))
  assert models.count_params(spec.abstract_variables((224, 224, 3))["params"]) == 25_557_032


def test_resnet18_one_smoke_on_mock_imagenet_trains_resumes_and_exports(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  config = _config(dataset="imagenet2012", num_classes=1000, num_epochs=1)
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    first = train.train_and_evaluate(config, workdir)
    resumed = train.train_and_evaluate(_config(dataset="imagenet2012", num_classes=1000),
                                       workdir)
  assert first["test/count"] == resumed["test/count"] == 40
  assert all(np.isfinite(v) for v in resumed.values())
  assert [int(r["epoch"]) for r in _rows(os.path.join(workdir, "metrics.csv"))] == [1, 2]
  spec, _ = checkpoints.load(workdir)
  assert spec == model_spec.ModelSpec("one_imagenet_resnet", 18, 1000, 3)

  out = str(tmp_path / "branch1.pth")
  assert convert.main(["--to_torch", "--branch", "1", workdir, out]) == 0
  state_dict = torch.load(out, map_location="cpu", weights_only=True)["state_dict"]
  assert state_dict["fc.weight"].shape == (1000, 512) and "conv1.weight" in state_dict
  assert int(state_dict["bn1.num_batches_tracked"]) == 4   # the steps trained


def test_two_processes_train_through_local_sh(tmp_path):
  """ONE ResNet-10 (the smoke form of resnet34_one), 2 processes x 1 device, one epoch."""
  workdir, logs = tmp_path / "run", tmp_path / "logs"
  args = [f"--config={os.path.join(ROOT, 'configs', 'imagenet.py')}:resnet34_one,smoke",
          f"--workdir={workdir}", "--config.num_epochs=1", "--config.progress_bar=False"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(PYTHON=sys.executable, ONE_JAX_LOCAL_DEVICES="1", ONE_JAX_LOG_DIR=str(logs),
             JAX_PLATFORMS="cpu")
  env.setdefault("JAX_COMPILATION_CACHE_DIR",
                 os.environ.get("ONE_JAX_TEST_CACHE", "/tmp/one_jax_test_xla_cache"))
  proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "local.sh"), "2"] + args,
                        env=env, capture_output=True, text=True, timeout=900)
  texts = {name: open(logs / name).read() for name in sorted(os.listdir(logs))}
  assert proc.returncode == 0, (proc.stderr, texts)
  assert "epoch 1/1:" in texts["process_0.log"] and "epoch 1/1:" not in texts["process_1.log"]
  rows = _rows(workdir / "metrics.csv")
  assert len(rows) == 1 and float(rows[0]["test/count"]) == 24   # each example once
  _, meta = checkpoints.restore_raw(str(workdir))
  assert meta["step"] == 2 and meta["model"]["kind"] == "one_imagenet_resnet"
  assert meta["model"]["depth"] == 10

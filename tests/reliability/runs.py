"""What the reliability tests share: running the command line with a fault injected, and
comparing runs bit for bit."""
import csv
import hashlib
import os
import shutil
import subprocess
import sys

import jax
import numpy as np

from one_jax.storage import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAULT_SCRIPT = os.path.join(ROOT, "tests", "fault_injection.py")
STEP1 = os.path.join(ROOT, "configs", "step1.py")
SMOKE = [f"--config={STEP1}:baseline,smoke", "--config.progress_bar=False"]  # 2 epochs x 4 steps
TIMING_COLUMNS = ("epoch_time_s", "train_images_per_sec")
TIMEOUT = 400


def process_env(devices=1, **extra):
  env = dict(os.environ)
  env.pop("ONE_JAX_FAULT", None)
  env.update({
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
      # Every run here compiles the same smoke step: share the tests' compilation cache.
      "JAX_COMPILATION_CACHE_DIR": os.environ.get("ONE_JAX_TEST_CACHE",
                                                  "/tmp/one_jax_test_xla_cache"),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
  })
  env.update(extra)
  return env


def main(args, *, fault=None, devices=1, cwd=ROOT, command=None, **env):
  """Runs the command line (with a fault injected when given); returns the CompletedProcess."""
  prog = [sys.executable, FAULT_SCRIPT] if fault else [sys.executable, "-m", "one_jax.main"]
  extra = {"ONE_JAX_FAULT": fault} if fault else {}
  return subprocess.run((command or prog) + list(args), cwd=cwd, capture_output=True, text=True,
                        timeout=TIMEOUT, env=process_env(devices, **extra, **env))


def metrics_rows(workdir):
  with open(os.path.join(workdir, "metrics.csv"), newline="") as f:
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS}
            for row in csv.DictReader(f)]


def assert_same_run(expected, actual):
  """Same final checkpoint (every array bit for bit) and the same metrics.csv (but timings)."""
  raw_e, meta_e = checkpoints.restore_raw(expected)
  raw_a, meta_a = checkpoints.restore_raw(actual)
  assert meta_a["step"] == meta_e["step"] == 8 and meta_a["epoch"] == 2
  assert jax.tree.structure(raw_e) == jax.tree.structure(raw_a)
  jax.tree.map(np.testing.assert_array_equal, raw_e, raw_a)
  assert metrics_rows(actual) == metrics_rows(expected)


def snapshot(path):
  """{relative path: sha256} of every file and directory under path (None if absent)."""
  if not os.path.exists(path):
    return None
  if os.path.isfile(path):
    with open(path, "rb") as f:
      return hashlib.sha256(f.read()).hexdigest()
  out = {}
  for dirpath, dirnames, filenames in os.walk(path):
    rel = os.path.relpath(dirpath, path)
    out[rel + "/"] = "dir"
    for name in filenames:
      with open(os.path.join(dirpath, name), "rb") as f:
        out[os.path.join(rel, name)] = hashlib.sha256(f.read()).hexdigest()
  return out


def largest_state_file(step_dir):
  files = [os.path.join(d, n) for d, _, names in os.walk(os.path.join(step_dir, "state"))
           for n in names]
  return max(files, key=os.path.getsize)


def copy_run(run, tmp_path, name="run"):
  dst = str(tmp_path / name)
  shutil.copytree(run, dst)
  return dst


def bad_npz(path, **changes):
  rng = np.random.default_rng(0)
  arrays = {"x_train": rng.integers(0, 255, (64, 32, 32, 3), dtype=np.uint8),
            "y_train": rng.integers(0, 10, 64), "x_test": rng.integers(0, 255, (16, 32, 32, 3),
                                                                        dtype=np.uint8),
            "y_test": rng.integers(0, 10, 16)}
  arrays.update(changes)
  np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
  return str(path)

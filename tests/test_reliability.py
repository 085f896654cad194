"""Reliability: preemption, crash-safe checkpoints, the non-finite guard, and bad input.

Faults are injected into real `python -m one_jax.main` processes (tests/fault_injection.py):
SIGTERM at a chosen step, SIGKILL inside a checkpoint save, NaN at a chosen step. Every
interrupted run is resumed with the same command and must end with exactly the parameters,
optimizer state and metrics.csv of an uninterrupted run.
"""
import concurrent.futures
import csv
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from one_jax import checkpoints, preemption, train, workdirs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULT_SCRIPT = os.path.join(ROOT, "tests", "fault_injection.py")
STEP1 = os.path.join(ROOT, "configs", "step1.py")
SMOKE = [f"--config={STEP1}:baseline,smoke", "--config.progress_bar=False"]  # 2 epochs x 4 steps
TIMING_COLUMNS = ("epoch_time_s", "train_images_per_sec")
TIMEOUT = 400


def _env(devices=1, **extra):
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


def _main(args, *, fault=None, devices=1, cwd=ROOT, command=None, **env):
  """Runs the command line (with a fault injected when given); returns the CompletedProcess."""
  prog = [sys.executable, FAULT_SCRIPT] if fault else [sys.executable, "-m", "one_jax.main"]
  extra = {"ONE_JAX_FAULT": fault} if fault else {}
  return subprocess.run((command or prog) + list(args), cwd=cwd, capture_output=True, text=True,
                        timeout=TIMEOUT, env=_env(devices, **extra, **env))


def _metrics_rows(workdir):
  with open(os.path.join(workdir, "metrics.csv"), newline="") as f:
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS}
            for row in csv.DictReader(f)]


def _assert_same_run(expected, actual):
  """Same final checkpoint (every array bit for bit) and the same metrics.csv (but timings)."""
  raw_e, meta_e = checkpoints.restore_raw(expected)
  raw_a, meta_a = checkpoints.restore_raw(actual)
  assert meta_a["step"] == meta_e["step"] == 8 and meta_a["epoch"] == 2
  assert jax.tree.structure(raw_e) == jax.tree.structure(raw_a)
  jax.tree.map(np.testing.assert_array_equal, raw_e, raw_a)
  assert _metrics_rows(actual) == _metrics_rows(expected)


def _snapshot(path):
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


def _largest_state_file(step_dir):
  files = [os.path.join(d, n) for d, _, names in os.walk(os.path.join(step_dir, "state"))
           for n in names]
  return max(files, key=os.path.getsize)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """An uninterrupted smoke run: the result every interrupted run must reproduce."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  result = _main(SMOKE + [f"--workdir={workdir}"])
  assert result.returncode == 0, result.stderr
  return workdir


def _copy(run, tmp_path, name="run"):
  dst = str(tmp_path / name)
  shutil.copytree(run, dst)
  return dst


# ----------------------------------------------------------------------------- preemption


def test_sigterm_mid_epoch_checkpoints_and_resumes_exactly(reference_run, tmp_path):
  workdir = str(tmp_path / "run")
  args = SMOKE + [f"--workdir={workdir}"]
  first = _main(args, fault="signal_at_step=SIGTERM:6")
  assert first.returncode == preemption.EXIT_INTERRUPTED, first.stderr
  assert "stopped by SIGTERM at step 6 (epoch 2, step 2 of 4)" in first.stderr
  _, meta = checkpoints.restore_raw(workdir)
  assert (meta["step"], meta["epoch"], meta["step_in_epoch"]) == (6, 1, 2)
  assert set(meta["train_sums"]) == {"train/ce", "train/loss", "train/top1/model"}
  assert len(_metrics_rows(workdir)) == 1

  # The command the message gives, run as it is (with this interpreter for `python`).
  command = shlex.split(first.stderr.split("resume with the same command: ")[1].strip())
  assert command[:3] == ["python", "-m", "one_jax.main"] and f"--workdir={workdir}" in command
  second = _main([], command=[sys.executable] + command[1:])
  assert second.returncode == 0, second.stderr
  assert "from checkpoint step 6 (epoch 2, step 2 of 4)" in second.stdout
  _assert_same_run(reference_run, workdir)


def test_sigterm_at_the_end_of_an_epoch_stops_after_its_checkpoint(reference_run, tmp_path):
  workdir = str(tmp_path / "run")
  args = SMOKE + [f"--workdir={workdir}"]
  first = _main(args, fault="signal_at_step=SIGTERM:4")  # during the epoch's last step
  assert first.returncode == preemption.EXIT_INTERRUPTED, first.stderr
  assert (f"stopped by SIGTERM at the end of epoch 1 (step 4): checkpoint 4 written to "
          f"{workdir}/checkpoints") in first.stderr
  _, meta = checkpoints.restore_raw(workdir)
  assert (meta["step"], meta["epoch"]) == (4, 1) and "step_in_epoch" not in meta
  assert len(_metrics_rows(workdir)) == 1
  second = _main(args)
  assert second.returncode == 0, second.stderr
  assert "from checkpoint step 4 (epoch 2)" in second.stdout
  _assert_same_run(reference_run, workdir)


def test_stop_request_turns_signals_into_a_flag_and_restores_handlers():
  before = signal.getsignal(signal.SIGINT)
  with preemption.StopRequest(announce=False) as stop:
    assert not stop.requested
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.requested and stop.signal_name == "SIGINT"
    with pytest.raises(KeyboardInterrupt):  # a second signal stops at once
      os.kill(os.getpid(), signal.SIGTERM)
  assert signal.getsignal(signal.SIGINT) is before

  seen = []  # off the main thread nothing is installed (signal.signal would raise there)
  thread = threading.Thread(target=lambda: seen.append(
      preemption.StopRequest().__enter__()._previous))
  thread.start()
  thread.join()
  assert seen == [{}]


# ----------------------------------------------------------------------------- crash safety


def test_sigkill_inside_a_save_keeps_the_previous_checkpoint(reference_run, tmp_path):
  workdir = str(tmp_path / "run")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  marker = tmp_path / "inside_save"
  args = SMOKE + [f"--workdir={workdir}"]
  with open(tmp_path / "log", "w") as log:
    proc = subprocess.Popen([sys.executable, FAULT_SCRIPT] + args, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT,
                            env=_env(ONE_JAX_FAULT="block_in_save=8",
                                     ONE_JAX_FAULT_MARKER=str(marker)))
    try:
      deadline = time.time() + TIMEOUT
      while not marker.exists():
        assert proc.poll() is None, (tmp_path / "log").read_text()
        assert time.time() < deadline
        time.sleep(0.2)
      proc.send_signal(signal.SIGKILL)  # every file of step 8 written, the commit not done
    finally:
      proc.kill()
      proc.wait()
  assert sorted(os.listdir(ckpt_dir)) == ["4", "8.orbax-checkpoint-tmp"]
  step, _, meta, unreadable = checkpoints.restore_latest(ckpt_dir)
  assert (step, meta["epoch"], unreadable) == (4, 1, [])
  assert checkpoints.restore_raw(workdir)[1]["step"] == 4

  resumed = _main(args)
  assert resumed.returncode == 0, resumed.stderr
  assert "from checkpoint step 4 (epoch 2)" in resumed.stdout
  assert sorted(os.listdir(ckpt_dir)) == ["4", "8"]  # the partial save was cleaned up
  _assert_same_run(reference_run, workdir)


def test_damaged_latest_checkpoint_is_an_error_or_an_explicit_fallback(reference_run, tmp_path):
  workdir = _copy(reference_run, tmp_path)
  with open(_largest_state_file(os.path.join(workdir, "checkpoints", "8")), "r+b") as f:
    f.truncate(100)
  before = _snapshot(workdir)
  refused = _main(SMOKE + [f"--workdir={workdir}"])
  assert refused.returncode == 1
  message = refused.stderr.strip()
  assert message.startswith("error: the latest checkpoint is unreadable") and "\n" not in message
  assert f"step 8 in {workdir}/checkpoints" in message
  assert "resume from step 4" in message and "--config.resume_fallback=True" in message
  assert _snapshot(workdir) == before

  fallback = _main(SMOKE + [f"--workdir={workdir}", "--config.resume_fallback=True"])
  assert fallback.returncode == 0, fallback.stderr
  assert "checkpoint step 8 is unreadable: moved to" in fallback.stderr
  assert os.path.isdir(os.path.join(workdir, "corrupt_checkpoints", "8"))  # kept, not deleted
  _assert_same_run(reference_run, workdir)  # epoch 2 trained again from step 4


def test_digest_catches_silently_changed_bytes(reference_run, tmp_path):
  workdir = _copy(reference_run, tmp_path)
  path = _largest_state_file(os.path.join(workdir, "checkpoints", "8"))
  with open(path, "r+b") as f:  # a flipped byte that the storage layer itself may not notice
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))
  with pytest.raises(checkpoints.CheckpointError, match=f"step 8 in {workdir}/checkpoints"):
    checkpoints.restore_raw(workdir)
  assert checkpoints.restore_raw(workdir, 4)[1]["step"] == 4


# ----------------------------------------------------------------------------- non-finite guard


def test_diverging_learning_rate_stops_at_the_first_non_finite_step(tmp_path):
  workdir = str(tmp_path / "run")
  # Epoch 1 at lr 0.05, then lr x 1e8: the second epoch blows up.
  result = _main(SMOKE + [f"--workdir={workdir}", "--config.milestones=(1,)",
                          "--config.gamma=1e8"])
  assert result.returncode == 1
  message = result.stderr.strip()
  assert message.startswith("error: non-finite values at step ") and "\n" not in message
  assert "(epoch 2, step " in message and " of 4) in: " in message
  assert any(w in message for w in ("loss term", "gradients", "parameter update"))
  assert f"the last good checkpoint, step 4 in {workdir}/checkpoints, is kept" in message
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["4"]
  state, _ = checkpoints.restore_raw(workdir)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state)
             if np.issubdtype(x.dtype, np.floating))
  assert len(_metrics_rows(workdir)) == 1


def test_non_finite_step_is_reported_exactly(tmp_path):
  workdir = str(tmp_path / "run")
  result = _main(SMOKE + [f"--workdir={workdir}"], fault="nan_at_step=7")
  assert result.returncode == 1
  assert "non-finite values at step 7 (epoch 2, step 3 of 4) in: " in result.stderr
  assert "gradients" in result.stderr
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["4"]


def test_train_step_does_not_apply_a_non_finite_update():
  from configs import step1  # pylint: disable=g-import-not-at-top
  from one_jax import model_spec, optimizer, parallel  # pylint: disable=g-import-not-at-top
  config = step1.get_config("three_branch,smoke")
  config.batch_size = 32
  mesh = parallel.make_mesh(jax.devices()[:1])
  spec = model_spec.ModelSpec.from_config(config)
  rng = jax.random.key(0)
  tx = optimizer.create_optimizer(config, 4, spec.abstract_variables()["params"])
  before = train.initial_state(spec, tx, (32, 32, 3), rng)
  step = train.make_train_step(config, tx, mesh)
  batch = {"image": np.full((32, 32, 32, 3), np.inf, np.float32),
           "label": np.zeros(32, np.int32)}
  after, metrics = step(parallel.replicate(before, mesh), parallel.shard_batch(batch, mesh),
                        np.float32(0))
  metrics = parallel.to_host(metrics)
  assert metrics[train.FINITE_ALL] == 0.0 and metrics[f"{train.FINITE}gradients"] == 0.0
  assert {f"{train.FINITE}{t}" for t in ("loss", "kl", "ce_ensemble")} <= set(metrics)
  jax.tree.map(np.testing.assert_array_equal, before, parallel.to_host(after))


# ----------------------------------------------------------------------------- workdir safety


def test_config_differences_and_safe_fields():
  stored = {"lr": 0.1, "num_epochs": 300, "progress_bar": True, "milestones": [150, 225],
            "seed": 0}
  current = {"lr": 0.2, "num_epochs": 400, "progress_bar": False, "milestones": [150, 225],
             "seed": 0, "added_later": 1}
  assert workdirs.differences(stored, current) == ["lr: 0.1 -> 0.2"]
  assert workdirs.differences({"surgery": "expand", "init_from": "/w/init"},
                              {"surgery": "expand", "init_from": ""}) == []


def test_new_run_starts_beside_an_existing_run(reference_run, tmp_path):
  workdir = _copy(reference_run, tmp_path)
  before = _snapshot(workdir)
  result = _main(SMOKE + [f"--workdir={workdir}", "--config.new_run=True", "--config.lr=0.1",
                          "--config.num_epochs=1"])
  assert result.returncode == 0, result.stderr
  assert f"workdir: {workdir}-2" in result.stdout
  assert _snapshot(workdir) == before
  assert checkpoints.restore_raw(f"{workdir}-2")[1]["step"] == 4


# ----------------------------------------------------------------------------- bad input


def _bad_npz(path, **changes):
  rng = np.random.default_rng(0)
  arrays = {"x_train": rng.integers(0, 255, (64, 32, 32, 3), dtype=np.uint8),
            "y_train": rng.integers(0, 10, 64), "x_test": rng.integers(0, 255, (16, 32, 32, 3),
                                                                        dtype=np.uint8),
            "y_test": rng.integers(0, 10, 16)}
  arrays.update(changes)
  np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
  return str(path)


def test_bad_input_gets_one_line_and_leaves_everything_as_it_was(reference_run, tmp_path):
  existing = _copy(reference_run, tmp_path, "existing")
  a_file = tmp_path / "a_file"
  a_file.write_text("not a directory")
  empty_cwd = tmp_path / "cwd"
  empty_cwd.mkdir()
  npz = {name: _bad_npz(tmp_path / f"{name}.npz", **changes) for name, changes in {
      "missing_key": {"y_test": None},
      "wrong_shape": {"x_train": np.zeros((64, 32, 32), np.uint8)},
      "wrong_dtype": {"x_train": np.zeros((64, 32, 32, 3), np.float32)},
      "labels_out_of_range": {"y_train": np.full(64, 12)}}.items()}
  new = str(tmp_path / "new_dir")  # must still not exist afterwards
  out = str(tmp_path / "out")
  main = [sys.executable, "-m", "one_jax.main"]
  surgery = [sys.executable, "-m", "one_jax.surgery"]
  convert = [sys.executable, "-m", "one_jax.convert"]
  smoke_new = SMOKE + [f"--workdir={new}"]
  # (name, command, expected text of the one-line error, paths that must not change, devices)
  cases = [
      ("unknown variant", main + [f"--config={STEP1}:seven_branch", f"--workdir={new}"],
       "unknown config variant 'seven_branch': use one of", [new], 1),
      ("unknown option", main + [f"--config={STEP1}:baseline,smok", f"--workdir={new}"],
       "unknown config option(s) smok", [new], 1),
      ("missing config file", main + ["--config=configs/nope.py:baseline", f"--workdir={new}"],
       "config file configs/nope.py does not exist", [new], 1),
      ("unknown field", main + smoke_new + ["--config.lrr=0.1"],
       "unknown config field --config.lrr: did you mean --config.lr?", [new], 1),
      ("wrong type", main + smoke_new + ["--config.depth=abc"],
       "flag --config.depth=abc: invalid literal for int()", [new], 1),
      ("wrong tuple", main + smoke_new + ["--config.milestones=abc"],
       "milestones=('abc',) is invalid", [new], 1),
      ("bad depth, default workdir", main + SMOKE + ["--config.depth=10"],
       "depth=10 is not a CIFAR ResNet depth: use 6n+2", [str(empty_cwd)], 1),
      ("no branches", main + [f"--config={STEP1}:three_branch,smoke", f"--workdir={new}",
                              "--config.num_branches=0"],
       "num_branches=0 is invalid: a model has at least one branch", [new], 1),
      ("cpu conv library", main + smoke_new + ["--config.cpu_conv_library=mkl"],
       "cpu_conv_library='mkl' is unknown: use one of auto, eigen, ynnpack", [new], 1),
      ("conv impl", main + smoke_new + ["--config.conv_impl=fast"],
       "conv_impl='fast' is unknown: use one of auto, kernel, xla", [new], 1),
      ("batch vs devices", main + smoke_new + ["--config.batch_size=66"],
       "batch_size=66 is not a positive multiple of the 4 devices", [new], 4),
      ("negative lr", main + smoke_new + ["--config.lr=-1"], "lr=-1.0 is invalid", [new], 1),
      ("classes vs dataset", main + smoke_new + ["--config.dataset=cifar10",
                                                 "--config.num_classes=100"],
       "config.num_classes=100 but cifar10 has 10 classes", [new], 1),
      ("npz missing file", main + smoke_new + [f"--config.npz_path={tmp_path}/none.npz"],
       "does not exist: pass an .npz file", [new], 1),
      ("npz missing key", main + smoke_new + [f"--config.npz_path={npz['missing_key']}"],
       "lacks y_test", [new], 1),
      ("npz wrong shape", main + smoke_new + [f"--config.npz_path={npz['wrong_shape']}"],
       "x_train has shape (64, 32, 32); expected [N, H, W, 3]", [new], 1),
      ("npz wrong dtype", main + smoke_new + [f"--config.npz_path={npz['wrong_dtype']}"],
       "x_train has dtype float32; expected uint8", [new], 1),
      ("npz labels", main + smoke_new + [f"--config.npz_path={npz['labels_out_of_range']}"],
       "y_train has labels in [12, 12] but num_classes=10", [new], 1),
      ("init_from missing", main + smoke_new + [f"--config.init_from={tmp_path}/nothing"],
       "does not exist: pass a run's workdir", [new], 1),
      ("init_from not a checkpoint", main + smoke_new + [f"--config.init_from={npz['wrong_dtype']}"],
       "is not a one_jax checkpoint", [new], 1),
      ("init_from other model", main + [f"--config={STEP1}:three_branch,smoke", f"--workdir={new}",
                                        f"--config.init_from={existing}"],
       "does not fit this config's model", [new, existing], 1),
      ("workdir is a file", main + SMOKE + [f"--workdir={a_file}"],
       f"--workdir={a_file} is a file", [str(a_file)], 1),
      ("workdir of another config", main + SMOKE + [f"--workdir={existing}", "--config.lr=0.1",
                                                    "--config.seed=3"],
       f"{existing} holds a run with a different config (lr: 0.05 -> 0.1; seed: 0 -> 3)",
       [existing, f"{existing}-2"], 1),
      ("surgery: not a checkpoint", surgery + ["expand", f"--src={npz['missing_key']}",
                                               f"--dst={out}", "--branches=3"],
       "is not a one_jax checkpoint", [out], 1),
      ("surgery: wrong model kind", surgery + ["extract", f"--src={existing}", "--branch=0",
                                               f"--dst={out}"],
       "extract: the model is already a plain ResNet", [out, existing], 1),
      ("surgery: existing destination", surgery + ["expand", f"--src={existing}",
                                                   f"--dst={existing}", "--branches=3"],
       "already exists: choose a new --dst", [existing], 1),
      ("convert: a directory", convert + [existing, out], "is a directory", [out, existing], 1),
      ("convert: not torch", convert + [npz["missing_key"], out], "not a PyTorch checkpoint",
       [out], 1),
      ("convert --to_torch: not a checkpoint", convert + ["--to_torch", npz["missing_key"],
                                                          f"{out}.pth"],
       "is not a one_jax checkpoint", [f"{out}.pth"], 1),
  ]
  if not os.path.exists(os.path.join(ROOT, "one_jax", "convert.py")):
    cases = [c for c in cases if not c[0].startswith("convert")]
  before = {p: _snapshot(p) for case in cases for p in case[3]}
  before[str(empty_cwd)] = _snapshot(str(empty_cwd))

  def run(case):
    name, command, _, _, devices = case
    cwd = str(empty_cwd) if "default workdir" in name else ROOT
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT,
                          env=_env(devices))

  with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
    results = list(pool.map(run, cases))
  failures = []
  for (name, _, expected, paths, _), result in zip(cases, results):
    lines = result.stderr.strip().splitlines()
    if (result.returncode != 1 or len(lines) != 1 or not lines[0].startswith("error: ")
        or expected not in lines[0]):
      failures.append(f"{name}: exit {result.returncode}, stderr {result.stderr[-1500:]!r}")
    for p in paths:
      if _snapshot(p) != before[p]:
        failures.append(f"{name}: {p} changed")
  assert not failures, "\n".join(failures)

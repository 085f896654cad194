"""Reliability: preemption, crash-safe checkpoints, the non-finite guard, and bad input.

Faults are injected into real `python -m one_jax.main` processes (tests/fault_injection.py):
SIGTERM at a chosen step, SIGKILL inside a checkpoint save, NaN at a chosen step. Every
interrupted run is resumed with the same command and must end with exactly the parameters,
optimizer state and metrics.csv of an uninterrupted run.
"""
import concurrent.futures
import csv
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from one_jax import surgery as surgery_ops
from one_jax.storage import checkpoints, run_lock, workdirs
from one_jax.training import config_checks, preemption, steps, train_state

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


def test_sigterm_inside_a_dispatch_stops_at_its_end_and_resumes_exactly(reference_run,
                                                                       tmp_path):
  # 3 steps per dispatch: epoch 1 is dispatches of steps 1-3 and 4, epoch 2 of 5-7 and 8. The
  # signal comes as step 5's batch is taken: the dispatch of steps 5-7 ends, then the stop.
  # Every 2 steps a log line (at the first dispatch boundary past it, and at epoch ends);
  # steps 2-3 are profiled.
  workdir = str(tmp_path / "run")
  args = SMOKE + [f"--workdir={workdir}", "--config.steps_per_dispatch=3",
                  "--config.log_every_steps=2", "--config.profile_steps=2,3"]
  first = _main(args, fault="signal_at_step=SIGTERM:5")
  assert first.returncode == preemption.EXIT_INTERRUPTED, first.stderr
  assert "stopped by SIGTERM at step 7 (epoch 2, step 3 of 4)" in first.stderr
  assert any(n.endswith(".xplane.pb") for _, _, names in os.walk(os.path.join(workdir, "profile"))
             for n in names)
  second = _main(args)
  assert second.returncode == 0, second.stderr
  assert "from checkpoint step 7 (epoch 2, step 3 of 4)" in second.stdout
  _assert_same_run(reference_run, workdir)  # and the same as one step per dispatch
  with open(os.path.join(workdir, "steps.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  assert [line["step"] for line in lines] == [3, 4, 7, 8]
  assert set(lines[0]) == {"step", "lr", "train/ce", "train/loss", "train/top1/model"}
  epoch_1 = _metrics_rows(workdir)[0]  # the epoch's mean is the steps' means, weighted
  np.testing.assert_allclose((3 * lines[0]["train/loss"] + lines[1]["train/loss"]) / 4,
                             float(epoch_1["train/loss"]), rtol=1e-5)


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
  with open(os.path.join(workdir, run_lock.LOCK_NAME)) as f:  # left behind by the killed run
    assert json.load(f)["pid"] == proc.pid
  step, _, meta, unreadable = checkpoints.restore_latest(ckpt_dir)
  assert (step, meta["epoch"], unreadable) == (4, 1, [])
  assert checkpoints.restore_raw(workdir)[1]["step"] == 4

  resumed = _main(args)
  assert resumed.returncode == 0, resumed.stderr
  assert "from checkpoint step 4 (epoch 2)" in resumed.stdout
  assert sorted(os.listdir(ckpt_dir)) == ["4", "8"]  # the partial save was cleaned up
  assert not os.path.exists(os.path.join(workdir, run_lock.LOCK_NAME))  # released at the end
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
  assert message.endswith("then start again with a new --workdir or --config.new_run=True "
                          "(this workdir keeps the run's config)")
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


def test_non_finite_step_inside_a_dispatch_is_reported_by_its_own_number(tmp_path):
  workdir = str(tmp_path / "run")
  result = _main(SMOKE + [f"--workdir={workdir}", "--config.steps_per_dispatch=3"],
                 fault="nan_at_step=6")   # the second step of the dispatch of steps 5-7
  assert result.returncode == 1
  assert "non-finite values at step 6 (epoch 2, step 2 of 4) in: " in result.stderr
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["4"]


def test_train_step_does_not_apply_a_non_finite_update():
  from configs import step1  # pylint: disable=g-import-not-at-top
  from one_jax import parallel  # pylint: disable=g-import-not-at-top
  from one_jax.architectures import model_spec
  from one_jax.training import optimizer
  config = step1.get_config("three_branch,smoke")
  config.batch_size = 32
  mesh = parallel.make_mesh(jax.devices()[:1])
  spec = model_spec.ModelSpec.from_config(config)
  rng = jax.random.key(0)
  tx = optimizer.create_optimizer(config, 4, spec.abstract_variables()["params"])
  before = train_state.initial_state(spec, tx, (32, 32, 3), rng)
  step = steps.make_train_step(config, spec, tx, mesh)
  batch = {"image": np.full((32, 32, 32, 3), np.inf, np.float32),
           "label": np.zeros(32, np.int32)}
  after, metrics = step(parallel.replicate(before, mesh), parallel.shard_batch(batch, mesh),
                        np.float32(0))
  metrics = parallel.to_host(metrics)
  assert metrics[steps.FINITE_ALL] == 0.0 and metrics[f"{steps.FINITE}gradients"] == 0.0
  assert {f"{steps.FINITE}{t}" for t in ("loss", "kl", "ce_ensemble")} <= set(metrics)
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


# The bad-input table's rows (bad_input_outcomes), one test id each.
BAD_INPUT_CASES = (
    'unknown variant',
    'unknown option',
    'missing config file',
    'unknown field',
    'wrong type',
    'wrong tuple',
    'bad depth, default workdir',
    'no branches',
    'cpu conv library',
    'conv impl',
    'batch vs devices',
    'negative lr',
    'classes vs dataset',
    'npz missing file',
    'npz missing key',
    'npz wrong shape',
    'npz wrong dtype',
    'npz labels',
    'init_from missing',
    'init_from not a checkpoint',
    'init_from other model',
    'workdir is a file',
    'workdir of another config',
    'surgery: not a checkpoint',
    'surgery: wrong model kind',
    'surgery: existing destination',
    'surgery: destination is the source',
    'npz 0x0 images',
    'temperature 0',
    'TFDS data not prepared, offline',
    'TFDS download forbidden',
    'convert: a directory',
    'convert: not torch',
    'convert --to_torch: not a checkpoint',
    'npz path is a directory',
    'milestones past a 1-epoch run',
    'eval: checkpoint classes differ from the data',
    'eval: non-finite weights',
    'finished run whose checkpoints were deleted',
    'workdir of the user with metrics files',
    'step-2 source of another depth',
    'convert: no output argument',
    'convert --to_torch: gate offset',
    'convert --to_torch: non-finite weights',
    'bench: unknown field',
    'bench: unknown variant',
    'bench: unknown flag',
    'bench: bad value',
)


@pytest.fixture(scope="module")
def bad_input_outcomes(reference_run, tmp_path_factory):
  """Every bad-input case run once, 4 at a time: name -> the ways it failed ([] = as promised).

  Each case is a test of its own below; running them together keeps the table's wall time
  that of a few starts instead of one per case.
  """
  tmp_path = tmp_path_factory.mktemp("bad_input")
  existing = _copy(reference_run, tmp_path, "existing")
  a_file = tmp_path / "a_file"
  a_file.write_text("not a directory")
  empty_cwd = tmp_path / "cwd"
  empty_cwd.mkdir()
  npz = {name: _bad_npz(tmp_path / f"{name}.npz", **changes) for name, changes in {
      "missing_key": {"y_test": None},
      "wrong_shape": {"x_train": np.zeros((64, 32, 32), np.uint8)},
      "wrong_dtype": {"x_train": np.zeros((64, 32, 32, 3), np.float32)},
      "labels_out_of_range": {"y_train": np.full(64, 12)},
      "no_pixels": {"x_train": np.zeros((64, 0, 0, 3), np.uint8),
                    "x_test": np.zeros((16, 0, 0, 3), np.uint8)}}.items()}
  # A checkpoint with NaN weights, one whose gate has a surgery's offsets, a finished run
  # whose checkpoints were deleted, and a directory of the user's own metrics files.
  raw, meta = checkpoints.restore_raw(existing)
  raw["params"] = jax.tree.map(lambda x: np.full_like(x, np.nan), raw["params"])
  nan_ckpt = checkpoints.save_standalone(str(tmp_path / "nan_ckpt"), raw, meta)
  offset_ckpt = surgery_ops.run_expand(existing, str(tmp_path / "offset_ckpt"), 2)
  orphan = _copy(reference_run, tmp_path, "orphan")
  shutil.rmtree(os.path.join(orphan, "checkpoints"))
  user_dir = tmp_path / "user_dir"
  user_dir.mkdir()
  (user_dir / "metrics.csv").write_text("epoch,acc\n1,0.93\n")
  (user_dir / "summary.txt").write_text("my own results\n")
  new = str(tmp_path / "new_dir")  # must still not exist afterwards
  out = str(tmp_path / "out")
  main = [sys.executable, "-m", "one_jax.main"]
  surgery = [sys.executable, "-m", "one_jax.surgery"]
  convert = [sys.executable, "-m", "one_jax.convert"]
  bench = [sys.executable, "-m", "one_jax.bench", f"--config={STEP1}:baseline,smoke", "--steps=1"]
  step2 = os.path.join(ROOT, "configs", "step2.py")
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
       "extract: the model is already a single-branch baseline", [out, existing], 1),
      ("surgery: existing destination", surgery + ["expand", f"--src={existing}",
                                                   f"--dst={empty_cwd}", "--branches=3"],
       "already exists: choose a new --dst", [existing], 1),
      ("surgery: destination is the source", surgery + ["expand", f"--src={existing}",
                                                        f"--dst={existing}", "--branches=3"],
       "lies inside the source", [existing], 1),
      ("npz 0x0 images", main + smoke_new + [f"--config.npz_path={npz['no_pixels']}"],
       "x_train images are 0x0 pixels; the model needs at least 4x4", [new], 1),
      ("temperature 0", main + [f"--config={STEP1}:three_branch,smoke", f"--workdir={new}",
                                "--config.temperature=0"],
       "temperature=0.0 is invalid: it must be > 0", [new], 1),
      ("TFDS data not prepared, offline", main + [f"--config={STEP1}:baseline",
                                                  f"--workdir={new}",
                                                  f"--config.data_dir={tmp_path}/tfds"],
       "or train on a local file with --config.npz_path=FILE.npz", [new], 1),
      ("TFDS download forbidden", main + [f"--config={STEP1}:baseline", f"--workdir={new}",
                                          f"--config.data_dir={tmp_path}/tfds",
                                          "--config.download=False"],
       "--config.download=False forbids downloading it", [new], 1),
      ("convert: a directory", convert + [existing, out], "is a directory", [out, existing], 1),
      ("convert: not torch", convert + [npz["missing_key"], out], "not a PyTorch checkpoint",
       [out], 1),
      ("convert --to_torch: not a checkpoint", convert + ["--to_torch", npz["missing_key"],
                                                          f"{out}.pth"],
       "is not a one_jax checkpoint", [f"{out}.pth"], 1),
      ("npz path is a directory", main + smoke_new + [f"--config.npz_path={empty_cwd}"],
       "is a directory, not a file: pass the .npz file itself", [new], 1),
      ("milestones past a 1-epoch run", main + smoke_new + ["--config.num_epochs=1",
                                                           "--config.milestones=(1,2)"],
       "each in [1, num_epochs=1], e.g. --config.milestones='(1,)'", [new], 1),
      ("eval: checkpoint classes differ from the data",
       main + smoke_new + ["--config.eval_only=True", f"--config.init_from={existing}",
                           "--config.num_classes=20"],
       "holds a model of 10 classes but the test set has 20", [new, existing], 1),
      ("eval: non-finite weights", main + smoke_new + ["--config.eval_only=True",
                                                       f"--config.init_from={nan_ckpt}"],
       "holds non-finite values (NaN or infinity) in", [new, nan_ckpt], 1),
      ("finished run whose checkpoints were deleted", main + SMOKE + [f"--workdir={orphan}"],
       "holds an earlier run (config.json, metrics.csv, metrics.jsonl, summary.txt, curves.png) "
       "but no checkpoint to resume from", [orphan], 1),
      ("workdir of the user with metrics files", main + SMOKE + [f"--workdir={user_dir}"],
       "is not a one_jax run but holds metrics.csv, summary.txt", [str(user_dir)], 1),
      ("step-2 source of another depth",
       main + [f"--config={step2}:three_into_five,smoke", f"--workdir={new}",
               f"--config.source={existing}", "--config.depth=14",
               "--config.progress_bar=False"],
       "but variant 'three_into_five' trains a", [new, existing], 1),
      ("convert: no output argument", convert + [existing],
       "the following arguments are required: dst", [existing], 1),
      ("convert --to_torch: gate offset", convert + ["--to_torch", offset_ckpt, f"{out}.pth"],
       "add --ignore_gate_offset to drop it", [f"{out}.pth", offset_ckpt], 1),
      ("convert --to_torch: non-finite weights", convert + ["--to_torch", nan_ckpt,
                                                            f"{out}.pth"],
       "holds non-finite values", [f"{out}.pth", nan_ckpt], 1),
      ("bench: unknown field", bench + ["--config.lrr=1"],
       "unknown config field --config.lrr: did you mean --config.lr?", [], 1),
      ("bench: unknown variant", bench[:3] + [f"--config={STEP1}:nine_branch"],
       "unknown config variant 'nine_branch'", [], 1),
      ("bench: unknown flag", bench + ["--stepz=1"], "Unknown command line flag 'stepz'", [], 1),
      ("bench: bad value", bench + ["--steps=ten"], "flag --steps=ten: invalid literal", [], 1),
  ]
  assert [c[0] for c in cases] == list(BAD_INPUT_CASES)  # one test id per row, in order
  # The cases run 4 at a time: each gets its own new workdir (a run's lock is per workdir).
  cases = [(name, [a.replace(new, f"{new}-{i}") for a in command], expected,
            [p.replace(new, f"{new}-{i}") for p in paths], devices)
           for i, (name, command, expected, paths, devices) in enumerate(cases)]
  before = {p: _snapshot(p) for case in cases for p in case[3]}
  before[str(empty_cwd)] = _snapshot(str(empty_cwd))

  def run(case):
    name, command, _, _, devices = case
    cwd = str(empty_cwd) if "default workdir" in name else ROOT
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT,
                          env=_env(devices))

  with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
    results = list(pool.map(run, cases))
  outcomes = {}
  for (name, _, expected, paths, _), result in zip(cases, results):
    failures = outcomes.setdefault(name, [])
    lines = result.stderr.strip().splitlines()
    if (result.returncode != 1 or len(lines) != 1 or not lines[0].startswith("error: ")
        or expected not in lines[0]):
      failures.append(f"exit {result.returncode}, stderr {result.stderr[-1500:]!r}")
    for p in paths:
      if _snapshot(p) != before[p]:
        failures.append(f"{p} changed")
  stray = [n for n in os.listdir(tmp_path) if n.startswith("new_dir")]
  return outcomes, stray


@pytest.mark.parametrize("name", BAD_INPUT_CASES)
def test_bad_input_gets_one_line_and_leaves_everything_as_it_was(bad_input_outcomes, name):
  outcomes, _ = bad_input_outcomes
  assert not outcomes[name], "\n".join(outcomes[name])


def test_bad_input_leaves_no_workdir(bad_input_outcomes):
  _, stray = bad_input_outcomes
  assert not stray  # no case created its --workdir


# ----------------------------------------------------------------------------- one run per workdir


def test_two_simultaneous_starts_give_one_run_and_one_refusal(tmp_path):
  workdir = str(tmp_path / "run")
  procs = []
  for lr in ("0.05", "0.04"):
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "one_jax.main"] + SMOKE + [f"--workdir={workdir}",
                                                          f"--config.lr={lr}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()))
  results = [(p, *p.communicate(timeout=TIMEOUT)) for p in procs]
  codes = sorted(p.returncode for p, _, _ in results)
  assert codes == [0, 1], [(p.returncode, err[-800:]) for p, _, err in results]
  (winner, _, _), = [r for r in results if r[0].returncode == 0]
  (_, _, refusal), = [r for r in results if r[0].returncode == 1]
  lines = refusal.strip().splitlines()
  # Which words depends on whether the winner had finished writing its lock file.
  assert len(lines) == 1 and lines[0].startswith((
      f"error: {workdir} is in use by a live run (host {socket.gethostname()}, pid {winner.pid}",
      f"error: {workdir} is being started by another process")), refusal
  lr = 0.05 if winner is procs[0] else 0.04
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["lr"] == lr
  assert [row["epoch"] for row in _metrics_rows(workdir)] == ["1", "2"]  # one run's rows
  assert not os.path.exists(os.path.join(workdir, run_lock.LOCK_NAME))


def _write_lock(workdir, **holder):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, run_lock.LOCK_NAME), "w") as f:
    json.dump(dict({"token": "t"}, **holder), f)


def test_lock_of_a_live_holder_refuses_a_dead_one_is_taken_over(tmp_path):
  workdir = str(tmp_path / "run")
  here = socket.gethostname()
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    _write_lock(workdir, host=here, pid=sleeper.pid,
                start_time=run_lock._process_start_time(sleeper.pid), heartbeat=time.time())
    with pytest.raises(run_lock.RunLocked, match=f"host {here}, pid {sleeper.pid}"):
      run_lock.RunLock(workdir).acquire()
    # The same pid with another start time is another process: the holder is gone.
    _write_lock(workdir, host=here, pid=sleeper.pid, start_time=1, heartbeat=time.time())
    run_lock.RunLock(workdir).acquire().release()
  finally:
    sleeper.kill()
    sleeper.wait()
  _write_lock(workdir, host=here, pid=sleeper.pid, heartbeat=time.time())  # killed: pid gone
  lock = run_lock.RunLock(workdir).acquire()
  with pytest.raises(run_lock.RunLocked, match=f"pid {os.getpid()}"):
    run_lock.RunLock(workdir).acquire()
  lock.release()
  assert os.listdir(workdir) == []
  # Another machine: alive while its heartbeat is fresh, dead after STALE_AFTER_S.
  _write_lock(workdir, host="another-host", pid=1, heartbeat=time.time() - 5)
  with pytest.raises(run_lock.RunLocked, match="host another-host, pid 1"):
    run_lock.RunLock(workdir).acquire()
  _write_lock(workdir, host="another-host", pid=1,
              heartbeat=time.time() - run_lock.STALE_AFTER_S - 1)
  run_lock.RunLock(workdir).acquire().release()


def test_lock_heartbeat_refreshes_and_release_removes_a_new_workdir(tmp_path, monkeypatch):
  monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
  workdir = str(tmp_path / "new")
  lock = run_lock.RunLock(workdir).acquire()
  path = os.path.join(workdir, run_lock.LOCK_NAME)
  with open(path) as f:
    first = json.load(f)["heartbeat"]
  deadline = time.time() + 10
  while time.time() < deadline:
    with open(path) as f:
      if json.load(f)["heartbeat"] > first:
        break
    time.sleep(0.05)
  else:
    pytest.fail("the heartbeat was not refreshed")
  lock.release()
  assert not os.path.exists(workdir)  # created by the lock, left empty: removed


# ----------------------------------------------------------------------------- config fallback


def test_missing_config_json_falls_back_on_the_checkpoint_config(reference_run, tmp_path):
  workdir = _copy(reference_run, tmp_path)
  os.remove(os.path.join(workdir, "config.json"))
  before = _snapshot(workdir)
  refused = _main(SMOKE + [f"--workdir={workdir}", "--config.lr=0.1"])
  lines = refused.stderr.strip().splitlines()
  assert refused.returncode == 1 and len(lines) == 1, refused.stderr
  assert f"{workdir} holds a run with a different config (lr: 0.05 -> 0.1; compared with the " \
         "config of its checkpoint step 8 (config.json is missing))" in lines[0]
  assert _snapshot(workdir) == before


def test_checkpoints_without_any_config_need_adopt_checkpoints(tmp_path):
  from configs import step1  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  for item in ("state", "meta"):  # a step folder whose meta cannot be read
    (workdir / "checkpoints" / "4" / item).mkdir(parents=True)
  config = step1.get_config("baseline,smoke")
  with pytest.raises(ValueError, match="no config.json and no checkpoint with a readable config"
                     ".*--config.adopt_checkpoints=True"):
    workdirs.check_config(config, str(workdir))
  config.adopt_checkpoints = True
  workdirs.check_config(config, str(workdir))


# ----------------------------------------------------------------------------- destinations


def test_surgery_into_a_run_is_refused_and_the_run_still_resumes(reference_run, tmp_path):
  workdir = _copy(reference_run, tmp_path)
  before = _snapshot(workdir)
  result = subprocess.run(
      [sys.executable, "-m", "one_jax.surgery", "expand", f"--src={workdir}",
       f"--dst={workdir}/checkpoints/99", "--branches=3"], cwd=ROOT, capture_output=True,
      text=True, timeout=TIMEOUT, env=_env())
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 1 and len(lines) == 1, result.stderr
  assert lines[0].startswith(f"error: --dst {workdir}/checkpoints/99 lies inside")
  assert _snapshot(workdir) == before
  resumed = _main(SMOKE + [f"--workdir={workdir}"])
  assert resumed.returncode == 0, resumed.stderr
  assert f"{workdir} has finished its 2 epochs (checkpoint step 8): nothing to train" in \
      resumed.stdout
  assert "(epoch 3" not in resumed.stdout
  assert checkpoints.restore_raw(workdir)[1]["step"] == 8


def test_destination_rule(reference_run, tmp_path):
  run = reference_run
  for dst in (f"{run}/x", f"{run}/checkpoints/99", f"{run}/checkpoints/8/x",
              f"{run}/tensorboard/x"):
    with pytest.raises(ValueError, match="lies inside the (run directory|checkpoint)"):
      workdirs.check_destination(dst)
  source = tmp_path / "plain"
  source.mkdir()
  with pytest.raises(ValueError, match="lies inside the source"):
    workdirs.check_destination(str(source / "out"), [str(source)])
  assert workdirs.check_destination(str(tmp_path / "out"), [str(source)]) == str(
      tmp_path / "out")
  from one_jax.interop import pytorch  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="OUT_DIR .* lies inside the run directory"):
    pytorch.convert_to_one_jax(str(tmp_path / "in.pth"), f"{run}/from_torch")
  with pytest.raises(ValueError, match="OUT.pth.tar .* lies inside the source"):
    pytorch.convert_to_torch(run, f"{run}/model.pth.tar")
  with pytest.raises(ValueError, match="OUT.pth.tar .* lies inside the run directory"):
    pytorch.convert_to_torch(str(tmp_path / "ckpt"), f"{run}/model.pth.tar")


def test_finished_run_without_metrics_files_keeps_its_summary(reference_run, tmp_path):
  workdir = _copy(reference_run, tmp_path)
  with open(os.path.join(workdir, "summary.txt")) as f:
    summary = f.read()
  assert "Test accuracy after 2 epochs" in summary
  for name in ("metrics.csv", "metrics.jsonl"):
    os.remove(os.path.join(workdir, name))
  result = _main(SMOKE + [f"--workdir={workdir}"])
  assert result.returncode == 0, result.stderr
  with open(os.path.join(workdir, "summary.txt")) as f:
    assert f.read() == summary
  assert "summary.txt and curves.png were left as they were" in result.stdout


def test_second_signal_before_the_first_checkpoint_does_not_claim_one(tmp_path):
  workdir = str(tmp_path / "run")
  result = _main(SMOKE + [f"--workdir={workdir}"], fault="signal_at_step=SIGTERM:1:2")
  assert result.returncode == 130, result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: interrupted again while stopping") and "intact" not in last
  assert "no checkpoint had been written yet, so the same command starts the run again" in last
  assert not os.listdir(os.path.join(workdir, "checkpoints"))


# ----------------------------------------------------------------------------- every field's check

CASES_SCRIPT = os.path.join(ROOT, "tests", "cli_cases.py")
STEP2 = os.path.join(ROOT, "configs", "step2.py")
STEP2_FIELDS = ("source", "sources", "surgery", "expand_mode", "expand_from", "trunk_from",
                "symmetry_noise", "symmetry_break", "reset_optimizer")
IMAGENET = os.path.join(ROOT, "configs", "imagenet.py")
IMAGENET_FIELDS = ("image_size", "data_workers")


def _base_args(field):
  if field in STEP2_FIELDS:
    return [f"--config={STEP2}:three_into_five,smoke", "--config.progress_bar=False"]
  if field in IMAGENET_FIELDS:
    return [f"--config={IMAGENET}:resnet18_one,smoke", "--config.progress_bar=False"]
  return [f"--config={STEP1}:three_branch,smoke", "--config.progress_bar=False"]


def _base_config(field):
  from configs import imagenet, step1, step2  # pylint: disable=g-import-not-at-top
  if field in IMAGENET_FIELDS:
    return imagenet.get_config("resnet18_one,smoke")
  return (step2.get_config("three_into_five,smoke") if field in STEP2_FIELDS
          else step1.get_config("three_branch,smoke"))


def _invalid_values(field, rng):
  """Values of `field` outside its checked range or set (as command-line text), or [] when
  every value of its type is valid (plain strings: paths are checked when read)."""
  kind = config_checks.kind_of(field)
  config = _base_config(field)
  k = int(rng.integers(0, 1000))
  if field == "depth":
    return [str(6 * (k % 20) + 2 + int(rng.integers(1, 6))), str(int(rng.integers(-50, 8)))]
  if isinstance(kind, config_checks.Number):
    low, high = kind.bounds(config)
    out = []
    if low is not None:
      if kind.integer:
        below = low - (0 if kind.low_open else 1) - k
        out.append(str(below if below not in kind.also else below - 1))
      else:
        out.append(repr(low - (0.0 if kind.low_open else 1e-6) - float(rng.uniform(0, 10))))
    if high is not None:
      if kind.integer:
        out.append(str(high + (0 if kind.high_open else 1) + k))
      else:
        out.append(repr(high + (0.0 if kind.high_open else 1e-6) + float(rng.uniform(0, 10))))
    if not kind.integer:
      out.append(str(rng.choice(["nan", "inf", "-inf"])))
    return out
  if isinstance(kind, config_checks.OneOf):
    return [f"bogus{k}"]
  if isinstance(kind, config_checks.Flag):
    return [str(rng.choice(["maybe", "2", "yes please"]))]
  if isinstance(kind, config_checks.Epochs):
    return [f"({config.num_epochs + 1 + k},)", f"(0, {config.num_epochs})", "(1.5,)"]
  if field == "active_branches":
    return [str(config.num_branches + k), "0,x"]
  if field == "expand_from":
    return [f"a{k}", "-1"]
  if field == "trunk_from":
    return [f"first{k}", "-1"]
  if field == "profile_steps":
    return [f"{k + 2},1", f"0,{k}", "x"]
  return []


CHECKED_FIELDS = [f for f in config_checks.FIELDS if _invalid_values(f, np.random.default_rng(0))]


def _run_cases(cases, tmp_path):
  """[(args, workdir)] -> their results, from one process (tests/cli_cases.py)."""
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  proc = subprocess.run([sys.executable, CASES_SCRIPT], input=json.dumps([a for a, _ in cases]),
                        cwd=str(cwd), capture_output=True, text=True, timeout=TIMEOUT,
                        env=_env(PYTHONPATH=ROOT))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.listdir(cwd) == []  # nothing written where the commands ran
  return json.loads(proc.stdout)


def _check_refusal(result, workdir, field, value):
  lines = result["stderr"].strip().splitlines()
  problem = f"{field}={value}: exit {result['code']}, stderr {result['stderr'][-600:]!r}"
  assert result["code"] == 1, problem
  assert len(lines) == 1 and lines[0].startswith("error: "), problem
  assert "Traceback" not in result["stderr"], problem
  assert f"{field}=" in lines[0] or f"--config.{field}" in lines[0], problem
  assert not os.path.exists(workdir), problem


@pytest.fixture(scope="module")
def field_refusals(tmp_path_factory):
  """One refused command line per checked field (the first invalid value drawn)."""
  tmp_path = tmp_path_factory.mktemp("fields")
  rng = np.random.default_rng(0)
  cases, meta = [], []
  for field in CHECKED_FIELDS:
    value = _invalid_values(field, rng)[0]
    workdir = str(tmp_path / f"run_{field}")
    cases.append((_base_args(field) + [f"--workdir={workdir}", f"--config.{field}={value}"],
                  workdir))
    meta.append((field, value, workdir))
  results = _run_cases(cases, tmp_path)
  return {field: (result, workdir, value) for (field, value, workdir), result in
          zip(meta, results)}


def test_every_config_field_has_a_check_row():
  from configs import imagenet, step1, step2  # pylint: disable=g-import-not-at-top
  fields = set(step1.get_config("three_branch").keys()) | set(
      step2.get_config("three_into_five").keys()) | set(imagenet.get_config("resnet18_one").keys())
  assert fields == set(config_checks.FIELDS)
  plain = set(config_checks.FIELDS) - set(CHECKED_FIELDS)  # any string is valid: read later
  assert plain == {"npz_path", "data_dir", "init_from", "variant", "source", "sources"}


@pytest.mark.parametrize("field", CHECKED_FIELDS)
def test_bad_config_field_is_refused_before_anything_is_written(field_refusals, field):
  result, workdir, value = field_refusals[field]
  _check_refusal(result, workdir, field, value)


def test_random_invalid_values_of_every_field_are_refused(tmp_path):
  """Property: any invalid value of any field -> exit 1, one `error:` line, nothing written."""
  seed = int(time.time())
  rng = np.random.default_rng(seed)
  cases, meta = [], []
  for field in CHECKED_FIELDS:
    for i, value in enumerate(_invalid_values(field, rng)):
      workdir = str(tmp_path / f"run_{field}_{i}")
      cases.append((_base_args(field) + [f"--workdir={workdir}", f"--config.{field}={value}"],
                    workdir))
      meta.append((field, value, workdir))
  results = _run_cases(cases, tmp_path)
  for (field, value, workdir), result in zip(meta, results):
    _check_refusal(result, workdir, field, f"{value} (draw seed {seed})")


def test_stored_paths_are_absolute_and_a_resume_on_another_npz_is_refused(tmp_path,
                                                                          monkeypatch):
  from configs import step1  # pylint: disable=g-import-not-at-top
  here, there, workdir = tmp_path / "here", tmp_path / "there", str(tmp_path / "run")
  for d in (here, there, workdir):
    os.makedirs(d)
  _bad_npz(here / "data.npz")
  _bad_npz(there / "data.npz", y_train=np.zeros(64, np.int64))
  config = step1.get_config("baseline,smoke")
  config.npz_path = "data.npz"
  monkeypatch.chdir(here)
  workdirs.write_config(config, workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["npz_path"] == str(here / "data.npz")
  workdirs.check_config(config, workdir)   # the same file: resumes
  monkeypatch.chdir(there)                 # the same name elsewhere: another file
  with pytest.raises(ValueError, match=f"npz_path: '{here}/data.npz' -> '{there}/data.npz'"):
    workdirs.check_config(config, workdir)
  monkeypatch.chdir(here)                  # the same path, other bytes
  _bad_npz(here / "data.npz", y_train=np.ones(64, np.int64))
  with pytest.raises(ValueError, match="is not the file this run trained on"):
    workdirs.check_config(config, workdir)

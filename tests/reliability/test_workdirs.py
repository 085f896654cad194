"""Workdir safety: one live run per workdir, a run never overwritten, configs and data a resume
must match, destinations of surgery and conversion outside runs.

Faults are injected into real `python -m one_jax.main` processes (tests/fault_injection.py).
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from one_jax.storage import checkpoints, run_lock, workdirs

from tests.reliability import runs


def test_config_differences_and_safe_fields():
  stored = {"lr": 0.1, "num_epochs": 300, "progress_bar": True, "milestones": [150, 225],
            "seed": 0}
  current = {"lr": 0.2, "num_epochs": 400, "progress_bar": False, "milestones": [150, 225],
             "seed": 0, "added_later": 1}
  assert workdirs.differences(stored, current) == ["lr: 0.1 -> 0.2"]
  assert workdirs.differences({"surgery": "expand", "init_from": "/w/init"},
                              {"surgery": "expand", "init_from": ""}) == []


def test_new_run_starts_beside_an_existing_run(reference_run, tmp_path):
  workdir = runs.copy_run(reference_run, tmp_path)
  before = runs.snapshot(workdir)
  result = runs.main(runs.SMOKE + [f"--workdir={workdir}", "--config.new_run=True", "--config.lr=0.1",
                          "--config.num_epochs=1"])
  assert result.returncode == 0, result.stderr
  assert f"workdir: {workdir}-2" in result.stdout
  assert runs.snapshot(workdir) == before
  assert checkpoints.restore_raw(f"{workdir}-2")[1]["step"] == 4




def test_two_simultaneous_starts_give_one_run_and_one_refusal(tmp_path):
  workdir = str(tmp_path / "run")
  procs = []
  for lr in ("0.05", "0.04"):
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "one_jax.main"] + runs.SMOKE + [f"--workdir={workdir}",
                                                          f"--config.lr={lr}"],
        cwd=runs.ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=runs.process_env()))
  results = [(p, *p.communicate(timeout=runs.TIMEOUT)) for p in procs]
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
  assert [row["epoch"] for row in runs.metrics_rows(workdir)] == ["1", "2"]  # one run's rows
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




def test_missing_config_json_falls_back_on_the_checkpoint_config(reference_run, tmp_path):
  workdir = runs.copy_run(reference_run, tmp_path)
  os.remove(os.path.join(workdir, "config.json"))
  before = runs.snapshot(workdir)
  refused = runs.main(runs.SMOKE + [f"--workdir={workdir}", "--config.lr=0.1"])
  lines = refused.stderr.strip().splitlines()
  assert refused.returncode == 1 and len(lines) == 1, refused.stderr
  assert f"{workdir} holds a run with a different config (lr: 0.05 -> 0.1; compared with the " \
         "config of its checkpoint step 8 (config.json is missing))" in lines[0]
  assert runs.snapshot(workdir) == before


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




def test_surgery_into_a_run_is_refused_and_the_run_still_resumes(reference_run, tmp_path):
  workdir = runs.copy_run(reference_run, tmp_path)
  before = runs.snapshot(workdir)
  result = subprocess.run(
      [sys.executable, "-m", "one_jax.surgery", "expand", f"--src={workdir}",
       f"--dst={workdir}/checkpoints/99", "--branches=3"], cwd=runs.ROOT, capture_output=True,
      text=True, timeout=runs.TIMEOUT, env=runs.process_env())
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 1 and len(lines) == 1, result.stderr
  assert lines[0].startswith(f"error: --dst {workdir}/checkpoints/99 lies inside")
  assert runs.snapshot(workdir) == before
  resumed = runs.main(runs.SMOKE + [f"--workdir={workdir}"])
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
  workdir = runs.copy_run(reference_run, tmp_path)
  with open(os.path.join(workdir, "summary.txt")) as f:
    summary = f.read()
  assert "Test accuracy after 2 epochs" in summary
  for name in ("metrics.csv", "metrics.jsonl"):
    os.remove(os.path.join(workdir, name))
  result = runs.main(runs.SMOKE + [f"--workdir={workdir}"])
  assert result.returncode == 0, result.stderr
  with open(os.path.join(workdir, "summary.txt")) as f:
    assert f.read() == summary
  assert "summary.txt and curves.png were left as they were" in result.stdout


def test_second_signal_before_the_first_checkpoint_does_not_claim_one(tmp_path):
  workdir = str(tmp_path / "run")
  result = runs.main(runs.SMOKE + [f"--workdir={workdir}"], fault="signal_at_step=SIGTERM:1:2")
  assert result.returncode == 130, result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: interrupted again while stopping") and "intact" not in last
  assert "no checkpoint had been written yet, so the same command starts the run again" in last
  assert not os.listdir(os.path.join(workdir, "checkpoints"))

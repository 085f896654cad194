"""benchmarks/fidelity/measure_gain.py end to end on tiny synthetic data: both implementations
train the baseline and ONE-3 (depth 8, 2 steps), the table and the JSON are written, a rerun
reuses the finished runs, and bad arguments get a one-line error."""
import json
import os
import subprocess
import sys

import numpy as np

from one_jax.data import in_memory

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "fidelity", "measure_gain.py")
TRAINER = os.path.join(REPO, "benchmarks", "fidelity", "torch_train.py")


def _tiny_npz(path):
  train, test = in_memory.synthetic_sources(64, 40, 10, seed=0)
  np.savez(path, x_train=train.images, y_train=train.labels, x_test=test.images,
           y_test=test.labels)
  return str(path)


def _torch_train(*args):
  """Runs the PyTorch trainer; returns its stdout after checking that it succeeded."""
  proc = subprocess.run([sys.executable, TRAINER, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def _measure(*args):
  return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=900)


def test_measure_gain_trains_both_implementations_and_writes_the_table(tmp_path):
  npz = _tiny_npz(tmp_path / "tiny.npz")
  out = tmp_path / "out"
  args = [f"--npz={npz}", f"--out_dir={out}", "--seeds=0", "--depth=8", "--epochs=1",
          "--batch=16", "--steps_per_epoch=2", "--threads=1",
          "--milestones=1"]
  proc = _measure(*args)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  rows = json.loads((out / "results.json").read_text())
  assert sorted((r["implementation"], r["model"]) for r in rows) == [
      ("one_jax", "baseline"), ("one_jax", "one"), ("pytorch", "baseline"), ("pytorch", "one")]
  for r in rows:
    heads = {"model"} if r["model"] == "baseline" else {
        "branch_0", "branch_1", "branch_2", "ensemble", "mean_branch"}
    assert heads <= set(r["top1"]), r
    assert all(0.0 <= r["top1"][h] <= 100.0 for h in heads), r
  table = (out / "results.md").read_text()
  runs_table, gains = table.split("\n\n| implementation |")
  assert [line.split("|")[1].strip() for line in gains.splitlines()[2:]] == ["pytorch", "one_jax"]
  assert table in proc.stdout
  # Every record is a run of the report, which makes the first table.
  records = sorted(str(p) for p in out.glob("*-seed0"))
  assert len(records) == 4
  reported = subprocess.run([sys.executable, "-m", "one_jax.report", *records], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
  assert reported.returncode == 0, reported.stderr
  assert set(reported.stdout.splitlines()) == set((runs_table + "\n").splitlines())
  implementations = [line.split("|")[8].strip() for line in runs_table.splitlines()[2:6]]
  assert sorted(implementations) == ["one_jax", "one_jax", "pytorch", "pytorch"]
  pytorch_one = next(r for r in rows if r["implementation"] == "pytorch" and r["model"] == "one")
  assert f"{pytorch_one['top1']['ensemble']:.2f} (1)" in runs_table
  # A rerun reuses every finished run (nothing is trained again).
  again = _measure(*args)
  assert again.returncode == 0 and "training" not in again.stdout
  assert (out / "results.md").read_text() == table


def test_measure_gain_rejects_bad_arguments_without_writing(tmp_path):
  out = tmp_path / "out"
  proc = _measure(f"--npz={tmp_path / 'missing.npz'}", f"--out_dir={out}")
  assert proc.returncode == 1
  assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
  npz = _tiny_npz(tmp_path / "tiny.npz")
  proc = _measure(f"--npz={npz}", f"--out_dir={out}", "--implementations=tensorflow")
  assert proc.returncode == 1 and "one_jax" in proc.stderr
  assert not out.exists()


def test_pytorch_trainer_resumes_identically(tmp_path):
  """A run stopped after epoch 1 and continued from its checkpoint ends where a straight run
  does: same weights, optimizer and RNG draws, hence the same test accuracies and step count."""
  npz = _tiny_npz(tmp_path / "tiny.npz")
  common = [f"--npz={npz}", "--model=one", "--depth=8", "--batch=16", "--steps_per_epoch=2",
            "--milestones=1", "--threads=1", "--seed=3"]

  def train(epochs, out, checkpoint=""):
    args = common + [f"--epochs={epochs}", f"--out={out}"] + (
        [f"--checkpoint={checkpoint}"] if checkpoint else [])
    return _torch_train(*args), json.loads((tmp_path / out).read_text())

  _, straight = train(2, tmp_path / "straight.json")
  checkpoint = str(tmp_path / "resume.pt")
  train(1, tmp_path / "first.json", checkpoint)           # stops after epoch 1
  log, resumed = train(2, tmp_path / "resumed.json", checkpoint)
  assert "resuming from" in log and "after epoch 1" in log
  assert resumed["steps"] == straight["steps"] == 4
  assert resumed["top1"] == straight["top1"]
  assert resumed["weights_l1"] == straight["weights_l1"]


def test_pytorch_trainer_drop_last_skips_the_partial_batch(tmp_path):
  """64 examples in batches of 48: the reference trains on the last 16 too (2 steps an epoch);
  --drop_last skips them as one_jax does (1 step)."""
  npz = _tiny_npz(tmp_path / "tiny.npz")
  steps = {}
  for flag in ([], ["--drop_last"]):
    out = tmp_path / f"result{len(flag)}.json"
    _torch_train(f"--npz={npz}", "--model=baseline", "--depth=8", "--batch=48", "--epochs=1",
                 "--milestones=1", "--threads=1", f"--out={out}", *flag)
    result = json.loads(out.read_text())
    assert result["drop_last"] == bool(flag)
    steps[bool(flag)] = result["steps"]
  assert steps == {False: 2, True: 1}


METHODS_SCRIPT = os.path.join(REPO, "benchmarks", "methods", "measure_methods.py")


def test_methods_table_trains_what_is_not_recorded_and_reports_the_deployed_heads(tmp_path):
  """benchmarks/methods/measure_methods.py: the baseline recorded once (as the fidelity record
  holds it) is reused; CL-ILR is trained; the table is the report's, then the paired gains."""
  npz = _tiny_npz(tmp_path / "tiny.npz")
  recipe = [f"--npz={npz}", "--seeds=0", "--depth=8", "--epochs=2", "--batch=16",
            "--steps_per_epoch=2", "--milestones=1"]

  def measure(*args):
    return subprocess.run([sys.executable, METHODS_SCRIPT, *recipe, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=900)

  first = measure("--methods=baseline", f"--out_dir={tmp_path / 'recorded'}")
  assert first.returncode == 0, first.stderr[-3000:]
  out = tmp_path / "methods"
  proc = measure("--methods=baseline,cl_ilr", f"--out_dir={out}",
                 f"--reuse={tmp_path / 'recorded'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "training cl_ilr, seed 0" in proc.stdout and "training baseline" not in proc.stdout
  assert not (out / "one_jax-baseline-seed0").exists()
  table = (out / "results.md").read_text()
  assert table in proc.stdout
  runs_table, summary = table.split("\n\n| method |")
  assert "| three_branch | one_resnet | cl_ilr |" in runs_table
  rows = {line.split("|")[1].strip(): line.split("|")[3].strip()
          for line in summary.splitlines()[2:]}
  assert rows == {"baseline": "model", "cl_ilr": "peers_mean"}
  top1 = json.loads((out / "one_jax-cl_ilr-seed0" / "top1.json").read_text())
  assert f"| {top1['peers_mean']:.2f} (" in summary
  bad = measure("--methods=one,okdd", f"--out_dir={tmp_path / 'bad'}")
  assert bad.returncode == 1 and bad.stderr.startswith("error: --methods=")
  assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()

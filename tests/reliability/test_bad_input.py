"""Bad input of every command: one line, a non-zero exit, and every file as it was.

Faults are injected into real `python -m one_jax.main` processes (tests/fault_injection.py).
"""
import concurrent.futures
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from one_jax import surgery as surgery_ops
from one_jax.storage import checkpoints

from tests.reliability import runs


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
  existing = runs.copy_run(reference_run, tmp_path, "existing")
  a_file = tmp_path / "a_file"
  a_file.write_text("not a directory")
  empty_cwd = tmp_path / "cwd"
  empty_cwd.mkdir()
  npz = {name: runs.bad_npz(tmp_path / f"{name}.npz", **changes) for name, changes in {
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
  orphan = runs.copy_run(reference_run, tmp_path, "orphan")
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
  bench = [sys.executable, "-m", "one_jax.bench", f"--config={runs.STEP1}:baseline,smoke", "--steps=1"]
  step2 = os.path.join(runs.ROOT, "configs", "step2.py")
  smoke_new = runs.SMOKE + [f"--workdir={new}"]
  # (name, command, expected text of the one-line error, paths that must not change, devices)
  cases = [
      ("unknown variant", main + [f"--config={runs.STEP1}:seven_branch", f"--workdir={new}"],
       "unknown config variant 'seven_branch': use one of", [new], 1),
      ("unknown option", main + [f"--config={runs.STEP1}:baseline,smok", f"--workdir={new}"],
       "unknown config option(s) smok", [new], 1),
      ("missing config file", main + ["--config=configs/nope.py:baseline", f"--workdir={new}"],
       "config file configs/nope.py does not exist", [new], 1),
      ("unknown field", main + smoke_new + ["--config.lrr=0.1"],
       "unknown config field --config.lrr: did you mean --config.lr?", [new], 1),
      ("wrong type", main + smoke_new + ["--config.depth=abc"],
       "flag --config.depth=abc: invalid literal for int()", [new], 1),
      ("wrong tuple", main + smoke_new + ["--config.milestones=abc"],
       "milestones=('abc',) is invalid", [new], 1),
      ("bad depth, default workdir", main + runs.SMOKE + ["--config.depth=10"],
       "depth=10 is not a CIFAR ResNet depth: use 6n+2", [str(empty_cwd)], 1),
      ("no branches", main + [f"--config={runs.STEP1}:three_branch,smoke", f"--workdir={new}",
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
      ("init_from other model", main + [f"--config={runs.STEP1}:three_branch,smoke", f"--workdir={new}",
                                        f"--config.init_from={existing}"],
       "does not fit this config's model", [new, existing], 1),
      ("workdir is a file", main + runs.SMOKE + [f"--workdir={a_file}"],
       f"--workdir={a_file} is a file", [str(a_file)], 1),
      ("workdir of another config", main + runs.SMOKE + [f"--workdir={existing}", "--config.lr=0.1",
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
      ("temperature 0", main + [f"--config={runs.STEP1}:three_branch,smoke", f"--workdir={new}",
                                "--config.temperature=0"],
       "temperature=0.0 is invalid: it must be > 0", [new], 1),
      ("TFDS data not prepared, offline", main + [f"--config={runs.STEP1}:baseline",
                                                  f"--workdir={new}",
                                                  f"--config.data_dir={tmp_path}/tfds"],
       "or train on a local file with --config.npz_path=FILE.npz", [new], 1),
      ("TFDS download forbidden", main + [f"--config={runs.STEP1}:baseline", f"--workdir={new}",
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
      ("finished run whose checkpoints were deleted", main + runs.SMOKE + [f"--workdir={orphan}"],
       "holds an earlier run (config.json, metrics.csv, metrics.jsonl, summary.txt, curves.png) "
       "but no checkpoint to resume from", [orphan], 1),
      ("workdir of the user with metrics files", main + runs.SMOKE + [f"--workdir={user_dir}"],
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
      ("bench: unknown variant", bench[:3] + [f"--config={runs.STEP1}:nine_branch"],
       "unknown config variant 'nine_branch'", [], 1),
      ("bench: unknown flag", bench + ["--stepz=1"], "Unknown command line flag 'stepz'", [], 1),
      ("bench: bad value", bench + ["--steps=ten"], "flag --steps=ten: invalid literal", [], 1),
  ]
  assert [c[0] for c in cases] == list(BAD_INPUT_CASES)  # one test id per row, in order
  # The cases run 4 at a time: each gets its own new workdir (a run's lock is per workdir).
  cases = [(name, [a.replace(new, f"{new}-{i}") for a in command], expected,
            [p.replace(new, f"{new}-{i}") for p in paths], devices)
           for i, (name, command, expected, paths, devices) in enumerate(cases)]
  before = {p: runs.snapshot(p) for case in cases for p in case[3]}
  before[str(empty_cwd)] = runs.snapshot(str(empty_cwd))

  def run(case):
    name, command, _, _, devices = case
    cwd = str(empty_cwd) if "default workdir" in name else runs.ROOT
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=runs.TIMEOUT,
                          env=runs.process_env(devices))

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
      if runs.snapshot(p) != before[p]:
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

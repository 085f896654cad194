"""Every config field's check: each invalid value is refused before anything is written.

Faults are injected into real `python -m one_jax.main` processes (tests/fault_injection.py).
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from one_jax.storage import workdirs
from one_jax.training import config_checks

from tests.reliability import runs


CASES_SCRIPT = os.path.join(runs.ROOT, "tests", "cli_cases.py")
STEP2 = os.path.join(runs.ROOT, "configs", "step2.py")
STEP2_FIELDS = ("source", "sources", "surgery", "expand_mode", "expand_from", "trunk_from",
                "symmetry_noise", "symmetry_break", "reset_optimizer")
IMAGENET = os.path.join(runs.ROOT, "configs", "imagenet.py")
IMAGENET_FIELDS = ("image_size", "data_workers")


def _base_args(field):
  if field in STEP2_FIELDS:
    return [f"--config={STEP2}:three_into_five,smoke", "--config.progress_bar=False"]
  if field in IMAGENET_FIELDS:
    return [f"--config={IMAGENET}:resnet18_one,smoke", "--config.progress_bar=False"]
  return [f"--config={runs.STEP1}:three_branch,smoke", "--config.progress_bar=False"]


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
                        cwd=str(cwd), capture_output=True, text=True, timeout=runs.TIMEOUT,
                        env=runs.process_env(PYTHONPATH=runs.ROOT))
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
  assert plain == {"npz_path", "data_dir", "init_from", "variant", "source", "sources",
                   "compilation_cache_dir"}   # an unusable cache directory is a warning


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
  runs.bad_npz(here / "data.npz")
  runs.bad_npz(there / "data.npz", y_train=np.zeros(64, np.int64))
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
  runs.bad_npz(here / "data.npz", y_train=np.ones(64, np.int64))
  with pytest.raises(ValueError, match="is not the file this run trained on"):
    workdirs.check_config(config, workdir)

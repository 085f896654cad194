"""The persistent compilation cache: on by default, shared by runs and benchmarks, never fatal."""
import json
import os
import subprocess
import sys

import jax

from one_jax.training import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_auto_is_the_jax_variable_else_the_user_cache(monkeypatch):
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/somewhere/xla")
  assert compile_cache.resolve("auto") == "/somewhere/xla"
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  assert compile_cache.resolve("auto") == os.path.expanduser("~/.cache/one_jax/xla")
  assert compile_cache.resolve("") == ""
  assert compile_cache.resolve("rel/dir") == os.path.abspath("rel/dir")


def test_an_unusable_directory_is_a_warning_and_no_cache(tmp_path, capsys):
  before = jax.config.jax_compilation_cache_dir
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  try:
    assert compile_cache.enable(str(blocker / "xla")) is None
    err = capsys.readouterr().err
    assert err.startswith("warning: compilation cache ") and "compiling without it" in err
    assert err.count("\n") == 1
    assert jax.config.jax_compilation_cache_dir is None
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return env


def test_a_second_benchmark_process_loads_the_step_from_the_cache(tmp_path):
  cache = str(tmp_path / "xla")
  command = [sys.executable, "-m", "one_jax.bench", "--config=configs/step1.py:baseline,smoke",
             "--batch=8", "--steps=1", "--warmup=0", "--noeval",
             f"--config.compilation_cache_dir={cache}"]
  results = []
  for _ in range(2):
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=_env())
    assert done.returncode == 0, done.stderr
    results.append(json.loads(done.stdout.strip().splitlines()[-1]))
  assert [r["compile_cache"] for r in results] == ["miss", "hit"]
  assert os.listdir(cache)
  off = subprocess.run(command[:-1] + ["--config.compilation_cache_dir="], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=_env())
  assert off.returncode == 0, off.stderr
  assert json.loads(off.stdout.strip().splitlines()[-1])["compile_cache"] == "off"


def test_a_run_says_where_its_step_came_from(tmp_path):
  cache = str(tmp_path / "xla")
  lines = []
  for i in range(2):
    done = subprocess.run(
        [sys.executable, "-m", "one_jax.main", "--config=configs/step1.py:baseline,smoke",
         "--config.progress_bar=False", "--config.num_epochs=1", f"--workdir={tmp_path}/run{i}",
         f"--config.compilation_cache_dir={cache}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())
    assert done.returncode == 0, done.stderr
    lines.append([l for l in done.stdout.splitlines() if l.startswith("train step: ")])
  assert lines[0][0].startswith("train step: compiled (now cached), first dispatch ")
  assert lines[1][0].startswith("train step: from the compilation cache, first dispatch ")

"""benchmarks/gpu_bench.py end to end on the CPU at tiny sizes: both frameworks' rows, JSON
lines and the table (so that it is known to work before it meets a GPU)."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_bench_runs_end_to_end_on_cpu():
  pytest.importorskip("torch")
  cmd = [sys.executable, "benchmarks/gpu_bench.py", "--branches=1", "--batches=8", "--depth=8",
         "--num_classes=10", "--steps=2", "--steps_per_dispatch=2", "--torch_modes=nchw,amp_cl",
         "--jax_setups=bfloat16:vmap:2"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert [(r["framework"], r.get("compute_dtype"), r.get("mode")) for r in rows] == [
      ("one_jax", "bfloat16", None), ("torch", None, "nchw"), ("torch", None, "amp_cl")]
  assert all(r["images_per_sec"] > 0 and r["backend"] == "cpu" for r in rows)
  assert "| one_jax bfloat16 vmap k=2 |" in proc.stdout
  assert "| PyTorch eager autocast bf16 channels_last |" in proc.stdout


def test_gpu_bench_default_grid():
  """The default grid, read in its own process: the script defines absl flags at import, which
  would clash with another benchmark's flags imported into this test process."""
  code = ("import gpu_bench; rows = gpu_bench.jax_setups([1, 3, 5], [128, 512], 10, "
          "full_grid=False); import json; print(json.dumps(rows))")
  path = os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])
  proc = subprocess.run([sys.executable, "-c", code], cwd=os.path.join(REPO, "benchmarks"),
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [tuple(row) for row in json.loads(proc.stdout.strip().splitlines()[-1])]
  assert len(rows) == 8 + 5 * 2   # every combination at B = 3, batch 128; the two best elsewhere
  assert (3, 128, "bfloat16", "loop", 1) in rows and (5, 512, "bfloat16", "vmap", 10) in rows

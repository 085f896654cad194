"""`python -m one_jax.bench` runs the real train and eval steps and prints one JSON line."""
import json
import math
import os
import subprocess
import sys

import jax
import pytest

from one_jax import bench
from one_jax.architectures import model_spec

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIELDS = ("images_per_sec", "eval_images_per_sec", "step_ms", "eval_step_ms", "compile_s",
          "backend", "device_kind", "device_count", "flops_per_image", "gflops_per_sec",
          "model", "depth", "num_branches", "num_classes", "batch", "branch_impl",
          "cpu_conv_library", "conv_impl", "compute_dtype", "loss", "num_params",
          "forward_flops_per_image", "image_size", "steps_per_dispatch", "data_placement",
          "step_memory_mb")


def test_bench_command_prints_json():
  """In bfloat16 (float32 is timed by the other benchmark tests): the CPU runs XLA's
  convolutions, the compiled kernels being float32 only."""
  cmd = [sys.executable, "-m", "one_jax.bench", "--config=configs/step1.py:three_branch,smoke",
         "--steps=4", "--warmup=0", "--batch=8", "--config.compute_dtype=bfloat16",
         "--config.steps_per_dispatch=2"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [l for l in proc.stdout.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stdout
  result = json.loads(lines[0])
  for field in FIELDS:
    assert field in result, field
  assert result["backend"] == "cpu"
  assert result["cpu_conv_library"] == "eigen"  # 'auto' on CPU
  assert (result["compute_dtype"], result["conv_impl"]) == ("bfloat16", "xla")
  assert result["device_count"] == jax.device_count()
  assert (result["depth"], result["num_branches"], result["batch"]) == (8, 3, 8)
  assert result["method"] == "one"
  # Every parameter of the timed model: trunk, 3 branches and gate of ONE-ResNet-8 (10 classes).
  assert result["num_params"] == model_spec.ModelSpec("one_resnet", 8, 10, 3).num_params()
  for field in ("images_per_sec", "eval_images_per_sec", "step_ms", "compile_s",
                "flops_per_image", "gflops_per_sec", "forward_flops_per_image", "step_memory_mb"):
    assert result[field] > 0 and math.isfinite(result[field]), field
  # images/s and step time describe the same median step.
  assert result["images_per_sec"] == pytest.approx(8 / (result["step_ms"] / 1e3), rel=1e-6)
  assert math.isfinite(result["loss"])
  # The loop's own step: 2 train steps per call, the synthetic set on the device ('auto').
  assert (result["steps_per_dispatch"], result["data_placement"]) == (2, "device")


def test_bench_times_host_batches_when_the_data_stays_on_the_host():
  from configs import step1  # pylint: disable=g-import-not-at-top
  config = step1.get_config("three_branch,smoke")
  config.data_on_device = "false"
  result = bench.run_benchmark(config, steps=1, warmup=0, batch=8, eval_too=False)
  assert (result["data_placement"], result["steps_per_dispatch"]) == ("host", 1)
  assert result["images_per_sec"] > 0 and math.isfinite(result["loss"])


def test_bench_times_the_configured_method():
  """--config.method picks the step's method: CL-ILR's model is ONE's without the gate."""
  from configs import step1  # pylint: disable=g-import-not-at-top
  config = step1.get_config("three_branch,smoke")
  config.method = "cl_ilr"
  result = bench.run_benchmark(config, steps=1, warmup=0, batch=8, eval_too=False)
  assert result["method"] == "cl_ilr" and math.isfinite(result["loss"])
  assert result["num_params"] == model_spec.ModelSpec(
      "one_resnet", 8, 10, 3, method="cl_ilr").num_params()
  assert result["num_params"] < model_spec.ModelSpec("one_resnet", 8, 10, 3).num_params()


def test_bench_counts_every_view_of_a_pcl_step():
  """PCL's step runs the trunk on a view per peer and the temporal mean's forward pass: its
  FLOPs and memory are well above ONE's (the views are in the counted step, not one image)."""
  from configs import step1  # pylint: disable=g-import-not-at-top
  results = {}
  for method in ("one", "pcl"):
    config = step1.get_config("three_branch,smoke")
    config.method = method
    results[method] = bench.run_benchmark(config, steps=1, warmup=0, batch=8, eval_too=False)
  assert results["pcl"]["flops_per_image"] > 2 * results["one"]["flops_per_image"]
  assert results["pcl"]["step_memory_mb"] > results["one"]["step_memory_mb"]


def test_image_size_follows_the_config():
  from configs import imagenet, step1  # pylint: disable=g-import-not-at-top
  assert bench.image_shape(step1.get_config("three_branch")) == (32, 32, 3)
  assert bench.image_shape(imagenet.get_config("resnet18_one")) == (224, 224, 3)
  assert bench.image_shape(imagenet.get_config("resnet18_one,smoke")) == (32, 32, 3)


def test_bad_arguments_fail_clearly():
  with pytest.raises(ValueError, match="steps=0"):
    bench.run_benchmark(None, steps=0)
  with pytest.raises(ValueError, match="batch=0"):
    bench.run_benchmark(None, batch=0)


def test_torch_vs_jax_script_runs_both_and_reports_ratios():
  """benchmarks/torch_vs_jax.py end to end on a tiny model: PyTorch in its child process,
  one_jax here, one JSON line per branch count and the summary table."""
  import json
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = subprocess.run(
      [sys.executable, "benchmarks/torch_vs_jax.py", "--config=configs/step1.py:three_branch",
       "--config.depth=8", "--branches=1,2", "--steps=2", "--warmup=1", "--batch=8",
       "--num_classes=10", "--pause=0"],
      cwd=root, check=True, capture_output=True, text=True, timeout=600).stdout
  results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  assert [r["num_branches"] for r in results] == [1, 2]
  for r in results:
    assert r["batch"] == 8 and r["depth"] == 8 and r["reuse_host_memory"] is True
    assert r["torch_step_ms"] > 0 and r["jax_step_ms"] > 0 and r["jax_compute_dtype"] == "float32"
    # PyTorch at its best: both memory formats timed, the speedup against the faster one.
    modes = {"nchw": r["torch_nchw_images_per_sec"],
             "channels_last": r["torch_channels_last_images_per_sec"]}
    assert r["torch_best_mode"] == max(modes, key=modes.get)
    assert r["torch_images_per_sec"] == max(modes.values())
    assert r["speedup"] == pytest.approx(min(r["speedup_vs_nchw"], r["speedup_vs_channels_last"]))
    assert r["jax_data_placement"] == "device" and r["jax_steps_per_dispatch"] == 1
    assert abs(r["speedup"] - r["torch_step_ms"] / r["jax_step_ms"]) < 1e-9
  assert "| 2 |" in out and "time(B=2) / time(B=1)" in out


def test_host_overhead_script_compares_dispatch_sizes():
  """benchmarks/host_overhead.py end to end: the real loop at k = 1 and 2, the compiled floor."""
  out = subprocess.run(
      [sys.executable, "benchmarks/host_overhead.py", "--steps=4", "--ks=1,2"],
      cwd=REPO, check=True, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")).stdout
  rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  assert [r["steps_per_dispatch"] for r in rows] == [1, 2]
  for r in rows:
    assert r["loop_step_ms"] > 0 and r["compute_step_ms"] > 0 and r["host_step_ms"] >= 0
    assert r["host_step_ms"] == pytest.approx(max(r["loop_step_ms"] - r["compute_step_ms"], 0))
  assert "| steps per dispatch |" in out


def test_the_flop_counts_are_kept_and_read_back_without_lowering(tmp_path, monkeypatch):
  """A warm start reads bench's FLOP counts (a lowering of the whole step each) from beside
  its programs; a damaged file is counted again."""
  from configs import step1  # pylint: disable=g-import-not-at-top
  from one_jax import parallel  # pylint: disable=g-import-not-at-top
  from one_jax.training import optimizer, train_state  # pylint: disable=g-import-not-at-top
  config = step1.get_config("three_branch,smoke")
  mesh = parallel.make_mesh(jax.devices()[:1])
  spec = model_spec.ModelSpec.from_config(config)
  tx = optimizer.create_optimizer(config, bench.STEPS_PER_EPOCH,
                                  spec.abstract_variables()["params"])
  state = parallel.replicate(train_state.initial_state(spec, tx, (32, 32, 3),
                                                       jax.random.key(0)), mesh)
  batch = parallel.shard_batch({k: v for k, v in bench.synthetic_batch(config, 8).items()
                                if k != "mask"}, mesh)
  epoch = jax.numpy.float32(1.0)
  programs = str(tmp_path / "programs")

  def counts(program_dir):
    return (bench.step_flops(config, spec, tx, mesh, state, batch, epoch, program_dir),
            bench.forward_flops_per_image(spec, (32, 32, 3), program_dir))

  expected = counts(None)
  assert counts(programs) == expected and all(x > 0 for x in expected)
  kept = sorted(os.listdir(programs))
  assert len(kept) == 2 and all(n.endswith(".number.json") for n in kept)
  with monkeypatch.context() as m:   # a later start: nothing is lowered for the counts
    m.setattr(bench, "_flops", lambda lowered: pytest.fail("lowered again"))
    assert counts(programs) == expected
  with open(os.path.join(programs, kept[0]), "w") as f:
    f.write("{not json")
  assert counts(programs) == expected   # a warning, then counted and kept again
  assert counts(programs) == expected

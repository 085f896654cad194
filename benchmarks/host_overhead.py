"""What the host adds to every step: the real training loop on a tiny model, k = 1 against k = 10.

    python benchmarks/host_overhead.py [--depth=8] [--batch=8] [--steps=200] [--ks=1,10]

For each steps_per_dispatch k, `train.train_and_evaluate` trains two epochs of --steps steps
(synthetic data, ONE-3, the config's data placement) and reports the second epoch's images/s;
then `one_jax.bench.StepTimer` times the same step compiled as in the loop, on inputs already
on the device, at k = 10 (the compute floor: the host dispatches once per ten steps). The
host's time per step is the loop's step time less that floor. With a tiny model the step is
mostly host work (Python dispatch, batches or plans, the non-finite check), which is what
steps_per_dispatch exists to amortise. Prints one JSON line per k and a table.
"""
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402

from configs import step1  # noqa: E402
from one_jax import bench# noqa: E402
from one_jax.cpu import host_memory  # noqa: E402
from one_jax.training import train

_DEPTH = flags.DEFINE_integer("depth", 8, "ResNet depth (6n + 2).")
_BATCH = flags.DEFINE_integer("batch", 8, "Global batch size.")
_STEPS = flags.DEFINE_integer("steps", 200, "Steps per epoch (two epochs are trained).")
_KS = flags.DEFINE_list("ks", ["1", "10"], "steps_per_dispatch values to compare.")
FLOOR_K = 10


def tiny_config(k: int):
  c = step1.get_config("three_branch,smoke")
  c.depth, c.batch_size, c.steps_per_dispatch = _DEPTH.value, _BATCH.value, k
  c.synthetic_train_size, c.synthetic_test_size = _STEPS.value * _BATCH.value, _BATCH.value
  c.num_epochs, c.progress_bar, c.steps_per_epoch = 2, False, -1   # whole epochs
  return c


def loop_step_seconds(k: int) -> float:
  """Seconds per step of the real loop's second epoch (compiled, warm)."""
  with tempfile.TemporaryDirectory() as workdir:
    metrics = train.train_and_evaluate(tiny_config(k), workdir)
  return _BATCH.value / metrics["train_images_per_sec"]


def compute_step_seconds() -> float:
  """Seconds per step of the loop's compiled step at k = FLOOR_K, inputs on the device."""
  timer = bench.StepTimer(tiny_config(FLOOR_K), with_eval=False)
  times = bench.time_calls(timer.train_once, 12)
  return statistics.median(times[2:]) / FLOOR_K


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  host_memory.apply_for_cpu(True)
  floor = compute_step_seconds()
  rows = []
  for k in [int(x) for x in _KS.value]:
    step = loop_step_seconds(k)
    rows.append(dict(steps_per_dispatch=k, loop_step_ms=1e3 * step, compute_step_ms=1e3 * floor,
                     host_step_ms=1e3 * max(step - floor, 0.0), depth=_DEPTH.value,
                     batch=_BATCH.value, backend=jax.default_backend(), when=time.ctime()))
    print(json.dumps(rows[-1]), flush=True)
  print(f"\nONE-ResNet{_DEPTH.value} (3 branches), batch {_BATCH.value}, "
        f"{jax.devices()[0].device_kind} ({jax.default_backend()})")
  print("| steps per dispatch | loop ms/step | compiled step ms/step | host ms/step |")
  print("|---|---|---|---|")
  for r in rows:
    print(f"| {r['steps_per_dispatch']} | {r['loop_step_ms']:.2f} | {r['compute_step_ms']:.2f} | "
          f"{r['host_step_ms']:.2f} |")
  if len(rows) > 1 and rows[-1]["host_step_ms"] > 0:
    print(f"\nhost time per step, k={rows[0]['steps_per_dispatch']} / "
          f"k={rows[-1]['steps_per_dispatch']}: "
          f"{rows[0]['host_step_ms'] / rows[-1]['host_step_ms']:.1f}x")


if __name__ == "__main__":
  app.run(main)

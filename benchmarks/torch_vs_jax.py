"""one_jax against eager PyTorch: the same ONE ResNet, ONE loss and SGD step, in one process.

    python benchmarks/torch_vs_jax.py [--branches=1,3,5] [--batch=128] [--steps=10]
        [--threads=2] [--config=configs/step1.py:three_branch] [--config.FIELD=VALUE ...]

PyTorch runs `tests/torch_reference.py` (the reference model, `one_loss` and torch.optim.SGD with
the config's momentum and weight decay) eagerly with --threads intra-op threads, in a child
process with the default memory allocator; one_jax runs the jitted train step of `one_jax.train`
(as `python -m one_jax.bench` does) in this process, with --reuse_host_memory
(one_jax/cpu/host_memory.py). Steps alternate (torch, jax, torch, jax, ...) after a warm-up, each
framework idle while the other runs, so load from other processes hits both alike.
Prints a table and one JSON line per branch count; speedup = torch step time / jax step time
(> 1: one_jax is faster).
"""
import json
import multiprocessing
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Idle OpenMP threads of PyTorch must not spin while the JAX step runs (and vice versa):
# both frameworks share the same cores here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from one_jax import bench  # noqa: E402
from one_jax.cpu import host_memory  # noqa: E402
from tests import torch_reference  # noqa: E402  (the reference lives with the tests)

# --config, --steps, --warmup and --batch are one_jax.bench's flags.
_BRANCHES = flags.DEFINE_list("branches", ["1", "3", "5"], "Branch counts to compare.")
_CLASSES = flags.DEFINE_integer("num_classes", 100, "Classes (CIFAR-100 by default).")
_THREADS = flags.DEFINE_integer("threads", 2, "torch.set_num_threads.")
_PAUSE = flags.DEFINE_float("pause", 0.1, "Untimed seconds between steps (thread pools idle).")


class TorchStep:
  """The eager reference step on a fixed synthetic batch (NCHW)."""

  def __init__(self, config, batch: dict):
    torch.manual_seed(config.seed)
    self.model = torch_reference.ONE_ResNet(config.depth, config.num_classes,
                                            config.num_branches)
    self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr,
                                     momentum=config.momentum,
                                     weight_decay=config.weight_decay)
    self.images = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2)))
    self.labels = torch.from_numpy(batch["label"].astype(np.int64))

  def train_once(self):
    return torch_reference.train_step(self.model, self.optimizer, self.images, self.labels,
                                      epoch=1.0)


def _serve_torch_steps(connection, config_dict: dict, batch: dict, threads: int):
  """The PyTorch side, in its own process: builds TorchStep, then times one step per request."""
  torch.set_num_threads(threads)
  step = TorchStep(ml_collections.ConfigDict(config_dict), batch)
  while connection.recv():
    t0 = time.perf_counter()
    float(step.train_once())  # float() waits for the result
    connection.send(time.perf_counter() - t0)


class TorchProcess:
  """TorchStep in a child process with the default allocator (PyTorch's fastest set-up here;
  one_jax/cpu/host_memory.py's setting would slow it down), driven step by step from this one."""

  def __init__(self, config, batch: dict, threads: int):
    context = multiprocessing.get_context("spawn")
    self._connection, child = context.Pipe()
    self._process = context.Process(target=_serve_torch_steps,
                                    args=(child, config.to_dict(), batch, threads), daemon=True)
    self._process.start()

  def step_seconds(self) -> float:
    self._connection.send(True)
    return self._connection.recv()

  def close(self):
    self._connection.send(False)
    self._process.join()


def compare(config, steps: int, warmup: int, pause: float = 0.1) -> dict:
  """Interleaved torch/jax train steps for one config; returns the summary fields."""
  jax_step = bench.StepTimer(config, with_eval=False)
  torch_process = TorchProcess(
      config, bench.synthetic_batch(config, config.batch_size, config.seed), _THREADS.value)

  def jax_step_seconds():
    t0 = time.perf_counter()
    float(jax_step.train_once())  # float() waits for the result
    return time.perf_counter() - t0

  runners = {"torch": torch_process.step_seconds, "jax": jax_step_seconds}
  for _ in range(warmup):
    for run in runners.values():
      run()
  times = {name: [] for name in runners}
  for _ in range(steps):
    for name, run in runners.items():
      time.sleep(pause)
      times[name].append(run())
  torch_process.close()
  t_torch, t_jax = statistics.median(times["torch"]), statistics.median(times["jax"])
  n = config.batch_size
  return dict(num_branches=config.num_branches, batch=n, depth=config.depth,
              num_classes=config.num_classes, torch_images_per_sec=n / t_torch,
              jax_images_per_sec=n / t_jax, torch_step_ms=1e3 * t_torch,
              jax_step_ms=1e3 * t_jax, speedup=t_torch / t_jax,
              jax_flops_per_step=jax_step.flops, torch_threads=_THREADS.value,
              jax_backend=jax.default_backend(), jax_device_count=jax.device_count(),
              jax_compute_dtype=jax_step.spec.compute_dtype,
              jax_min_ms=1e3 * min(times["jax"]), torch_min_ms=1e3 * min(times["torch"]),
              steps=steps)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # For one_jax (PyTorch runs in its own process).
  reused = host_memory.apply_for_cpu(bench.REUSE_HOST_MEMORY.value)
  results = []
  for b in [int(x) for x in _BRANCHES.value]:
    config = ml_collections.ConfigDict(bench._CONFIG.value.to_dict())
    config.model, config.num_branches, config.active_branches = "one_resnet", b, ""
    config.num_classes, config.batch_size = _CLASSES.value, bench._BATCH.value or 128
    result = compare(config, bench._STEPS.value, bench._WARMUP.value, _PAUSE.value)
    result["reuse_host_memory"] = reused
    results.append(result)
    print(json.dumps(result), flush=True)
  print(f"\nONE-ResNet{results[0]['depth']}, {results[0]['num_classes']} classes, batch "
        f"{results[0]['batch']}, torch {torch.__version__} ({_THREADS.value} threads) vs "
        f"jax {jax.__version__} ({jax.default_backend()}, {results[0]['jax_compute_dtype']}); medians of {bench._STEPS.value} "
        f"interleaved steps; reuse_host_memory={reused}")
  print("| B | torch img/s | one_jax img/s | speedup (torch time / jax time) |")
  print("|---|---|---|---|")
  for r in results:
    print(f"| {r['num_branches']} | {r['torch_images_per_sec']:.0f} | "
          f"{r['jax_images_per_sec']:.0f} | {r['speedup']:.2f}x |")
  by_b = {r["num_branches"]: r for r in results}
  lo, hi = min(by_b), max(by_b)
  if lo != hi:
    flop_ratio = by_b[hi]["jax_flops_per_step"] / by_b[lo]["jax_flops_per_step"]
    print(f"\ntime(B={hi}) / time(B={lo}): one_jax {by_b[hi]['jax_step_ms'] / by_b[lo]['jax_step_ms']:.2f}, "
          f"torch {by_b[hi]['torch_step_ms'] / by_b[lo]['torch_step_ms']:.2f}; "
          f"FLOP ratio {flop_ratio:.2f}")


if __name__ == "__main__":
  app.run(main)

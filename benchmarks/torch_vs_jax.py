"""one_jax against PyTorch at its best on the CPU: the same ONE ResNet, ONE loss and SGD step.

    python benchmarks/torch_vs_jax.py [--branches=1,3,5] [--batch=128] [--steps=10]
        [--threads=2] [--torch_modes=nchw,channels_last] [--config=configs/step1.py:three_branch]
        [--config.FIELD=VALUE ...]

PyTorch runs `tests/torch_reference.py` (the reference model, `one_loss` and torch.optim.SGD with
the config's momentum and weight decay) in each --torch_modes set-up (benchmarks/torch_step.py:
NCHW eager, channels_last eager, torch.compile) with --threads intra-op threads, each in a child
process with the default memory allocator; one_jax runs the training loop's jitted step (as
`python -m one_jax.bench` does: the config's steps_per_dispatch and data_on_device) in this
process, with --reuse_host_memory (one_jax/cpu/host_memory.py). Steps alternate (each PyTorch
set-up, then one_jax, ...) after a warm-up, each idle while another runs, so load from other
processes hits all alike. Prints a table and one JSON line per branch count; speedup = the
fastest PyTorch set-up's step time / one_jax's (> 1: one_jax is faster), and per set-up.
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
import torch_step  # noqa: E402  (benchmarks/, beside this script)

BENCH = bench.define_flags()   # --config, --steps, --warmup, --batch: one_jax.bench's
_BRANCHES = flags.DEFINE_list("branches", ["1", "3", "5"], "Branch counts to compare.")
_CLASSES = flags.DEFINE_integer("num_classes", 100, "Classes (CIFAR-100 by default).")
_THREADS = flags.DEFINE_integer("threads", 2, "torch.set_num_threads.")
_TORCH = flags.DEFINE_list("torch_modes", ["nchw", "channels_last"],
                           "PyTorch set-ups, benchmarks/torch_step.py's MODES ('compile' too: "
                           "slower than channels_last on a 2-core CPU, benchmarks/NOTES.md).")
_PAUSE = flags.DEFINE_float("pause", 0.1, "Untimed seconds between steps (thread pools idle).")


def _serve_torch_steps(connection, mode: str, config_dict: dict, batch: dict, threads: int):
  """One PyTorch set-up, in its own process: builds its step, then times one step per request."""
  torch.set_num_threads(threads)
  c = ml_collections.ConfigDict(config_dict)
  step = torch_step.TorchStep(mode, depth=c.depth, num_classes=c.num_classes,
                              num_branches=c.num_branches, images_nhwc=batch["image"],
                              labels=batch["label"], lr=c.lr, momentum=c.momentum,
                              weight_decay=c.weight_decay, seed=c.seed, device="cpu")
  while connection.recv():
    t0 = time.perf_counter()
    float(step.train_once())  # float() waits for the result
    connection.send(time.perf_counter() - t0)


class TorchProcess:
  """A PyTorch set-up in a child process with the default allocator (PyTorch's fastest here;
  one_jax/cpu/host_memory.py's setting would slow it down), driven step by step from this one."""

  def __init__(self, mode: str, config, batch: dict, threads: int):
    context = multiprocessing.get_context("spawn")
    self._connection, child = context.Pipe()
    self._process = context.Process(target=_serve_torch_steps,
                                    args=(child, mode, config.to_dict(), batch, threads),
                                    daemon=True)
    self._process.start()

  def step_seconds(self) -> float:
    self._connection.send(True)
    return self._connection.recv()

  def close(self):
    self._connection.send(False)
    self._process.join()


def compare(config, steps: int, warmup: int, torch_modes, pause: float = 0.1) -> dict:
  """Interleaved train steps of every PyTorch set-up and one_jax for one config; returns the
  summary fields. speedup: the fastest PyTorch set-up's step time / one_jax's."""
  jax_step = bench.StepTimer(config, with_eval=False)
  batch = bench.synthetic_batch(config, config.batch_size, config.seed)
  processes = {m: TorchProcess(m, config, batch, _THREADS.value) for m in torch_modes}

  def jax_step_seconds():
    t0 = time.perf_counter()
    float(jax_step.train_once())  # float() waits for the result
    return (time.perf_counter() - t0) / jax_step.steps_per_call

  runners = {f"torch_{m}": p.step_seconds for m, p in processes.items()}
  runners["jax"] = jax_step_seconds
  for _ in range(warmup):
    for run in runners.values():
      run()
  times = {name: [] for name in runners}
  for _ in range(steps):
    for name, run in runners.items():
      time.sleep(pause)
      times[name].append(run())
  for p in processes.values():
    p.close()
  median = {name: statistics.median(t) for name, t in times.items()}
  n = config.batch_size
  best = min(torch_modes, key=lambda m: median[f"torch_{m}"])
  t_torch, t_jax = median[f"torch_{best}"], median["jax"]
  result = dict(num_branches=config.num_branches, batch=n, depth=config.depth,
                num_classes=config.num_classes, torch_best_mode=best,
                torch_images_per_sec=n / t_torch, jax_images_per_sec=n / t_jax,
                torch_step_ms=1e3 * t_torch, jax_step_ms=1e3 * t_jax, speedup=t_torch / t_jax,
                jax_flops_per_step=jax_step.flops, torch_threads=_THREADS.value,
                jax_backend=jax.default_backend(), jax_device_count=jax.device_count(),
                jax_compute_dtype=jax_step.spec.compute_dtype,
                jax_steps_per_dispatch=jax_step.steps_per_call,
                jax_data_placement=jax_step.placement,
                jax_min_ms=1e3 * min(times["jax"]), steps=steps)
  for m in torch_modes:
    result[f"torch_{m}_images_per_sec"] = n / median[f"torch_{m}"]
    result[f"speedup_vs_{m}"] = median[f"torch_{m}"] / t_jax
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # For one_jax (PyTorch runs in its own process).
  reused = host_memory.apply_for_cpu(BENCH.reuse_host_memory.value)
  try:
    modes = torch_step.check_modes([m for m in _TORCH.value if m])
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if not modes:
    raise app.UsageError("--torch_modes is empty: give at least one, e.g. nchw,channels_last")
  results = []
  for b in [int(x) for x in _BRANCHES.value]:
    config = ml_collections.ConfigDict(BENCH.config.value.to_dict())
    config.model, config.num_branches, config.active_branches = "one_resnet", b, ""
    config.num_classes, config.batch_size = _CLASSES.value, BENCH.batch.value or 128
    result = compare(config, BENCH.steps.value, BENCH.warmup.value, modes, _PAUSE.value)
    result["reuse_host_memory"] = reused
    results.append(result)
    print(json.dumps(result), flush=True)
  print(f"\nONE-ResNet{results[0]['depth']}, {results[0]['num_classes']} classes, batch "
        f"{results[0]['batch']}, torch {torch.__version__} ({_THREADS.value} threads) vs "
        f"jax {jax.__version__} ({jax.default_backend()}, {results[0]['jax_compute_dtype']}); medians of {BENCH.steps.value} "
        f"interleaved steps; reuse_host_memory={reused}")
  print("| B | " + " | ".join(f"{torch_step.NAMES[m]} img/s" for m in modes) +
        " | one_jax img/s | speedup vs the fastest PyTorch (its time / one_jax's) |")
  print("|---|" + "---|" * (len(modes) + 2))
  for r in results:
    cells = [f"{r[f'torch_{m}_images_per_sec']:.0f}" for m in modes]
    print(f"| {r['num_branches']} | " + " | ".join(cells) +
          f" | {r['jax_images_per_sec']:.0f} | {r['speedup']:.2f}x ({r['torch_best_mode']}) |")
  by_b = {r["num_branches"]: r for r in results}
  lo, hi = min(by_b), max(by_b)
  if lo != hi:
    flop_ratio = by_b[hi]["jax_flops_per_step"] / by_b[lo]["jax_flops_per_step"]
    print(f"\ntime(B={hi}) / time(B={lo}): one_jax {by_b[hi]['jax_step_ms'] / by_b[lo]['jax_step_ms']:.2f}, "
          f"torch {by_b[hi]['torch_step_ms'] / by_b[lo]['torch_step_ms']:.2f}; "
          f"FLOP ratio {flop_ratio:.2f}")


if __name__ == "__main__":
  app.run(main)

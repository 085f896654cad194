"""one_jax against PyTorch on one accelerator: train images/s of ONE-ResNet32 set-ups, one run.

    python benchmarks/gpu_bench.py [--branches=1,3,5] [--batches=128,512] [--steps=20]
        [--depth=32] [--num_classes=100] [--budget_s=330] [--torch_modes=nchw,amp_cl,amp_compile]

one_jax side: the real loop's dispatch step (`steps.make_dispatch_step`) with the synthetic train
set on the device (`data_on_device`: gathered, cropped, flipped and normalised in the step
from the host pipeline's draws), for compute_dtype float32 / bfloat16, branch_impl loop / vmap
and steps_per_dispatch 1 / 10. Every (B, batch) gets the two float32/bfloat16 vmap set-ups at
k = 10; B = 3 at the first batch size gets every combination (--full_grid for all).
PyTorch side (benchmarks/torch_step.py: tests/torch_reference.py's model, loss and SGD, on CUDA
when there is one, else the CPU): by default 'nchw' eager float32, 'amp_cl' autocast bfloat16
with channels_last model and input, and 'amp_compile' torch.compile of that (the fastest
PyTorch set-ups on accelerators), on a fixed batch already on the device (PyTorch gets no input
pipeline cost).

Rows are timed in order until --budget_s seconds have passed (compilation included); later
rows are printed as skipped, so a run stays within its time (the defaults fit 6 minutes on one
GPU). Prints one JSON line per row, then one table. images/s = images per median step time.
"""
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import step1  # noqa: E402
from one_jax import bench  # noqa: E402
import torch_step  # noqa: E402  (benchmarks/, beside this script)

_BRANCHES = flags.DEFINE_list("branches", ["1", "3", "5"], "Branch counts.")
_BATCHES = flags.DEFINE_list("batches", ["128", "512"], "Global batch sizes.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed train steps per row (rounded up to whole "
                              "dispatches).")
_DEPTH = flags.DEFINE_integer("depth", 32, "ResNet depth (6n + 2).")
_CLASSES = flags.DEFINE_integer("num_classes", 100, "Classes.")
_BUDGET = flags.DEFINE_float("budget_s", 330.0, "Stop starting rows after this many seconds.")
_TORCH = flags.DEFINE_list("torch_modes", ["nchw", "amp_cl", "amp_compile"],
                           "PyTorch set-ups ('' for none), benchmarks/torch_step.py's MODES.")
_FULL = flags.DEFINE_bool("full_grid", False, "Every one_jax combination for every (B, batch).")
_DISPATCH = flags.DEFINE_integer("steps_per_dispatch", 10, "k of the multi-step set-ups.")
_SETUPS = flags.DEFINE_list("jax_setups", [], "Instead of the grid: DTYPE:IMPL:K set-ups for "
                            "every (B, batch), e.g. bfloat16:vmap:10,float32:loop:1.")

JAX_BEST = (("float32", "vmap"), ("bfloat16", "vmap"))


def jax_setups(branches, batches, k, full_grid, explicit=()):
  """[(B, batch, dtype, branch_impl, steps_per_dispatch)] in the order they are timed."""
  if explicit:
    parsed = []
    for text in explicit:
      parts = text.split(":")
      if len(parts) != 3 or parts[0] not in ("float32", "bfloat16") or parts[1] not in (
          "loop", "vmap") or not parts[2].isdigit() or int(parts[2]) < 1:
        raise app.UsageError(f"--jax_setups entry {text!r} is invalid: use DTYPE:IMPL:K, e.g. "
                             "bfloat16:vmap:10")
      parsed.append((parts[0], parts[1], int(parts[2])))
    return [(b, n) + p for b in branches for n in batches for p in parsed]
  grid = [(d, i, s) for d in ("float32", "bfloat16") for i in ("loop", "vmap") for s in (1, k)]
  rows = []
  for b in branches:
    for n in batches:
      full = full_grid or (b == 3 and n == batches[0]) or (3 not in branches and b == branches[0]
                                                           and n == batches[0])
      rows += [(b, n) + g for g in (grid if full else [(d, i, k) for d, i in JAX_BEST])]
  return rows


def _config(b, batch, dtype, branch_impl, k):
  c = step1.get_config("three_branch")
  c.num_branches, c.depth, c.num_classes, c.batch_size = b, _DEPTH.value, _CLASSES.value, batch
  c.branch_impl, c.steps_per_dispatch, c.data_on_device = branch_impl, k, "true"
  if "compute_dtype" in c:
    c.compute_dtype = dtype
  elif dtype != "float32":
    raise ValueError("this one_jax has no compute_dtype: use float32 only")
  c.dataset, c.synthetic_train_size, c.synthetic_test_size = "synthetic", 2 * k * batch, 8
  return c


def time_jax(b, batch, dtype, branch_impl, k, steps):
  """images/s of the loop's dispatch step (one_jax.bench.StepTimer: median dispatch time / k
  steps), and the compile time."""
  timer = bench.StepTimer(_config(b, batch, dtype, branch_impl, k), with_eval=False)
  times = bench.time_calls(timer.train_once, max(1, -(-steps // k)) + 1)   # one warm-up call
  loss = timer.mean_loss()
  if not np.isfinite(loss):
    raise FloatingPointError(f"non-finite loss in {dtype} B={b} batch={batch}")
  return k * batch / statistics.median(times[1:]), timer.compile_s


def time_torch(b, batch, mode, steps):
  """images/s of the reference PyTorch step in one set-up (torch_step), and its first-step
  time."""
  rng = np.random.default_rng(0)
  step = torch_step.TorchStep(
      mode, depth=_DEPTH.value, num_classes=_CLASSES.value, num_branches=b,
      images_nhwc=rng.standard_normal((batch, 32, 32, 3), dtype=np.float32),
      labels=rng.integers(0, _CLASSES.value, batch))

  def timed():
    t0 = time.perf_counter()
    float(step.train_once())  # waits for the device
    return time.perf_counter() - t0

  first = timed()
  timed()
  times = [timed() for _ in range(steps)]
  return batch / statistics.median(times), first


def run(branches, batches, torch_modes, steps, budget_s, k, full_grid, explicit=()):
  """Times every row within the budget; returns the rows (dicts)."""
  rows = [dict(framework="one_jax", num_branches=b, batch=n, compute_dtype=d, branch_impl=i,
               steps_per_dispatch=s, data_on_device=True)
          for b, n, d, i, s in jax_setups(branches, batches, k, full_grid, explicit)]
  rows += [dict(framework="torch", num_branches=b, batch=n, mode=m)
           for b in branches for n in batches for m in torch_modes]
  start = time.perf_counter()
  common = dict(depth=_DEPTH.value, num_classes=_CLASSES.value, backend=jax.default_backend(),
                device_kind=jax.devices()[0].device_kind, steps=steps)
  for row in rows:
    row.update(common)
    if time.perf_counter() - start > budget_s:
      row["skipped"] = f"over the {budget_s:.0f} s budget"
    elif row["framework"] == "one_jax":
      row["images_per_sec"], row["compile_s"] = time_jax(
          row["num_branches"], row["batch"], row["compute_dtype"], row["branch_impl"],
          row["steps_per_dispatch"], steps)
    else:
      row["images_per_sec"], row["compile_s"] = time_torch(row["num_branches"], row["batch"],
                                                           row["mode"], steps)
    print(json.dumps(row), flush=True)
  return rows


def table(rows) -> str:
  """One markdown table: a line per set-up, a column per (B, batch)."""
  def name(r):
    if r["framework"] == "torch":
      return torch_step.NAMES[r["mode"]]
    return f"one_jax {r['compute_dtype']} {r['branch_impl']} k={r['steps_per_dispatch']}"
  cols = sorted({(r["num_branches"], r["batch"]) for r in rows})
  names = list(dict.fromkeys(name(r) for r in rows))
  cell = {(name(r), (r["num_branches"], r["batch"])): r for r in rows}
  out = ["| train img/s | " + " | ".join(f"B={b} bs={n}" for b, n in cols) + " |",
         "|---|" + "---|" * len(cols)]
  for nm in names:
    vals = []
    for c in cols:
      r = cell.get((nm, c))
      vals.append("" if r is None else "skipped" if "skipped" in r else
                  f"{r['images_per_sec']:.0f}")
    out.append(f"| {nm} | " + " | ".join(vals) + " |")
  return "\n".join(out)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    torch_modes = torch_step.check_modes([m for m in _TORCH.value if m])
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  rows = run([int(b) for b in _BRANCHES.value], [int(n) for n in _BATCHES.value], torch_modes,
             _STEPS.value, _BUDGET.value, _DISPATCH.value, _FULL.value, _SETUPS.value)
  print(f"\nONE-ResNet{_DEPTH.value}, {_CLASSES.value} classes, {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}), jax {jax.__version__}; medians of {_STEPS.value} steps; "
        "one_jax with the train set on the device")
  print(table(rows))


if __name__ == "__main__":
  app.run(main)

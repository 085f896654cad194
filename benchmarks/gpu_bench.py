"""one_jax against PyTorch on one accelerator: train images/s of ONE-ResNet32 set-ups, one run.

    python benchmarks/gpu_bench.py [--branches=1,3,5] [--batches=128,512] [--steps=20]
        [--depth=32] [--num_classes=100] [--budget_s=330] [--torch_modes=eager,amp_cl,compile]

one_jax side: the real loop's dispatch step (`train.make_dispatch_step`) with the synthetic train
set on the device (`data_on_device`: gathered, cropped, flipped and normalised in the step
from the host pipeline's draws), for compute_dtype float32 / bfloat16, branch_impl loop / vmap
and steps_per_dispatch 1 / 10. Every (B, batch) gets the two float32/bfloat16 vmap set-ups at
k = 10; B = 3 at the first batch size gets every combination (--full_grid for all).
PyTorch side (tests/torch_reference.py, SGD, on CUDA when there is one, else the CPU):
'eager' float32, 'amp_cl' autocast bfloat16 with channels_last model and input, 'compile'
torch.compile of that model (the fastest PyTorch set-ups), on a fixed batch already on the
device (PyTorch gets no input pipeline cost).

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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import step1  # noqa: E402
from one_jax import device_data, input_pipeline, model_spec  # noqa: E402
from one_jax import optimizer, parallel, train  # noqa: E402

_BRANCHES = flags.DEFINE_list("branches", ["1", "3", "5"], "Branch counts.")
_BATCHES = flags.DEFINE_list("batches", ["128", "512"], "Global batch sizes.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed train steps per row (rounded up to whole "
                              "dispatches).")
_DEPTH = flags.DEFINE_integer("depth", 32, "ResNet depth (6n + 2).")
_CLASSES = flags.DEFINE_integer("num_classes", 100, "Classes.")
_BUDGET = flags.DEFINE_float("budget_s", 330.0, "Stop starting rows after this many seconds.")
_TORCH = flags.DEFINE_list("torch_modes", ["eager", "amp_cl", "compile"],
                           "PyTorch set-ups ('' for none): eager, amp_cl, compile.")
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
  """images/s of the dispatch step (median dispatch time / k steps), and the compile time."""
  config = _config(b, batch, dtype, branch_impl, k)
  mesh = parallel.make_mesh()
  source, _, info = input_pipeline.get_datasets(config)
  spec = model_spec.ModelSpec.from_config(config)
  tx = optimizer.create_optimizer(config, 390, spec.abstract_variables(info.image_shape)["params"])
  fresh = train.initial_state(spec, tx, info.image_shape, jax.random.key(0))
  state = parallel.replicate(fresh, mesh)
  sums = parallel.replicate(train.zero_sums(config, tx, mesh, fresh, info.image_shape), mesh)
  data = device_data.put(source, mesh)
  plans = list(input_pipeline.train_plans(len(source), global_batch=batch, seed=0, epoch=0))
  stacks = [train._stack(plans[i:i + k], mesh) for i in (0, k)]
  step = train.make_dispatch_step(config, tx, mesh, on_device=True)
  t0 = time.perf_counter()
  state, sums, _ = step(state, sums, stacks[0], jnp.float32(1), data)
  jax.block_until_ready(sums)
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(max(1, -(-steps // k)) + 1):   # one untimed warm-up dispatch
    t0 = time.perf_counter()
    state, sums, _ = step(state, sums, stacks[i % 2], jnp.float32(1), data)
    jax.block_until_ready(sums)
    times.append(time.perf_counter() - t0)
  loss = float(parallel.to_host(sums)["train/loss"])
  if not np.isfinite(loss):
    raise FloatingPointError(f"non-finite loss in {config.compute_dtype} B={b} batch={batch}")
  return k * batch / statistics.median(times[1:]), compile_s


def time_torch(b, batch, mode, steps):
  """images/s of the reference PyTorch step in one set-up, and its first-step time."""
  import torch  # pylint: disable=g-import-not-at-top  (optional: only this side needs it)
  from tests import torch_reference  # pylint: disable=g-import-not-at-top
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  model = torch_reference.ONE_ResNet(_DEPTH.value, _CLASSES.value, b).to(device)
  images = torch.randn(batch, 3, 32, 32, device=device)
  labels = torch.randint(0, _CLASSES.value, (batch,), device=device)
  if mode in ("amp_cl", "compile"):
    model = model.to(memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
  if mode == "compile":
    model = torch.compile(model)

  def step():
    if mode == "eager":
      return torch_reference.train_step(model, opt, images, labels, epoch=1.0)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
      return torch_reference.train_step(model, opt, images, labels, epoch=1.0)

  def timed():
    t0 = time.perf_counter()
    loss = step()
    float(loss)  # waits for the device
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
      return {"eager": "PyTorch eager float32", "amp_cl": "PyTorch autocast bf16 channels_last",
              "compile": "PyTorch torch.compile bf16 channels_last"}[r["mode"]]
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
  torch_modes = [m for m in _TORCH.value if m]
  unknown = set(torch_modes) - {"eager", "amp_cl", "compile"}
  if unknown:
    raise app.UsageError(f"unknown --torch_modes {sorted(unknown)}: use eager, amp_cl, compile")
  rows = run([int(b) for b in _BRANCHES.value], [int(n) for n in _BATCHES.value], torch_modes,
             _STEPS.value, _BUDGET.value, _DISPATCH.value, _FULL.value, _SETUPS.value)
  print(f"\nONE-ResNet{_DEPTH.value}, {_CLASSES.value} classes, {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}), jax {jax.__version__}; medians of {_STEPS.value} steps; "
        "one_jax with the train set on the device")
  print(table(rows))


if __name__ == "__main__":
  app.run(main)

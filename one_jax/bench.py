"""Train- and eval-step throughput, printed as one JSON line (DESIGN.md section 10).

    python -m one_jax.bench --config=configs/step1.py:three_branch [--steps=N] [--batch=N]

Times the real jitted steps of `one_jax.train` (`make_train_step`: forward, loss, backward,
SGD update, BatchNorm statistics, metrics; `make_eval_step`, on a batch of the same size) on
synthetic data already on the devices. Compilation and warm-up steps are excluded; times are
medians over --steps. FLOPs come from XLA's cost analysis of the train step (`step_flops`).

Fields: images_per_sec, eval_images_per_sec, step_ms, eval_step_ms, compile_s, backend,
device_kind, device_count, flops_per_image (train step), forward_flops_per_image (inference:
`forward_flops_per_image`), gflops_per_sec (achieved, train step), and the
model fields (model, depth, its architecture options, num_branches, num_classes, num_params:
every parameter of the timed model, batch, branch_impl, compute_dtype: 'float32' or
'bfloat16', set with --config.compute_dtype), cpu_conv_library,
conv_impl ('kernel': one_jax's compiled CPU convolutions, 'xla': XLA's), jax_version, loss,
and (from the command line) reuse_host_memory (one_jax/cpu/host_memory.py). Where
conv_impl='auto' fell back to XLA on a CPU, one line on stderr says that the kernels are off
and why (kernels.off_warning).
"""
import dataclasses
import json
import statistics
import sys
import time
from typing import Any, Dict

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from one_jax import checkpoints
from one_jax import cli
from one_jax import model_spec
from one_jax import models
from one_jax import optimizer
from one_jax import parallel
from one_jax import train
from one_jax.cpu import host_memory
from one_jax.cpu import kernels
from one_jax.cpu import xla_options

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/step1.py:three_branch", "Training config (ml_collections), e.g. "
    "configs/step1.py:five_branch; --config.FIELD=VALUE overrides fields.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_BATCH = flags.DEFINE_integer("batch", None, "Global batch size (default: the config's).")
_EVAL = flags.DEFINE_bool("eval", True, "Also time the eval (inference) step.")
REUSE_HOST_MEMORY = flags.DEFINE_bool(host_memory.FLAG_NAME, True, host_memory.FLAG_HELP)

IMAGE_SHAPE = (32, 32, 3)   # CIFAR's; a config with image_size (ImageNet: 224) sets its own


def image_shape(config) -> tuple:
  """The model input the benchmark feeds: config.image_size squared, else CIFAR's 32x32."""
  size = config.get("image_size", IMAGE_SHAPE[0])
  return (size, size, 3)


STEPS_PER_EPOCH = 390  # CIFAR: 50000 // 128; only the learning-rate schedule sees it


def _time(fn, n):
  """Seconds per call of fn (which returns something to block on), n calls."""
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return times


def _flops(lowered) -> float:
  analysis = lowered.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", float("nan")))


def step_flops(config, tx, mesh, state, batch, epoch) -> float:
  """The train step's arithmetic: XLA's cost analysis of the step written with XLA's own
  convolutions, before optimisation. Custom calls (one_jax's CPU kernels) are invisible to
  the analysis, so this counts the same work whichever implementation runs."""
  xla_config = config.copy_and_resolve_references()
  with xla_config.unlocked():
    xla_config.conv_impl = "xla"
  return _flops(train.make_train_step(xla_config, tx, mesh).lower(state, batch, epoch))


def forward_flops_per_image(spec: model_spec.ModelSpec, image_shape=IMAGE_SHAPE) -> float:
  """One image's inference arithmetic (the eval forward of every branch and the gate): XLA's
  cost analysis of the model with XLA's own convolutions, before optimisation; nothing is
  compiled or run (README's architecture table)."""
  spec = dataclasses.replace(spec, conv_impl="xla")
  model = spec.build()
  images = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
  return _flops(jax.jit(model.apply).lower(spec.abstract_variables(image_shape), images))


def synthetic_batch(config, batch_size: int, seed: int = 0) -> Dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {"image": rng.standard_normal((batch_size,) + image_shape(config), dtype=np.float32),
          "label": rng.integers(0, config.num_classes, (batch_size,)).astype(np.int32),
          "mask": np.ones((batch_size,), np.float32)}


class StepTimer:
  """The compiled train (and eval) step of a config, with its state and a synthetic batch.

  Used by the CLI and by benchmarks/torch_vs_jax.py, which interleaves its steps with
  PyTorch's: `train_once()` runs one train step and returns something to block on.
  """

  def __init__(self, config, batch_size=None, with_eval=True, compiler_options=None):
    if batch_size is not None:
      with config.unlocked():
        config.batch_size = int(batch_size)
    self.config = config
    self.mesh = parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, self.mesh)
    self.spec = model_spec.ModelSpec.from_config(config)
    shape = image_shape(config)
    tx = optimizer.create_optimizer(config, STEPS_PER_EPOCH,
                                    self.spec.abstract_variables(shape)["params"])
    self.state = parallel.replicate(
        train.initial_state(self.spec, tx, shape, jax.random.key(config.seed)), self.mesh)
    host_batch = synthetic_batch(config, config.batch_size, config.seed)
    self.batch = parallel.shard_batch({k: host_batch[k] for k in ("image", "label")}, self.mesh)
    self.epoch = jnp.float32(1.0)
    options = compiler_options or {}  # XLA options, for experiments (benchmarks/NOTES.md)

    t0 = time.perf_counter()
    self.train_compiled = train.make_train_step(config, tx, self.mesh).lower(
        self.state, self.batch, self.epoch).compile(options)
    self.compile_s = time.perf_counter() - t0
    self.flops = step_flops(config, tx, self.mesh, self.state, self.batch, self.epoch)
    self.eval_compiled = None
    if with_eval:
      self.eval_batch = parallel.shard_batch(host_batch, self.mesh)
      self.eval_compiled = train.make_eval_step(config, self.mesh).lower(
          self._variables(), self.eval_batch).compile(options)
    self.metrics = None

  def _variables(self):
    return checkpoints.variables_of(self.state)

  def train_once(self):
    self.state, self.metrics = self.train_compiled(self.state, self.batch, self.epoch)
    return self.metrics["train/loss"]

  def eval_once(self):
    return self.eval_compiled(self._variables(), self.eval_batch)


def run_benchmark(config, steps: int = 10, warmup: int = 2, batch=None,
                  eval_too: bool = True) -> Dict[str, Any]:
  """Builds, compiles and times the steps of `config`; returns the JSON fields."""
  if steps < 1 or warmup < 0:
    raise ValueError(f"steps={steps} must be >= 1 and warmup={warmup} >= 0")
  if batch is not None and batch < 1:
    raise ValueError(f"batch={batch} is invalid: it must be a positive integer")
  timer = StepTimer(config, batch, with_eval=eval_too)
  batch_size = timer.config.batch_size

  _time(timer.train_once, warmup)
  step_s = statistics.median(_time(timer.train_once, steps))
  loss = float(timer.metrics["train/loss"])
  if not np.isfinite(loss):
    raise FloatingPointError(f"non-finite loss {loss} in the benchmark's train step")
  result = dict(images_per_sec=batch_size / step_s, step_ms=1e3 * step_s,
                compile_s=timer.compile_s, flops_per_image=timer.flops / batch_size,
                gflops_per_sec=timer.flops / step_s / 1e9)
  if eval_too:
    _time(timer.eval_once, max(warmup, 1))
    eval_s = statistics.median(_time(timer.eval_once, steps))
    result.update(eval_images_per_sec=batch_size / eval_s, eval_step_ms=1e3 * eval_s)
  else:
    result.update(eval_images_per_sec=None, eval_step_ms=None)
  c = timer.config
  result.update(
      backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind,
      device_count=jax.device_count(), model=timer.spec.kind, depth=timer.spec.depth,
      **timer.spec.options(), num_branches=timer.spec.num_branches,
      num_classes=timer.spec.num_classes, num_params=timer.spec.num_params(),
      forward_flops_per_image=forward_flops_per_image(timer.spec, image_shape(c)),
      image_size=image_shape(c)[0], batch=batch_size,
      branch_impl=models.resolve_branch_impl(timer.spec.branch_impl),
      compute_dtype=timer.spec.compute_dtype,
      cpu_conv_library=xla_options.cpu_conv_library(c, jax.default_backend()),
      conv_impl=kernels.conv_impl_on(timer.spec.conv_impl, jax.default_backend(),
                                     timer.spec.compute_dtype),
      steps=steps,
      jax_version=jax.__version__, loss=loss)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  reused = host_memory.apply_for_cpu(REUSE_HOST_MEMORY.value)   # before JAX starts its threads
  warning = kernels.off_warning(_CONFIG.value.get("conv_impl", "auto"), jax.default_backend())
  if warning:
    print(warning, file=sys.stderr, flush=True)
  result = run_benchmark(_CONFIG.value, steps=_STEPS.value, warmup=_WARMUP.value,
                         batch=_BATCH.value, eval_too=_EVAL.value)
  result["reuse_host_memory"] = reused
  print(json.dumps(result), flush=True)


def run():
  """Console entry (`one-jax-bench`): bad input ends in one `error: ...` line (one_jax.cli)."""
  sys.exit(cli.exit_status(app.run, main))


if __name__ == "__main__":
  run()

"""Train- and eval-step throughput, printed as one JSON line (DESIGN.md section 10).

    python -m one_jax.bench --config=configs/step1.py:three_branch [--steps=N] [--batch=N]

Times the training loop's own jitted step (`one_jax.training.steps.make_dispatch_step`: forward, loss,
backward, SGD update, BatchNorm statistics, metric sums; config.steps_per_dispatch steps per
call; with the synthetic train set on the device and augmented in the step when
config.data_on_device resolves to that) and `make_eval_step` on a batch of the same size.
Compilation and warm-up calls are excluded; step times are medians over the calls of --steps
steps, divided by the steps per call. FLOPs come from XLA's cost analysis of one train step
(`step_flops`).

Fields: images_per_sec, eval_images_per_sec, step_ms, eval_step_ms, compile_s,
step_memory_mb (the compiled train dispatch's arguments, outputs and temporaries by XLA's
memory analysis, donated buffers once; null where the backend has none), backend,
device_kind, device_count, flops_per_image (train step), forward_flops_per_image (inference:
`forward_flops_per_image`), gflops_per_sec (achieved, train step), and the
model fields (model, method: the online-distillation method of --config.method, null for
a baseline; depth, its architecture options, num_branches, num_classes, num_params:
every parameter of the timed model, batch, branch_impl, compute_dtype: 'float32' or
'bfloat16', set with --config.compute_dtype), cpu_conv_library,
conv_impl ('kernel': one_jax's compiled CPU convolutions, 'xla': XLA's), steps_per_dispatch,
data_placement ('device': the train set in device memory, augmented in the step; 'host': batches
the host pipeline built beforehand, already on the devices, so its cost is not timed),
jax_version, loss (the mean train loss of every step run, warm-up included),
and (from the command line) reuse_host_memory (one_jax/cpu/host_memory.py). Where
conv_impl='auto' fell back to XLA on a CPU, one line on stderr says that the kernels are off
and why (kernels.off_warning).
"""
import dataclasses
import functools
import json
import statistics
import sys
import time
from typing import Any, Dict, NamedTuple, Optional

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from one_jax import cli, parallel, validate
from one_jax.architectures import model_spec, models
from one_jax.cpu import host_memory, kernels, xla_options
from one_jax.data import device_data, in_memory, sources
from one_jax.training import (compile_cache, methods, optimizer, program_cache, steps,
                              train_state)

IMAGE_SHAPE = (32, 32, 3)   # CIFAR's; a config with image_size (ImageNet: 224) sets its own


def image_shape(config) -> tuple:
  """The model input the benchmark feeds: config.image_size squared, else CIFAR's 32x32."""
  size = config.get("image_size", IMAGE_SHAPE[0])
  return (size, size, 3)


STEPS_PER_EPOCH = 390  # CIFAR: 50000 // 128; only the learning-rate schedule sees it


def time_calls(fn, n):
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


def step_flops(config, spec: model_spec.ModelSpec, tx, mesh, state, batch, epoch,
               program_dir: Optional[str] = None) -> float:
  """The train step's arithmetic: XLA's cost analysis of the step written with XLA's own
  convolutions, before optimisation. Custom calls (one_jax's CPU kernels) are invisible to
  the analysis, so this counts the same work whichever implementation runs.

  The count takes lowering the whole step (about 20 s at ResNet-110): with program_dir (the
  command's, program_cache.directory_of) it is kept there beside the step's program."""
  xla_config = config.copy_and_resolve_references()
  with xla_config.unlocked():
    xla_config.conv_impl = "xla"
  xla_spec = dataclasses.replace(spec, conv_impl="xla")
  identity = json.dumps({
      "step_flops_of": steps.program_identity(xla_config, xla_spec, mesh, False,
                                              STEPS_PER_EPOCH),
      "arguments": program_cache.describe((state, batch, epoch))})
  return program_cache.cached_number(program_dir, identity, lambda: _flops(
      steps.make_train_step(xla_config, xla_spec, tx, mesh).lower(state, batch, epoch)))


def forward_flops_per_image(spec: model_spec.ModelSpec, image_shape=IMAGE_SHAPE,
                            program_dir: Optional[str] = None) -> float:
  """One image's inference arithmetic (the eval forward of every branch and the gate): XLA's
  cost analysis of the model with XLA's own convolutions, before optimisation; nothing is
  compiled or run (README's architecture table). program_dir: kept there, as step_flops'."""
  spec = dataclasses.replace(spec, conv_impl="xla")
  model = spec.build()
  images = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
  identity = json.dumps({"forward_flops_of": repr(spec), "image_shape": list(image_shape)})
  return program_cache.cached_number(program_dir, identity, lambda: _flops(
      jax.jit(model.apply).lower(spec.abstract_variables(image_shape), images)))


def compiled_memory_bytes(compiled) -> Optional[int]:
  """The memory a compiled step needs, by XLA's own analysis: its arguments, outputs and
  temporaries, donated buffers counted once (None where the backend gives no analysis)."""
  try:
    m = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def synthetic_batch(config, batch_size: int, seed: int = 0) -> Dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {"image": rng.standard_normal((batch_size,) + image_shape(config), dtype=np.float32),
          "label": rng.integers(0, config.num_classes, (batch_size,)).astype(np.int32),
          "mask": np.ones((batch_size,), np.float32)}


class StepTimer:
  """The training loop's compiled dispatch step for a config, with its state and inputs.

  Timed as the loop runs it (`steps.make_dispatch_step`): config.steps_per_dispatch train steps
  per call, and the train set on the device (augmented inside the step from the host's plans)
  when config.data_on_device resolves to it for an in-memory set: `placement` is 'device' then,
  else 'host' (batches built by the host pipeline beforehand and already on the devices, so
  the host's augmentation and copy are not timed). The inputs are a synthetic train set of two
  dispatches' worth of examples; calls alternate between the two.

  Used by the CLI, benchmarks/torch_vs_jax.py (which interleaves its calls with PyTorch's
  steps) and benchmarks/gpu_bench.py: `train_once()` runs one dispatch (`steps_per_call`
  train steps) and returns the running loss sum to block on.
  """

  def __init__(self, config, batch_size=None, with_eval=True, compiler_options=None):
    if batch_size is not None:
      with config.unlocked():
        config.batch_size = int(batch_size)
    self.config = config
    self.mesh = parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, self.mesh)
    self.spec = model_spec.ModelSpec.from_config(config)
    self.steps_per_call = validate.check_int(
        "config.steps_per_dispatch", config.get("steps_per_dispatch", 1), minimum=1)
    shape = image_shape(config)
    program_dir = program_cache.directory_of(config)
    variables = train_state.fresh_variables(self.spec, shape, jax.random.key(config.seed),
                                            program_dir)
    tx = optimizer.create_optimizer(config, STEPS_PER_EPOCH,
                                    train_state.abstract(variables["params"]))
    fresh = train_state.with_optimizer_state(variables, tx)
    self.state = parallel.replicate(fresh, self.mesh)
    self.sums = parallel.replicate(
        steps.zero_sums(config, self.spec, tx, self.mesh, fresh, shape, program_dir), self.mesh)
    self.inputs, data = self._inputs(shape)
    self.placement = "host" if data is None else "device"
    self._data = () if data is None else (data,)
    self.epoch = jnp.float32(1.0)
    self.calls = 0
    options = compiler_options or {}  # XLA options, for experiments (benchmarks/NOTES.md)

    t0 = time.perf_counter()
    step = steps.make_dispatch_step(
        config, self.spec, tx, self.mesh, on_device=data is not None,
        steps_per_epoch=STEPS_PER_EPOCH, program_dir=program_dir)
    args = (self.state, self.sums, self.inputs[0], self.epoch, *self._data)
    with compile_cache.Lookups() as lookups:
      if isinstance(step, program_cache.CachedProgram):   # the traced program may be cached
        self.train_compiled = step.compile(*args, compiler_options=options)
      else:
        self.train_compiled = step.lower(*args).compile(options)
    self.compile_s = time.perf_counter() - t0
    self.compile_cache = ("hit" if lookups.hits else "miss" if lookups.misses else "off")
    self.memory_bytes = compiled_memory_bytes(self.train_compiled)
    host_batch = synthetic_batch(config, config.batch_size, config.seed)
    views = methods.for_model(config, self.spec).views
    train_images = (host_batch["image"] if views == 1 else   # KDCL, PCL: a view per peer
                    np.repeat(host_batch["image"][:, None], views, axis=1))
    one_batch = parallel.shard_batch({"image": train_images, "label": host_batch["label"]},
                                     self.mesh)
    self.flops = step_flops(config, self.spec, tx, self.mesh, self.state, one_batch, self.epoch,
                            program_dir)
    self.program_dir = program_dir
    self.eval_compiled = None
    if with_eval:
      self.eval_batch = parallel.shard_batch(host_batch, self.mesh)
      eval_step = steps.make_eval_step(config, self.spec, self.mesh, program_dir)
      if isinstance(eval_step, program_cache.CachedProgram):
        self.eval_compiled = eval_step.compile(self._variables(), self.eval_batch,
                                               compiler_options=options)
      else:
        self.eval_compiled = eval_step.lower(self._variables(), self.eval_batch).compile(options)

  def _inputs(self, shape):
    """([two dispatches' stacked inputs], the train set on the devices or None)."""
    config, k, n = self.config, self.steps_per_call, self.config.batch_size
    if config.get("dataset") in sources.IMAGENET_DATASETS:
      # Its loader streams and decodes (one_jax.data.imagenet): the loop never keeps it on the device.
      batch = synthetic_batch(config, n, config.seed)
      items = [{"image": batch["image"], "label": batch["label"]}] * (2 * k)
      data = None
    else:
      source, _ = in_memory.synthetic_sources(2 * k * n, 1, config.num_classes, config.seed,
                                                   shape)
      where = dict(global_batch=n, seed=config.seed, epoch=0,
                   views=methods.for_model(config, self.spec).views)
      if device_data.use_device_data(config.get("data_on_device", "false"), source):
        items, data = list(in_memory.train_plans(len(source), **where)), \
            device_data.put(source, self.mesh)
      else:
        items, data = list(in_memory.train_batches(source, **where)), None
    return [steps.stack_steps(items[i * k:(i + 1) * k], self.mesh) for i in (0, 1)], data

  def _variables(self):
    return models.variables_in(self.state)

  def train_once(self):
    self.state, self.sums, _ = self.train_compiled(
        self.state, self.sums, self.inputs[self.calls % 2], self.epoch, *self._data)
    self.calls += 1
    return self.sums["train/loss"]

  def mean_loss(self) -> float:
    """The mean train loss over every step run so far."""
    return float(self.sums["train/loss"]) / (self.calls * self.steps_per_call)

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

  k = timer.steps_per_call
  time_calls(timer.train_once, warmup)
  step_s = statistics.median(time_calls(timer.train_once, -(-steps // k))) / k
  loss = timer.mean_loss()
  if not np.isfinite(loss):
    raise FloatingPointError(f"non-finite loss {loss} in the benchmark's train step")
  result = dict(images_per_sec=batch_size / step_s, step_ms=1e3 * step_s,
                compile_s=timer.compile_s, compile_cache=timer.compile_cache,
                step_memory_mb=(None if timer.memory_bytes is None
                                else timer.memory_bytes / 2**20),
                flops_per_image=timer.flops / batch_size,
                gflops_per_sec=timer.flops / step_s / 1e9)
  if eval_too:
    time_calls(timer.eval_once, max(warmup, 1))
    eval_s = statistics.median(time_calls(timer.eval_once, steps))
    result.update(eval_images_per_sec=batch_size / eval_s, eval_step_ms=1e3 * eval_s)
  else:
    result.update(eval_images_per_sec=None, eval_step_ms=None)
  c = timer.config
  result.update(
      backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind,
      device_count=jax.device_count(), model=timer.spec.kind, method=timer.spec.method,
      depth=timer.spec.depth, **timer.spec.options(), num_branches=timer.spec.num_branches,
      num_classes=timer.spec.num_classes, num_params=timer.spec.num_params(),
      forward_flops_per_image=forward_flops_per_image(timer.spec, image_shape(c),
                                                      timer.program_dir),
      image_size=image_shape(c)[0], batch=batch_size,
      branch_impl=models.resolve_branch_impl(timer.spec.branch_impl),
      compute_dtype=timer.spec.compute_dtype,
      cpu_conv_library=xla_options.cpu_conv_library(c, jax.default_backend()),
      conv_impl=kernels.conv_impl_on(timer.spec.conv_impl, jax.default_backend(),
                                     timer.spec.compute_dtype),
      steps_per_dispatch=k, data_placement=timer.placement, steps=steps,
      jax_version=jax.__version__, loss=loss)
  return result


class Flags(NamedTuple):
  config: Any
  steps: Any
  warmup: Any
  batch: Any
  eval: Any
  reuse_host_memory: Any


def define_flags() -> Flags:
  """The command line's flags. Defined by the entry points that parse them, not at import:
  scripts that import this module for StepTimer (benchmarks/gpu_bench.py) have their own."""
  return Flags(
      config=config_flags.DEFINE_config_file(
          "config", "configs/step1.py:three_branch", "Training config (ml_collections), e.g. "
          "configs/step1.py:five_branch; --config.FIELD=VALUE overrides fields.",
          lock_config=True),
      steps=flags.DEFINE_integer("steps", 10, "Timed steps (the median is reported)."),
      warmup=flags.DEFINE_integer("warmup", 2, "Untimed calls after compilation."),
      batch=flags.DEFINE_integer("batch", None, "Global batch size (default: the config's)."),
      eval=flags.DEFINE_bool("eval", True, "Also time the eval (inference) step."),
      reuse_host_memory=flags.DEFINE_bool(host_memory.FLAG_NAME, True, host_memory.FLAG_HELP))


def main(argv, cli_flags: Flags):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}: options are --config, "
                     "--config.FIELD=VALUE, --steps, --warmup, --batch and --[no]eval")
  config = cli_flags.config.value
  reused = host_memory.apply_for_cpu(cli_flags.reuse_host_memory.value)  # before JAX's threads
  compile_cache.enable(config.get("compilation_cache_dir", "auto"))     # before any compilation
  warning = kernels.off_warning(config.get("conv_impl", "auto"), jax.default_backend())
  if warning:
    print(warning, file=sys.stderr, flush=True)
  result = run_benchmark(config, steps=cli_flags.steps.value, warmup=cli_flags.warmup.value,
                         batch=cli_flags.batch.value, eval_too=cli_flags.eval.value)
  result["reuse_host_memory"] = reused
  print(json.dumps(result), flush=True)


def run():
  """Console entry (`one-jax-bench`): bad input ends in one `error: ...` line (one_jax.cli)."""
  cli_flags = define_flags()
  sys.exit(cli.exit_status(app.run, functools.partial(main, cli_flags=cli_flags),
                           flags_parser=cli.parse_flags))


if __name__ == "__main__":
  run()

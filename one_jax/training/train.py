"""Training and evaluation of ONE and baseline models (DESIGN.md sections 4, 5, 7, 8).

Reads top to bottom: initial_state, the per-device step functions, the jitted shard_map
steps, evaluate, the loop's named steps (prepare, restore or initialise, train one epoch,
evaluate and log, checkpoint and stop, finish) and train_and_evaluate, which strings them
together; `run` is the entry point (step-2 surgery, evaluation only, or training). The model
is a model_spec.ModelSpec built from the config. The state is a plain dict of pytrees
{'params', 'batch_stats', ['gate_offset'], 'opt_state'}, which is what checkpoints and
surgery see.
"""
import dataclasses
import functools
import itertools
import json
import os
import sys
import time
from typing import Any, Callable, Dict, Optional, Tuple

from absl import logging
import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec as P

from one_jax import parallel
from one_jax.architectures import model_spec
from one_jax.cpu import xla_options
from one_jax.data import common, device_data, in_memory, sources
from one_jax.storage import checkpoints, workdirs
from one_jax.training import config_checks, methods, metric_writers, optimizer, preemption
from one_jax.training import two_stage, voting

DATA = parallel.DATA_AXIS


# ----------------------------------------------------------------------------- model


def initial_state(spec: model_spec.ModelSpec, tx, image_shape, rng) -> Dict[str, Any]:
  """Fresh variables and optimizer state (host numpy arrays)."""
  state = dict(spec.init(rng, image_shape))
  state["opt_state"] = tx.init(state["params"])
  return jax.tree.map(np.asarray, state)


# ----------------------------------------------------------------------------- per-device steps


def _topk_correct(logits, labels, k):
  """1.0 where the label is among the k largest logits (ties count as correct). Never invents
  accuracy: an example with a non-finite logit, or whose label is not one of the model's
  classes, counts as wrong (a NaN label logit would otherwise beat no logit and count as
  right)."""
  num_classes = logits.shape[-1]
  known = (labels >= 0) & (labels < num_classes)
  label_logit = jnp.take_along_axis(logits, jnp.clip(labels, 0, num_classes - 1)[:, None],
                                    axis=-1)
  right = (jnp.sum(logits > label_logit, axis=-1) < k) & known
  return (right & jnp.all(jnp.isfinite(logits), axis=-1)).astype(jnp.float32)


def train_step_fn(method, model, tx, state, batch, epoch):
  """One SGD step on this device's slice of the global batch (run under shard_map)."""
  def loss_fn(params):
    variables = dict(checkpoints.variables_of(state), params=params)
    output, new_vars = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"])
    loss, terms = method.loss(output, batch["label"], epoch)
    return loss, (output, terms, new_vars["batch_stats"])

  (_, (output, terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state["params"])
  grads = jax.lax.pmean(grads, DATA)
  mask = method.update_mask
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  updates = optimizer.mask_branch_updates(updates, mask)
  # Inactive branches stay exactly as they were: parameters, statistics and momentum.
  new_state = dict(state, params=jax.tree.map(jnp.add, state["params"], updates),
                   batch_stats=optimizer.select_branches(batch_stats, state["batch_stats"], mask),
                   opt_state=optimizer.select_branches(opt_state, state["opt_state"], mask))
  metrics = {f"train/{k}": v for k, v in terms.items()}
  for head, logits in method.head_logits(output).items():
    metrics[f"train/top1/{head}"] = jnp.mean(_topk_correct(logits, batch["label"], 1))
  metrics = jax.lax.pmean(metrics, DATA)
  # Non-finite guard: the update is applied only when every loss term, the gradients and the
  # updated state are finite (the same decision on every device: all are averaged over
  # 'data'). The flags go back with the metrics (dispatch_fn keeps the first bad step's).
  finite = {f"{FINITE}{k}": jnp.isfinite(metrics[f"train/{k}"]) for k in terms}
  finite[f"{FINITE}gradients"] = _all_finite(grads)
  finite[f"{FINITE}update"] = _all_finite(
      {k: new_state[k] for k in ("params", "batch_stats", "opt_state")})
  ok = jnp.all(jnp.stack(list(finite.values())))
  new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
  metrics.update({k: v.astype(jnp.float32) for k, v in finite.items()})
  metrics[FINITE_ALL] = ok.astype(jnp.float32)
  return new_state, metrics


FINITE = "finite/"             # per-step flags (1.0 finite, 0.0 not) of each loss term, ...
FINITE_ALL = "finite/all"      # ... and of the whole step: the loop checks this one


def _all_finite(tree) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype,
                                                                 jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else \
      jnp.asarray(True)


def dispatch_fn(method, model, tx, state, sums, batches, epoch, data=None):
  """n train steps in a row (lax.scan over the leading axis of `batches`), on this device.

  `sums` (the epoch's metric sums so far) is carried through the steps, so that the sums are
  added in step order whatever the steps per dispatch. With `data` (the train set on the
  device) the batches are device_data plans, augmented here. The non-finite guard carries the
  index of the first step whose update was not applied: from there on every later step of the
  dispatch leaves the state (and the sums) as they were. Returns (state, sums, guard) with
  guard = {'first_bad': int32 (n when every step was finite), FINITE flags of that step}.
  """
  n = jax.tree.leaves(batches)[0].shape[0]

  def body(carry, batch):
    state, sums, guard, index = carry
    if data is not None:
      batch = device_data.augment(data, batch)
    new_state, metrics = train_step_fn(method, model, tx, state, batch, epoch)
    clean = guard["first_bad"] == n          # every step before this one was applied
    bad_here = clean & (metrics[FINITE_ALL] < 1.0)
    keep = clean & ~bad_here
    state = jax.tree.map(lambda new, old: jnp.where(clean, new, old), new_state, state)
    sums = {k: jnp.where(keep, v + metrics[k], v) for k, v in sums.items()}
    guard = {k: jnp.where(bad_here, index if k == "first_bad" else metrics[k], v)
             for k, v in guard.items()}
    return (state, sums, guard, index + 1), None

  flags = {k: jnp.float32(1.0) for k in _finite_keys(sums)}
  guard = dict(flags, first_bad=jnp.int32(n))
  # One step: no loop at all (a one-trip while loop still costs its carried copies, and XLA
  # optimises a loop body less than straight-line code: benchmarks/NOTES.md entries 2 and 14).
  (state, sums, guard, _), _ = jax.lax.scan(body, (state, sums, guard, jnp.int32(0)), batches,
                                            unroll=n == 1)
  return state, sums, guard


def _finite_keys(sums) -> Tuple[str, ...]:
  """The FINITE flags of a step whose metric sums have these keys."""
  terms = [k[len("train/"):] for k in sums if not k.startswith("train/top")]
  return tuple(f"{FINITE}{t}" for t in terms) + (f"{FINITE}gradients", f"{FINITE}update",
                                                  FINITE_ALL)


def eval_step_fn(method, model, variables, batch):
  """Sums (not means) of correct predictions and losses over this device's real examples."""
  output = model.apply(variables, batch["image"], train=False)
  mask = batch["mask"]
  _, terms = method.loss(output, batch["label"], 1e9, weights=mask)
  count = jnp.sum(mask)
  sums = {"count": count, "test/loss": terms["loss"] * count}
  for head, logits in method.head_logits(output).items():
    for k in (1, 5):
      sums[f"test/top{k}/{head}"] = jnp.sum(_topk_correct(logits, batch["label"], k) * mask)
  return jax.lax.psum(sums, DATA)


# ----------------------------------------------------------------------------- jitted steps


def make_train_step(config, tx, mesh):
  """jit(shard_map(train step)) over 'data': state replicated, batch split, state donated."""
  spec = model_spec.ModelSpec.from_config(config)
  step = functools.partial(train_step_fn, methods.for_model(config, spec),
                           spec.build(axis_name=DATA), tx)
  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(DATA), P()), out_specs=(P(), P()),
                          check_vma=False)
  return jax.jit(sharded, donate_argnums=0, compiler_options=_compiler_options(config, mesh))


def make_dispatch_step(config, tx, mesh, on_device: bool = False):
  """jit(shard_map(dispatch_fn)): (state, sums, batches [n, ...], epoch[, data]) ->
  (state, sums, guard); batches split over 'data' along their second axis; state and sums
  donated. on_device: the batches are plans and the last argument is device_data.put's set."""
  spec = model_spec.ModelSpec.from_config(config)
  step = functools.partial(dispatch_fn, methods.for_model(config, spec),
                           spec.build(axis_name=DATA), tx)
  in_specs = (P(), P(), P(None, DATA), P()) + ((P(),) if on_device else ())
  sharded = jax.shard_map(step, mesh=mesh, in_specs=in_specs, out_specs=(P(), P(), P()),
                          check_vma=False)
  return jax.jit(sharded, donate_argnums=(0, 1),
                 compiler_options=_compiler_options(config, mesh))


def zero_sums(config, tx, mesh, state, image_shape) -> Dict[str, np.ndarray]:
  """Zeros of every training metric (the keys a train step returns), host arrays."""
  batch = {"image": jax.ShapeDtypeStruct((config.batch_size,) + tuple(image_shape), jnp.float32),
           "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)}
  _, metrics = jax.eval_shape(make_train_step(config, tx, mesh), state, batch, jnp.float32(0))
  return {k: np.zeros(v.shape, v.dtype) for k, v in metrics.items() if not k.startswith(FINITE)}


def make_eval_step(config, mesh):
  spec = model_spec.ModelSpec.from_config(config)
  step = functools.partial(eval_step_fn, methods.for_model(config, spec),
                           spec.build(axis_name=DATA))
  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(DATA)), out_specs=P(),
                          check_vma=False)
  return jax.jit(sharded, compiler_options=_compiler_options(config, mesh))


def _compiler_options(config, mesh):
  return xla_options.compiler_options(config, mesh.devices.flat[0].platform)


def evaluate(config, eval_step, mesh, variables, test_source, *, process_index=0,
             process_count=1) -> Dict[str, float]:
  """Test loss and top-1/top-5 of every head over every test example exactly once."""
  totals = None
  for batch in in_memory.eval_batches(test_source, global_batch=config.eval_batch_size,
                                           process_index=process_index,
                                           process_count=process_count):
    sums = eval_step(variables, parallel.shard_batch(batch, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = parallel.to_host(totals)
  count = float(totals.pop("count"))
  metrics = {k: float(v) / count for k, v in totals.items()}
  metrics["test/count"] = count
  return methods.for_model(config, model_spec.ModelSpec.from_config(config)).with_derived(
      metrics, "test")


# ----------------------------------------------------------------------------- state I/O


def model_meta(config, spec: model_spec.ModelSpec, epoch: int) -> Dict[str, Any]:
  return {"model": spec.to_dict(), "epoch": int(epoch),
          "config": json.loads(config.to_json_best_effort())}


def state_from_checkpoint(raw: Dict[str, Any], template: Dict[str, Any], *, source: str,
                          with_optimizer: bool = True,
                          restart_counters: bool = False) -> Dict[str, Any]:
  """Fits a raw restored state onto the structure of `template` (this run's fresh state).

  Variables must match exactly (shapes included); the optimizer state is taken when present
  and of the same structure, else the fresh one is kept (e.g. after surgery that reset it).
  restart_counters: a new run initialised from another's checkpoint keeps its momentum but
  starts its own step counters (learning-rate schedule, gradient-ratio period) at zero.
  """
  state = {}
  for key in ("params", "batch_stats", "gate_offset"):
    if key not in template:
      continue
    if key not in raw:
      raise checkpoints.CheckpointError(f"{source} has no {key!r}: it is not a checkpoint of "
                                        "this model kind")
    want = jax.tree.map(np.shape, template[key])
    got = jax.tree.map(np.shape, raw[key])
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
      raise checkpoints.CheckpointError(
          f"{source} does not fit this config's model ({key} differ): check depth, "
          "num_branches and num_classes against `python -m one_jax.surgery inspect`")
    state[key] = jax.tree.map(lambda x, t: np.asarray(x, np.asarray(t).dtype), raw[key],
                              template[key])
  state["opt_state"] = template["opt_state"]
  if with_optimizer and "opt_state" in raw:
    try:
      opt_state = flax.serialization.from_state_dict(template["opt_state"], raw["opt_state"])
      if restart_counters:
        opt_state = jax.tree.map(
            lambda x, t: np.asarray(t) if np.issubdtype(np.asarray(x).dtype, np.integer) else x,
            opt_state, template["opt_state"])
      state["opt_state"] = opt_state
    except (ValueError, KeyError, TypeError):
      logging.warning("%s: optimizer state does not fit this optimizer; starting it fresh",
                      source)
  return state


# ----------------------------------------------------------------------------- the loop


def _host_info():
  return jax.process_index(), jax.process_count()


def check_config(config) -> None:
  """Every field's range or set of values (config_checks.RULES), then the model the fields
  describe together: one-line errors, nothing read or written (the data and the batch sizes
  vs devices are checked where they are built)."""
  config_checks.check(config)
  model_spec.ModelSpec.from_config(config)  # kind, depth, branches, classes, impls, active mask


@dataclasses.dataclass(frozen=True)
class _Run:
  """What the steps of one training run share; built and checked before anything is written."""
  config: ml_collections.ConfigDict
  workdir: str
  spec: model_spec.ModelSpec
  method: Any                 # methods.for_model: the loss, heads and best metric of the run
  mesh: Any
  train_source: Any
  test_source: Any
  steps_per_epoch: int
  dispatch_step: Callable     # make_dispatch_step's: up to steps_per_dispatch steps per call
  eval_step: Callable
  process_index: int
  process_count: int
  device_data: Optional[Dict[str, Any]]   # the train set on the device, or None (host batches)
  zero_sums: Dict[str, np.ndarray]
  log_step: Callable          # step -> learning rate of that step, for the per-step log

  @property
  def is_main(self) -> bool:
    return self.process_index == 0

  @property
  def ckpt_dir(self) -> str:
    return os.path.join(self.workdir, checkpoints.CHECKPOINT_SUBDIR)


@dataclasses.dataclass
class _Start:
  """Where training starts: a checkpoint of this workdir, else init_from, else fresh."""
  state: Dict[str, Any]
  epoch: int = 0
  step_in_epoch: int = 0
  partial_sums: Optional[Dict[str, float]] = None
  last_saved: Optional[int] = None
  unreadable: tuple = ()


def _prepare(config, workdir: str) -> Tuple[_Run, Dict[str, Any]]:
  """The mesh, the data, the model, the optimizer and the jitted steps: (run, tx, fresh state)."""
  process_index, process_count = _host_info()
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  train_source, test_source, info = sources.get_datasets(config)
  steps_per_epoch = common.steps_per_epoch(info.num_train, config.batch_size)
  if config.get("steps_per_epoch", -1) > 0:
    steps_per_epoch = min(steps_per_epoch, config.steps_per_epoch)
  spec = model_spec.ModelSpec.from_config(config)
  tx = optimizer.create_optimizer(config, steps_per_epoch,
                                  spec.abstract_variables(info.image_shape)["params"])
  fresh = initial_state(spec, tx, info.image_shape, jax.random.key(config.seed))
  on_device = device_data.use_device_data(config.get("data_on_device", "false"), train_source)
  if process_count > 1:  # one program for all: process 0's answer (its devices' memory)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    on_device = bool(multihost_utils.broadcast_one_to_all(np.int32(on_device)))
  run = _Run(config, workdir, spec, methods.for_model(config, spec), mesh, train_source, test_source, steps_per_epoch,
             make_dispatch_step(config, tx, mesh, on_device), make_eval_step(config, mesh),
             process_index, process_count,
             device_data.put(train_source, mesh) if on_device else None,
             zero_sums(config, tx, mesh, fresh, info.image_shape),
             optimizer.learning_rate_schedule(config, steps_per_epoch))
  if run.is_main:
    logging.info("train set %s; %d step(s) per dispatch", "on the device" if on_device
                 else "fed by the host", config.get("steps_per_dispatch", 1))
  return run, fresh


def _restore_or_init(run: _Run, fresh: Dict[str, Any]) -> _Start:
  """Resumes from the workdir's latest readable checkpoint, else starts from config.init_from
  (a new run: its own step counters), else from the fresh state."""
  config, workdir = run.config, run.workdir
  resumed = checkpoints.restore_latest(run.ckpt_dir,
                                       fallback=config.get("resume_fallback", False))
  if resumed is not None:
    last_saved, raw, meta, unreadable = resumed
    start = _Start(state_from_checkpoint(raw, fresh, source=f"checkpoint {last_saved} in {workdir}"),
                   epoch=int(meta["epoch"]), step_in_epoch=int(meta.get("step_in_epoch", 0)),
                   partial_sums=meta.get("train_sums"), last_saved=last_saved,
                   unreadable=tuple(unreadable))
    if run.is_main and start.epoch >= config.num_epochs:
      print(f"{workdir} has finished its {config.num_epochs} epochs (checkpoint step "
            f"{last_saved}): nothing to train; raise --config.num_epochs to train on", flush=True)
    elif run.is_main:
      where = (f", step {start.step_in_epoch} of {run.steps_per_epoch}" if start.step_in_epoch
               else "")
      print(f"resuming {workdir} from checkpoint step {last_saved} (epoch {start.epoch + 1}"
            f"{where})", flush=True)
    return start
  if config.init_from:
    raw, _ = checkpoints.restore_raw(config.init_from)
    state = state_from_checkpoint(raw, fresh, source=config.init_from,
                                  with_optimizer=config.init_optimizer_state,
                                  restart_counters=True)
    logging.info("Initialised from %s", config.init_from)
    return _Start(state)
  return _Start(fresh)


def _open_workdir(run: _Run, start: _Start):
  """From here on the run writes: unreadable checkpoints set aside, the checkpoint manager,
  the metric writer and the config. Returns (manager, writer)."""
  if run.is_main:
    for step in start.unreadable:
      print(f"checkpoint step {step} is unreadable: moved to "
            f"{checkpoints.set_aside(run.ckpt_dir, step)}; resuming from step "
            f"{start.last_saved}", file=sys.stderr, flush=True)
  mngr = checkpoints.manager(run.ckpt_dir, keep=run.config.keep_checkpoints)
  writer = metric_writers.MetricWriter(run.workdir, enabled=run.is_main,
                                       resume_epoch=start.epoch,
                                       resume_step=start.last_saved or 0)
  if run.is_main:
    workdirs.write_config(run.config, run.workdir)
  return mngr, writer


@dataclasses.dataclass
class _Epoch:
  """One epoch's training: the state after it, its metric sums and its timing."""
  state: Dict[str, Any]
  sums: Any
  steps_done: int        # including the steps of a resumed epoch done before the restart
  stopped: bool          # by a signal, before the last step
  seconds: float
  images_per_sec: float


def _train_epoch(run: _Run, state, epoch: int, first: int, sums, stop,
                 last_saved: Optional[int], hooks: "_StepHooks") -> _Epoch:
  """Trains one epoch from step `first` (a resumed epoch continues with its partial sums), in
  dispatches of up to steps_per_dispatch steps (the last one of the epoch may be shorter);
  stops early, after the dispatch in flight, when a stop is requested."""
  config, spe = run.config, run.steps_per_epoch
  k = config.get("steps_per_dispatch", 1)
  t0 = time.time()
  n_steps, pending, stopped = first, None, False
  # Throughput is timed from the end of the epoch's first dispatch: in the first epoch that
  # includes compiling the step.
  t_warm, warm_steps = None, first
  bar = metric_writers.progress_bar(spe, f"epoch {epoch + 1}/{config.num_epochs}",
                                    enabled=run.is_main and config.progress_bar)
  bar.update(first)
  feed = _feed(run, epoch, first)
  hooks.start_epoch(epoch, first, sums)
  while n_steps < spe:
    n = min(k, spe - n_steps)
    hooks.before(epoch * spe + n_steps, n)
    batches = stack_steps(list(itertools.islice(feed, n)), run.mesh)
    args = (batches, jnp.float32(epoch)) + ((run.device_data,) if run.device_data else ())
    state, sums, guard = run.dispatch_step(state, sums, *args)
    if pending is not None:  # the dispatch before, checked while this one runs
      _check_finite(config, pending, spe, last_saved, run.ckpt_dir)
    pending = (epoch, n_steps, n, guard)
    n_steps += n
    if t_warm is None:
      jax.block_until_ready(sums)
      t_warm, warm_steps = time.time(), n_steps
    bar.update(n)
    hooks.after(epoch, n_steps, state, sums)
    if n_steps < spe and _stop_requested(stop, run.process_count, n_steps - n, n_steps):
      stopped = True
      break
  bar.close()
  if hasattr(feed, "close"):
    feed.close()
  if pending is not None:
    _check_finite(config, pending, spe, last_saved, run.ckpt_dir)
  t_end = time.time()
  timed_steps = n_steps - warm_steps
  images_per_sec = (timed_steps * config.batch_size / (t_end - t_warm) if timed_steps
                    else (n_steps - first) * config.batch_size / (t_end - t0))
  return _Epoch(state, sums, n_steps, stopped, t_end - t0, images_per_sec)


def _feed(run: _Run, epoch: int, first: int):
  """This process's per-step inputs from step `first` of the epoch: host batches, or the
  plans (ids, crops, flips) of a train set on the device."""
  config = run.config
  where = dict(global_batch=config.batch_size, seed=config.seed, epoch=epoch, start_step=first,
               process_index=run.process_index, process_count=run.process_count)
  if run.device_data is not None:
    return in_memory.train_plans(len(run.train_source), **where)
  return in_memory.train_batches(run.train_source, **where)


def stack_steps(items, mesh):
  """[per-step pytrees of this process's rows] -> one [n, global rows, ...] pytree on the mesh."""
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *items)
  sharding = jax.sharding.NamedSharding(mesh, P(None, DATA))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), stacked)


class _StepHooks:
  """What happens at dispatch boundaries besides training: the per-step log
  (config.log_every_steps) and the profiler trace (config.profile_steps)."""

  def __init__(self, run: _Run, writer):
    self.run, self.writer = run, writer
    self.every = run.config.get("log_every_steps", 0)
    self.profile = config_checks.parse_profile_steps(run.config.get("profile_steps", ""))
    self.tracing = False
    self._last = None  # (step in epoch, host sums) of the last log line in this epoch

  def start_epoch(self, epoch, first, sums):
    del epoch
    if self.every:
      self._last = (first, parallel.to_host(sums) if sums is not None else None)

  def before(self, step: int, n: int):
    """Starts the trace when the dispatch of steps step+1 .. step+n holds profile start."""
    if self.profile and self.run.is_main and not self.tracing and (
        step < self.profile[1] and step + n >= self.profile[0]):
      jax.profiler.start_trace(os.path.join(self.run.workdir, PROFILE_DIR))
      self.tracing = True

  def after(self, epoch, n_steps, state, sums):
    spe = self.run.steps_per_epoch
    step = epoch * spe + n_steps
    if self.tracing and step >= self.profile[1]:
      self.stop_trace(state)
    if not self.every:
      return
    first, before = self._last
    if step // self.every == (epoch * spe + first) // self.every and n_steps < spe:
      return
    now = parallel.to_host(sums)  # the one device read of a log interval
    count = n_steps - first
    if count:
      means = {k: (float(v) - (float(before[k]) if before else 0.0)) / count
               for k, v in now.items()}
      self.writer.write_steps(step, dict(means, lr=float(self.run.log_step(step - 1))))
    self._last = (n_steps, now)

  def stop_trace(self, state=None):
    if self.tracing:
      if state is not None:
        jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.tracing = False
      print(f"profile of steps {self.profile[0]}-{self.profile[1]} written to "
            f"{os.path.join(self.run.workdir, PROFILE_DIR)}", flush=True)


PROFILE_DIR = "profile"


def _evaluate_and_log(run: _Run, writer, epoch: int, done: _Epoch) -> Dict[str, float]:
  """Test metrics of the epoch's state beside its training metrics, written and printed."""
  config = run.config
  train_metrics = {k: float(v) / done.steps_done
                   for k, v in parallel.to_host(done.sums).items()}
  test_metrics = evaluate(config, run.eval_step, run.mesh,
                          checkpoints.variables_of(done.state), run.test_source,
                          process_index=run.process_index, process_count=run.process_count)
  metrics = dict(run.method.with_derived(train_metrics, "train"), **test_metrics)
  metrics.update({
      "lr": optimizer.epoch_learning_rate(config, epoch, run.steps_per_epoch),
      **run.method.epoch_metrics(epoch),
      "epoch_time_s": done.seconds,
      "train_images_per_sec": done.images_per_sec,
  })
  writer.write_epoch(epoch + 1, metrics)
  if run.is_main:
    print(f"epoch {epoch + 1}/{config.num_epochs}: {_brief(run.method, metrics)}", flush=True)
  return metrics


def _checkpoint_and_stop(run: _Run, mngr, stop, state, epoch: int, steps_done: int, sums):
  """Stops the run on a signal with a checkpoint (preemption.Interrupted).

  In the middle of an epoch (steps_done < steps_per_epoch) it writes the state with the
  position in the epoch and the partial metric sums, so that a restart continues exactly
  there; at the end of one (steps_done == steps_per_epoch) that epoch's checkpoint is
  already written.
  """
  spe = run.steps_per_epoch
  step = epoch * spe + steps_done
  if steps_done < spe:
    meta = dict(model_meta(run.config, run.spec, epoch), step_in_epoch=steps_done,
                train_sums={k: float(v) for k, v in parallel.to_host(sums).items()})
    checkpoints.save(mngr, step, parallel.to_host(state), meta)
    where, stopped_epoch = f"at step {step} (epoch {epoch + 1}, step {steps_done} of {spe})", epoch
  else:
    where, stopped_epoch = f"at the end of epoch {epoch + 1} (step {step})", epoch + 1
  mngr.wait_until_finished()
  raise preemption.Interrupted(
      f"stopped by {stop.signal_name or 'a signal'} {where}: checkpoint {step} written to "
      f"{run.ckpt_dir}", signal_name=stop.signal_name or "", step=step, epoch=stopped_epoch)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  """Trains for config.num_epochs, evaluating and checkpointing every epoch; resumes itself.

  Nothing is written before the config, the data, the model and the checkpoint to resume
  from have been checked. SIGTERM/SIGINT stop it after the dispatch in flight with a checkpoint
  (preemption.Interrupted; mid-epoch, a restart continues exactly where it stopped); a
  non-finite loss term, gradient or update stops it at that step (FloatingPointError) and
  keeps the last good checkpoint.
  """
  check_config(config)
  workdirs.check_config(config, workdir)
  run, fresh = _prepare(config, workdir)
  start = _restore_or_init(run, fresh)
  state = parallel.replicate(start.state, run.mesh)
  last_saved = start.last_saved
  mngr, writer = _open_workdir(run, start)
  metrics: Dict[str, float] = {}
  hooks = _StepHooks(run, writer)
  try:
    with preemption.StopRequest() as stop:
      for epoch in range(start.epoch, config.num_epochs):
        resumed = epoch == start.epoch
        sums = run.zero_sums
        if resumed and start.partial_sums:
          sums = {k: np.asarray(start.partial_sums.get(k, 0.0), v.dtype)
                  for k, v in sums.items()}
        done = _train_epoch(run, state, epoch, start.step_in_epoch if resumed else 0,
                            parallel.replicate(sums, run.mesh), stop, last_saved, hooks)
        state = done.state
        if done.stopped:
          _checkpoint_and_stop(run, mngr, stop, state, epoch, done.steps_done, done.sums)
        metrics = _evaluate_and_log(run, writer, epoch, done)
        last_saved = (epoch + 1) * run.steps_per_epoch
        checkpoints.save(mngr, last_saved, parallel.to_host(state),
                         model_meta(config, run.spec, epoch + 1),
                         metrics={checkpoints.BEST_METRIC: metrics[run.method.best_metric]})
        if epoch + 1 < config.num_epochs and _stop_requested(stop, run.process_count):
          _checkpoint_and_stop(run, mngr, stop, state, epoch, run.steps_per_epoch, None)
    mngr.wait_until_finished()
    if run.is_main:
      writer.finish(list(run.method.heads))
  finally:
    hooks.stop_trace()
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
  return metrics


STOP_SYNC_STEPS = 10  # multi-process runs share the stop flag every this many steps


def _stop_requested(stop: preemption.StopRequest, process_count: int,
                    since: Optional[int] = None, now: Optional[int] = None) -> bool:
  """Whether to stop now; every process of a multi-process run takes the same decision.

  Between steps `since` and `now` (a dispatch boundary) a multi-process run shares its flags
  (one process_allgather, a host round trip) only when the dispatch crossed a multiple of
  STOP_SYNC_STEPS; without since/now (an epoch's end) it always does.
  """
  if process_count == 1:
    return stop.requested
  if since is not None and now // STOP_SYNC_STEPS == since // STOP_SYNC_STEPS:
    return False
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.max(multihost_utils.process_allgather(np.int32(stop.requested))))


def _check_finite(config, pending, steps_per_epoch: int, last_saved: Optional[int],
                  ckpt_dir: str) -> None:
  """Raises FloatingPointError naming the step and what went non-finite (pending: a dispatch's
  epoch, first step, step count and guard). That step's update and every later one of its
  dispatch were not applied, and nothing after the last checkpoint is saved."""
  epoch, start, n, guard = pending
  first_bad = int(parallel.to_host(guard["first_bad"]))
  if first_bad == n:
    return
  index = start + first_bad
  flags = parallel.to_host({k: v for k, v in guard.items()
                            if k.startswith(FINITE) and k != FINITE_ALL})
  bad = [k[len(FINITE):] for k, v in flags.items() if float(v) < 1.0]
  terms = [b for b in bad if b not in ("gradients", "update")]
  parts = ([f"loss term{'s' if len(terms) > 1 else ''} {', '.join(terms)}"] if terms else [])
  parts += ["gradients"] * ("gradients" in bad)
  parts += ["parameter update"] * ("update" in bad)
  kept = (f"the last good checkpoint, step {last_saved} in {ckpt_dir}, is kept" if last_saved
          else "no checkpoint had been written yet")
  lr = optimizer.epoch_learning_rate(config, epoch, steps_per_epoch)
  lr_now = f"--config.lr={config.lr}" + (f", {lr:.3g} in this epoch" if not np.isclose(lr, config.lr) else "")
  raise FloatingPointError(
      f"non-finite values at step {epoch * steps_per_epoch + index + 1} (epoch {epoch + 1}, step "
      f"{index + 1} of {steps_per_epoch}) in: {'; '.join(parts)}. Training stopped without "
      f"applying that update and {kept}: lower the learning rate ({lr_now}) or check the data, "
      "then start again with a new --workdir or --config.new_run=True (this workdir keeps the "
      "run's config)")


def _brief(method, metrics) -> str:
  keys = ["train/loss", "test/loss"] + [f"test/top1/{h}" for h in method.heads]
  return ", ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics)


def evaluate_checkpoint(config, spec: model_spec.ModelSpec, variables,
                        test_source) -> Dict[str, float]:
  """Evaluate-only mode: test metrics of a restored model on this config's test set."""
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  eval_config = config_for_model(config, spec)
  process_index, process_count = _host_info()  # each process feeds its rows of every batch
  return evaluate(eval_config, make_eval_step(eval_config, mesh), mesh,
                  parallel.replicate(jax.tree.map(np.asarray, variables), mesh), test_source,
                  process_index=process_index, process_count=process_count)


def config_for_model(config, spec: model_spec.ModelSpec):
  """A copy of config whose model fields describe `spec` (e.g. one restored from disk)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.update(spec.config_fields())
  return config


def run_eval_only(config, workdir: str) -> Dict[str, float]:
  """Evaluates config.init_from (or the workdir's latest checkpoint) and prints the results.

  With config.vote, also the voting table over every subset of branches (voting.csv). The
  checkpoint and the test set are read once for both.
  """
  path = config.init_from or workdir
  _, test_source, info = sources.get_datasets(config)
  spec, variables = checkpoints.load(path)
  if spec.num_classes != info.num_classes:
    raise ValueError(
        f"{path} holds a model of {spec.num_classes} classes but the test set has "
        f"{info.num_classes} (--config.num_classes={config.num_classes}, dataset "
        f"{info.name}): evaluate it on data of its own {spec.num_classes} classes "
        "(nothing was written)")
  checkpoints.check_finite(variables, path, "it cannot be evaluated")
  method = methods.for_model(config_for_model(config, spec), spec)
  if config.vote and not method.votes:
    raise ValueError(f"{path} holds a {spec.describe()}: voting needs a ONE model with branches")
  metrics = evaluate_checkpoint(config, spec, variables, test_source)
  os.makedirs(workdir, exist_ok=True)
  table = metric_writers.summary_table([dict(metrics, epoch=1)], list(method.heads))
  if jax.process_index() == 0:
    print(f"Evaluation of {path} on {metrics['test/count']:.0f} test examples:\n{table}")
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(metrics, f, indent=2)
  if config.vote:
    vote_rows = voting.vote_accuracies(spec.build(), variables, in_memory.eval_batches(
        test_source, global_batch=config.eval_batch_size))
    if jax.process_index() == 0:
      print(voting.format_vote_table(vote_rows))
      voting.write_vote_csv(vote_rows, os.path.join(workdir, "voting.csv"))
  return metrics


def run(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  """What `python -m one_jax.main` runs: a step-2 variant's surgery into WORKDIR/init first
  (two_stage.prepare), then evaluation only (config.eval_only) or training."""
  if not config.get("surgery", ""):
    config = two_stage.prepare(config, workdir)
    return run_eval_only(config, workdir) if config.eval_only else train_and_evaluate(
        config, workdir)
  created = not os.path.exists(workdir)
  try:
    config = two_stage.prepare(config, workdir)
    return run_eval_only(config, workdir) if config.eval_only else train_and_evaluate(
        config, workdir)
  except BaseException:  # a start that failed before its first checkpoint leaves no init
    two_stage.discard_unused_init(workdir, remove_workdir=created)
    raise

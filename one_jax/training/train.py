"""The training loop (DESIGN.md sections 4, 5, 7, 8) and `run`, what python -m one_jax.main runs.

Reads top to bottom: the loop's named steps (prepare, restore or initialise, open the
workdir, train one epoch, evaluate and log, checkpoint and stop) and train_and_evaluate, which
strings them together; `run` is the entry point (step-2 surgery, evaluation only, or
training). The pieces live beside it: the jitted steps (steps.py), the state (train_state.py),
evaluation and eval-only runs (evaluation.py), the per-step log and profiler (step_hooks.py).
The run's ModelSpec is built from the config once (_prepare) and passed down.
"""
import dataclasses
import itertools
import os
import sys
import time
from typing import Any, Callable, Dict, Optional, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from one_jax import parallel
from one_jax.architectures import model_spec, models
from one_jax.data import common, device_data, in_memory, sources
from one_jax.storage import checkpoints, workdirs
from one_jax.training import (config_checks, evaluation, methods,
                              metric_writers, nonfinite, optimizer, preemption, program_cache,
                              step_hooks, steps, train_state, two_stage)

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
  program_dir = program_cache.directory_of(config)
  variables = train_state.fresh_variables(spec, info.image_shape, jax.random.key(config.seed),
                                          program_dir)
  tx = optimizer.create_optimizer(config, steps_per_epoch,
                                  train_state.abstract(variables["params"]))
  fresh = train_state.with_optimizer_state(variables, tx)
  on_device = device_data.use_device_data(config.get("data_on_device", "false"), train_source)
  if process_count > 1:  # one program for all: process 0's answer (its devices' memory)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    on_device = bool(multihost_utils.broadcast_one_to_all(np.int32(on_device)))
  run = _Run(config, workdir, spec, methods.for_model(config, spec), mesh, train_source, test_source, steps_per_epoch,
             steps.make_dispatch_step(
                 config, spec, tx, mesh, on_device, steps_per_epoch=steps_per_epoch,
                 program_dir=program_dir),
             steps.make_eval_step(config, spec, mesh, program_dir),
             process_index, process_count,
             device_data.put(train_source, mesh) if on_device else None,
             steps.zero_sums(config, spec, tx, mesh, fresh, info.image_shape, program_dir),
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
    start = _Start(train_state.state_from_checkpoint(
                       raw, fresh, source=f"checkpoint {last_saved} in {workdir}"),
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
    state = train_state.state_from_checkpoint(raw, fresh, source=config.init_from,
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
                 last_saved: Optional[int], hooks: "step_hooks.StepHooks") -> _Epoch:
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
    batches = steps.stack_steps(list(itertools.islice(feed, n)), run.mesh)
    args = (batches, jnp.float32(epoch)) + ((run.device_data,) if run.device_data else ())
    state, sums, guard = run.dispatch_step(state, sums, *args)
    if pending is not None:  # the dispatch before, checked while this one runs
      nonfinite.check(config, pending, spe, last_saved, run.ckpt_dir)
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
    nonfinite.check(config, pending, spe, last_saved, run.ckpt_dir)
  t_end = time.time()
  timed_steps = n_steps - warm_steps
  images_per_sec = (timed_steps * config.batch_size / (t_end - t_warm) if timed_steps
                    else (n_steps - first) * config.batch_size / (t_end - t0))
  return _Epoch(state, sums, n_steps, stopped, t_end - t0, images_per_sec)


def _feed(run: _Run, epoch: int, first: int):
  """This process's per-step inputs from step `first` of the epoch: host batches, or the
  plans (ids, crops, flips) of a train set on the device; as many views of each example as
  the method takes (KDCL: one per peer)."""
  config = run.config
  where = dict(global_batch=config.batch_size, seed=config.seed, epoch=epoch, start_step=first,
               process_index=run.process_index, process_count=run.process_count)
  if run.method.views != 1:
    where["views"] = run.method.views
  if run.device_data is not None:
    return in_memory.train_plans(len(run.train_source), **where)
  return in_memory.train_batches(run.train_source, **where)


def _evaluate_and_log(run: _Run, writer, epoch: int, done: _Epoch) -> Dict[str, float]:
  """Test metrics of the epoch's state beside its training metrics, written and printed."""
  config = run.config
  train_metrics = {k: float(v) / done.steps_done
                   for k, v in parallel.to_host(done.sums).items()}
  test_metrics = evaluation.evaluate(run.method, run.eval_step, run.mesh,
                                     models.variables_in(done.state), run.test_source,
                                     batch_size=config.eval_batch_size,
                                     process_index=run.process_index,
                                     process_count=run.process_count)
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
    meta = dict(train_state.model_meta(run.config, run.spec, epoch), step_in_epoch=steps_done,
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
  hooks = step_hooks.StepHooks(run, writer)
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
                         train_state.model_meta(config, run.spec, epoch + 1),
                         metrics={checkpoints.BEST_METRIC: metrics[run.method.best_metric]})
        if epoch + 1 < config.num_epochs and _stop_requested(stop, run.process_count):
          _checkpoint_and_stop(run, mngr, stop, state, epoch, run.steps_per_epoch, None)
    mngr.wait_until_finished()
    if run.is_main:
      writer.finish(list(run.method.heads), run.method.deployed_head)
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


def _brief(method, metrics) -> str:
  keys = ["train/loss", "test/loss"] + [f"test/top1/{h}" for h in method.heads]
  return ", ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics)


def run(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  """What `python -m one_jax.main` runs: a step-2 variant's surgery into WORKDIR/init first
  (two_stage.prepare), then evaluation only (config.eval_only) or training."""
  if not config.get("surgery", ""):
    config = two_stage.prepare(config, workdir)
    return evaluation.run_eval_only(config, workdir) if config.eval_only else train_and_evaluate(
        config, workdir)
  created = not os.path.exists(workdir)
  try:
    config = two_stage.prepare(config, workdir)
    return evaluation.run_eval_only(config, workdir) if config.eval_only else train_and_evaluate(
        config, workdir)
  except BaseException:  # a start that failed before its first checkpoint leaves no init
    two_stage.discard_unused_init(workdir, remove_workdir=created)
    raise

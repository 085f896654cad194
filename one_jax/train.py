"""Training and evaluation of ONE and baseline models (DESIGN.md sections 4, 5, 7, 8).

Reads top to bottom: create_model, initial_state, the per-device step functions, the
jitted shard_map steps, evaluate, and train_and_evaluate (the loop: it owns all I/O).
The state is a plain dict of pytrees {'params', 'batch_stats', ['gate_offset'], 'opt_state'},
which is what checkpoints and surgery see.
"""
import functools
import itertools
import json
import os
import sys
import time
from typing import Any, Dict, Optional, Tuple

from absl import logging
import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec as P

from one_jax import checkpoints, config_checks, input_pipeline, losses, metric_writers, models, optimizer
from one_jax import parallel, preemption, workdirs, xla_options

DATA = parallel.DATA_AXIS


# ----------------------------------------------------------------------------- model


def active_branches(config) -> Optional[Tuple[bool, ...]]:
  """config.active_branches ('0,2' or '') -> a static mask over config.num_branches."""
  spec = config.get("active_branches", "") or ""
  if not spec:
    return None
  try:
    chosen = {int(s) for s in str(spec).split(",") if s.strip()}
  except ValueError:
    raise ValueError(f"active_branches={spec!r} is invalid: give 0-based branch indices, "
                     "e.g. --config.active_branches=0,2") from None
  bad = sorted(i for i in chosen if not 0 <= i < config.num_branches)
  if bad or not chosen:
    raise ValueError(f"active_branches={spec!r} names branches {bad} outside 0.."
                     f"{config.num_branches - 1}: use indices of existing branches")
  return tuple(b in chosen for b in range(config.num_branches))


def is_one_model(config) -> bool:
  if config.model not in ("one_resnet", "cifar_resnet"):
    raise ValueError(f"model={config.model!r} is unknown: use 'one_resnet' (ONE) or "
                     "'cifar_resnet' (the baseline)")
  return config.model == "one_resnet"


def create_model(config, axis_name: Optional[str] = None):
  """The module described by the config (axis_name: synchronised BatchNorm over that axis)."""
  if is_one_model(config):
    return models.OneResNet(depth=config.depth, num_branches=config.num_branches,
                            num_classes=config.num_classes, branch_impl=config.branch_impl,
                            active_branches=active_branches(config), axis_name=axis_name,
                            conv_impl=config.get("conv_impl", "auto"))
  return models.CifarResNet(depth=config.depth, num_classes=config.num_classes,
                            axis_name=axis_name, conv_impl=config.get("conv_impl", "auto"))


def heads(config) -> list:
  """Names of the evaluated outputs: each branch, the ensemble, the branch mean (ONE)."""
  if not is_one_model(config):
    return ["model"]
  return [f"branch_{b}" for b in range(config.num_branches)] + ["ensemble", "mean_branch"]


def init_variables(model, image_shape, rng) -> Dict[str, Any]:
  return jax.jit(functools.partial(model.init, train=False))(
      rng, jnp.zeros((1,) + tuple(image_shape), jnp.float32))


def initial_state(model, tx, image_shape, rng) -> Dict[str, Any]:
  """Fresh variables and optimizer state (host numpy arrays)."""
  state = dict(init_variables(model, image_shape, rng))
  state["opt_state"] = tx.init(state["params"])
  return jax.tree.map(np.asarray, state)


# ----------------------------------------------------------------------------- per-device steps


def _topk_correct(logits, labels, k):
  """1.0 where the label is among the k largest logits (ties count as correct)."""
  label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  return (jnp.sum(logits > label_logit, axis=-1) < k).astype(jnp.float32)


def _head_logits(config, output) -> Dict[str, jax.Array]:
  if not is_one_model(config):
    return {"model": output}
  named = {f"branch_{b}": output.branch_logits[b] for b in range(config.num_branches)}
  named["ensemble"] = output.ensemble_logits
  return named


def _loss(config, output, labels, epoch, weights=None):
  if is_one_model(config):
    return losses.one_loss(output, labels, epoch=epoch, temperature=config.temperature,
                           rampup_epochs=config.rampup_epochs, kl_scale=config.kl_scale,
                           ensemble_ce=config.ensemble_ce, stop_gradient=config.stop_gradient,
                           active_branches=active_branches(config), weights=weights)
  return losses.baseline_loss(output, labels, weights=weights)


def train_step_fn(config, model, tx, state, batch, epoch):
  """One SGD step on this device's slice of the global batch (run under shard_map)."""
  def loss_fn(params):
    variables = dict(checkpoints.variables_of(state), params=params)
    output, new_vars = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"])
    loss, terms = _loss(config, output, batch["label"], epoch)
    return loss, (output, terms, new_vars["batch_stats"])

  (_, (output, terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state["params"])
  grads = jax.lax.pmean(grads, DATA)
  mask = active_branches(config) if is_one_model(config) else None
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  updates = optimizer.mask_branch_updates(updates, mask)
  # Inactive branches stay exactly as they were: parameters, statistics and momentum.
  new_state = dict(state, params=jax.tree.map(jnp.add, state["params"], updates),
                   batch_stats=optimizer.select_branches(batch_stats, state["batch_stats"], mask),
                   opt_state=optimizer.select_branches(opt_state, state["opt_state"], mask))
  metrics = {f"train/{k}": v for k, v in terms.items()}
  for head, logits in _head_logits(config, output).items():
    metrics[f"train/top1/{head}"] = jnp.mean(_topk_correct(logits, batch["label"], 1))
  metrics = jax.lax.pmean(metrics, DATA)
  # Non-finite guard: the update is applied only when every loss term, the gradients and the
  # updated state are finite (the same decision on every device: all are averaged over
  # 'data'). The flags go back with the metrics; the loop reads them one step behind.
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


def eval_step_fn(config, model, variables, batch):
  """Sums (not means) of correct predictions and losses over this device's real examples."""
  output = model.apply(variables, batch["image"], train=False)
  mask = batch["mask"]
  _, terms = _loss(config, output, batch["label"], epoch=1e9, weights=mask)
  count = jnp.sum(mask)
  sums = {"count": count, "test/loss": terms["loss"] * count}
  for head, logits in _head_logits(config, output).items():
    for k in (1, 5):
      sums[f"test/top{k}/{head}"] = jnp.sum(_topk_correct(logits, batch["label"], k) * mask)
  return jax.lax.psum(sums, DATA)


# ----------------------------------------------------------------------------- jitted steps


def make_train_step(config, tx, mesh):
  """jit(shard_map(train step)) over 'data': state replicated, batch split, state donated."""
  model = create_model(config, axis_name=DATA)
  step = functools.partial(train_step_fn, config, model, tx)
  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(DATA), P()), out_specs=(P(), P()),
                          check_vma=False)
  return jax.jit(sharded, donate_argnums=0, compiler_options=_compiler_options(config, mesh))


def make_eval_step(config, mesh):
  model = create_model(config, axis_name=DATA)
  step = functools.partial(eval_step_fn, config, model)
  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(DATA)), out_specs=P(),
                          check_vma=False)
  return jax.jit(sharded, compiler_options=_compiler_options(config, mesh))


def _compiler_options(config, mesh):
  return xla_options.compiler_options(config, mesh.devices.flat[0].platform)


def evaluate(config, eval_step, mesh, variables, test_source, *, process_index=0,
             process_count=1) -> Dict[str, float]:
  """Test loss and top-1/top-5 of every head over every test example exactly once."""
  totals = None
  for batch in input_pipeline.eval_batches(test_source, global_batch=config.eval_batch_size,
                                           process_index=process_index,
                                           process_count=process_count):
    sums = eval_step(variables, parallel.shard_batch(batch, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = parallel.to_host(totals)
  count = float(totals.pop("count"))
  metrics = {k: float(v) / count for k, v in totals.items()}
  metrics["test/count"] = count
  return _with_mean_branch(config, metrics, "test")


def _with_mean_branch(config, metrics, split):
  if is_one_model(config):
    for k in ((1, 5) if split == "test" else (1,)):
      keys = [f"{split}/top{k}/branch_{b}" for b in range(config.num_branches)
              if f"{split}/top{k}/branch_{b}" in metrics]
      if keys:
        metrics[f"{split}/top{k}/mean_branch"] = float(np.mean([metrics[x] for x in keys]))
  return metrics


# ----------------------------------------------------------------------------- state I/O


def model_meta(config, model, epoch: int) -> Dict[str, Any]:
  return {"model": checkpoints.model_info(model), "epoch": int(epoch),
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
  """Every field's range or set of values (config_checks.RULES): one-line errors, nothing
  read or written (the data and the batch sizes vs devices are checked where they are
  built)."""
  config_checks.check(config)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  """Trains for config.num_epochs, evaluating and checkpointing every epoch; resumes itself.

  Nothing is written before the config, the data, the model and the checkpoint to resume
  from have been checked. SIGTERM/SIGINT stop it after the step in flight with a checkpoint
  (preemption.Interrupted; mid-epoch, a restart continues exactly where it stopped); a
  non-finite loss term, gradient or update stops it at that step (FloatingPointError) and
  keeps the last good checkpoint.
  """
  process_index, process_count = _host_info()
  is_main = process_index == 0
  check_config(config)
  workdirs.check_config(config, workdir)

  # --- mesh and data
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  train_source, test_source, info = input_pipeline.get_datasets(config)
  steps_per_epoch = input_pipeline.steps_per_epoch(info.num_train, config.batch_size)
  if config.get("steps_per_epoch", -1) > 0:
    steps_per_epoch = min(steps_per_epoch, config.steps_per_epoch)

  # --- model, optimizer, state (a checkpoint of this workdir, else init_from, else fresh)
  model = create_model(config)
  rng = jax.random.key(config.seed)
  param_shapes = jax.eval_shape(
      functools.partial(init_variables, model, info.image_shape), rng)["params"]
  tx = optimizer.create_optimizer(config, steps_per_epoch, param_shapes)
  fresh = initial_state(model, tx, info.image_shape, rng)
  ckpt_dir = os.path.join(workdir, checkpoints.CHECKPOINT_SUBDIR)
  start_epoch, start_step, partial_sums, state = 0, 0, None, fresh
  last_saved, unreadable = None, []
  resumed = checkpoints.restore_latest(ckpt_dir, fallback=config.get("resume_fallback", False))
  if resumed is not None:
    last_saved, raw, meta, unreadable = resumed
    state = state_from_checkpoint(raw, fresh, source=f"checkpoint {last_saved} in {workdir}")
    start_epoch = int(meta["epoch"])
    start_step = int(meta.get("step_in_epoch", 0))
    partial_sums = meta.get("train_sums")
    if is_main and start_epoch >= config.num_epochs:
      print(f"{workdir} has finished its {config.num_epochs} epochs (checkpoint step "
            f"{last_saved}): nothing to train; raise --config.num_epochs to train on", flush=True)
    elif is_main:
      where = f", step {start_step} of {steps_per_epoch}" if start_step else ""
      print(f"resuming {workdir} from checkpoint step {last_saved} (epoch {start_epoch + 1}"
            f"{where})", flush=True)
  elif config.init_from:
    raw, _ = checkpoints.restore_raw(config.init_from)
    state = state_from_checkpoint(raw, fresh, source=config.init_from,
                                  with_optimizer=config.init_optimizer_state,
                                  restart_counters=True)
    logging.info("Initialised from %s", config.init_from)
  state = parallel.replicate(state, mesh)

  train_step = make_train_step(config, tx, mesh)
  eval_step = make_eval_step(config, mesh)

  # --- workdir: everything above has been checked; from here on the run writes
  if is_main:
    for step in unreadable:
      print(f"checkpoint step {step} is unreadable: moved to "
            f"{checkpoints.set_aside(ckpt_dir, step)}; resuming from step {last_saved}",
            file=sys.stderr, flush=True)
  mngr = checkpoints.manager(ckpt_dir, keep=config.keep_checkpoints)
  writer = metric_writers.MetricWriter(workdir, enabled=is_main, resume_epoch=start_epoch)
  if is_main:
    workdirs.write_config(config, workdir)

  metrics: Dict[str, float] = {}
  try:
    with preemption.StopRequest() as stop:
      for epoch in range(start_epoch, config.num_epochs):
        # --- train one epoch (a resumed one from its next step, with its partial sums)
        t0 = time.time()
        first = start_step if epoch == start_epoch else 0
        sums = None
        if epoch == start_epoch and partial_sums:
          sums = parallel.replicate({k: np.float32(v) for k, v in partial_sums.items()}, mesh)
        n_steps, pending, stopped = first, None, False
        # Throughput is timed from the end of the epoch's first step: in the first epoch that
        # step includes compiling the train step.
        t_warm, warm_steps = None, first
        bar = metric_writers.progress_bar(steps_per_epoch,
                                          f"epoch {epoch + 1}/{config.num_epochs}",
                                          enabled=is_main and config.progress_bar)
        bar.update(first)
        batches = input_pipeline.train_batches(
            train_source, global_batch=config.batch_size, seed=config.seed, epoch=epoch,
            start_step=first, process_index=process_index, process_count=process_count)
        for batch in itertools.islice(batches, steps_per_epoch - first):
          state, step_metrics = train_step(state, parallel.shard_batch(batch, mesh),
                                           jnp.float32(epoch))
          if pending is not None:  # the step before, checked while this one runs
            _check_finite(config, pending, steps_per_epoch, last_saved, ckpt_dir)
          pending = (epoch, n_steps, step_metrics)
          step_metrics = {k: v for k, v in step_metrics.items() if not k.startswith(FINITE)}
          sums = step_metrics if sums is None else jax.tree.map(jnp.add, sums, step_metrics)
          n_steps += 1
          if t_warm is None:
            jax.block_until_ready(step_metrics)
            t_warm, warm_steps = time.time(), n_steps
          bar.update(1)
          if n_steps < steps_per_epoch and _stop_requested(stop, process_count):
            stopped = True
            break
        bar.close()
        if hasattr(batches, "close"):
          batches.close()
        if pending is not None:
          _check_finite(config, pending, steps_per_epoch, last_saved, ckpt_dir)

        if stopped:  # --- by a signal in the middle of the epoch: checkpoint and stop
          step = epoch * steps_per_epoch + n_steps
          meta = dict(model_meta(config, model, epoch), step_in_epoch=n_steps,
                      train_sums={k: float(v) for k, v in parallel.to_host(sums).items()})
          checkpoints.save(mngr, step, parallel.to_host(state), meta)
          mngr.wait_until_finished()
          raise preemption.Interrupted(
              f"stopped by {stop.signal_name or 'a signal'} at step {step} (epoch {epoch + 1}, "
              f"step {n_steps} of {steps_per_epoch}): checkpoint {step} written to {ckpt_dir}",
              signal_name=stop.signal_name or "", step=step, epoch=epoch)
        train_metrics = {k: float(v) / n_steps for k, v in parallel.to_host(sums).items()}
        t_end = time.time()
        epoch_time = t_end - t0
        timed_steps = n_steps - warm_steps
        images_per_sec = (timed_steps * config.batch_size / (t_end - t_warm) if timed_steps
                          else (n_steps - first) * config.batch_size / epoch_time)

        # --- evaluate, log, checkpoint
        variables = checkpoints.variables_of(state)
        test_metrics = evaluate(config, eval_step, mesh, variables, test_source,
                                process_index=process_index, process_count=process_count)
        metrics = dict(_with_mean_branch(config, train_metrics, "train"), **test_metrics)
        metrics.update({
            "lr": optimizer.epoch_learning_rate(config, epoch, steps_per_epoch),
            "kl_weight": float(losses.kl_weight(epoch, config.rampup_epochs) * config.kl_scale)
                         if is_one_model(config) else 0.0,
            "epoch_time_s": epoch_time,
            "train_images_per_sec": images_per_sec,
        })
        writer.write_epoch(epoch + 1, metrics)
        if is_main:
          print(f"epoch {epoch + 1}/{config.num_epochs}: {_brief(config, metrics)}", flush=True)
        last_saved = (epoch + 1) * steps_per_epoch
        checkpoints.save(mngr, last_saved, parallel.to_host(state),
                         model_meta(config, model, epoch + 1),
                         metrics=_best_metric(config, metrics))
        if epoch + 1 < config.num_epochs and _stop_requested(stop, process_count):
          mngr.wait_until_finished()
          raise preemption.Interrupted(
              f"stopped by {stop.signal_name or 'a signal'} at the end of epoch {epoch + 1} "
              f"(step {last_saved}): checkpoint {last_saved} written to {ckpt_dir}",
              signal_name=stop.signal_name or "", step=last_saved, epoch=epoch + 1)
    mngr.wait_until_finished()
    if is_main:
      writer.finish(heads(config))
  finally:
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
  return metrics


def _stop_requested(stop: preemption.StopRequest, process_count: int) -> bool:
  """Whether to stop now; every process of a multi-process run takes the same decision."""
  if process_count == 1:
    return stop.requested
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.max(multihost_utils.process_allgather(np.int32(stop.requested))))


def _check_finite(config, pending, steps_per_epoch: int, last_saved: Optional[int],
                  ckpt_dir: str) -> None:
  """Raises FloatingPointError naming the step and what went non-finite (the step's update
  was not applied: the state is the one before it, and nothing of it is saved)."""
  epoch, index, step_metrics = pending
  if float(parallel.to_host(step_metrics[FINITE_ALL])) == 1.0:
    return
  flags = parallel.to_host({k: v for k, v in step_metrics.items()
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


def _best_metric(config, metrics):
  """The value the checkpoint manager ranks by (ensemble top-1; the model's for a baseline)."""
  key = "test/top1/ensemble" if is_one_model(config) else "test/top1/model"
  return {checkpoints.BEST_METRIC: metrics[key]}


def _brief(config, metrics) -> str:
  keys = ["train/loss", "test/loss"] + [f"test/top1/{h}" for h in heads(config)]
  return ", ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics)


def evaluate_checkpoint(config, model, variables, test_source) -> Dict[str, float]:
  """Evaluate-only mode: test metrics of a restored model on this config's test set."""
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  eval_config = config_for_model(config, model)
  process_index, process_count = _host_info()  # each process feeds its rows of every batch
  return evaluate(eval_config, make_eval_step(eval_config, mesh), mesh,
                  parallel.replicate(jax.tree.map(np.asarray, variables), mesh), test_source,
                  process_index=process_index, process_count=process_count)


def config_for_model(config, model):
  """A copy of config whose model fields describe `model` (e.g. one restored from disk)."""
  info = checkpoints.model_info(model)
  config = ml_collections.ConfigDict(config.to_dict())
  config.model = info["kind"]
  config.depth = info["depth"]
  config.num_classes = info["num_classes"]
  config.num_branches = info.get("num_branches", 1)
  config.active_branches = ""
  return config


def run_eval_only(config, workdir: str) -> Dict[str, float]:
  """Evaluates config.init_from (or the workdir's latest checkpoint) and prints the results.

  With config.vote, also the voting table over every subset of branches (voting.csv). The
  checkpoint and the test set are read once for both.
  """
  from one_jax import voting  # pylint: disable=g-import-not-at-top
  path = config.init_from or workdir
  _, test_source, _ = input_pipeline.get_datasets(config)
  model, variables = checkpoints.load_model(path)
  if config.vote and not isinstance(model, models.OneResNet):
    raise ValueError(f"{path} holds a baseline ResNet: voting needs a ONE model with branches")
  metrics = evaluate_checkpoint(config, model, variables, test_source)
  os.makedirs(workdir, exist_ok=True)
  table = metric_writers.summary_table([dict(metrics, epoch=1)],
                                       heads(config_for_model(config, model)))
  if jax.process_index() == 0:
    print(f"Evaluation of {path} on {metrics['test/count']:.0f} test examples:\n{table}")
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(metrics, f, indent=2)
  if config.vote:
    vote_rows = voting.vote_accuracies(model, variables, input_pipeline.eval_batches(
        test_source, global_batch=config.eval_batch_size))
    if jax.process_index() == 0:
      print(voting.format_vote_table(vote_rows))
      voting.write_vote_csv(vote_rows, os.path.join(workdir, "voting.csv"))
  return metrics

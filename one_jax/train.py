"""Training and evaluation of ONE and baseline models (DESIGN.md sections 4, 5, 7, 8).

Reads top to bottom: create_model, initial_state, the per-device step functions, the
jitted shard_map steps, evaluate, and train_and_evaluate (the loop: it owns all I/O).
The state is a plain dict of pytrees {'params', 'batch_stats', ['gate_offset'], 'opt_state'},
which is what checkpoints and surgery see.
"""
import functools
import json
import os
import time
from typing import Any, Dict, Optional, Tuple

from absl import logging
import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec as P

from one_jax import checkpoints, input_pipeline, losses, metric_writers, models, optimizer
from one_jax import parallel

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
                            active_branches=active_branches(config), axis_name=axis_name)
  return models.CifarResNet(depth=config.depth, num_classes=config.num_classes,
                            axis_name=axis_name)


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
  metrics["train/grad_finite"] = jnp.all(jnp.asarray(
      [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])).astype(jnp.float32)
  return new_state, jax.lax.pmean(metrics, DATA)


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
  return jax.jit(sharded, donate_argnums=0)


def make_eval_step(config, mesh):
  model = create_model(config, axis_name=DATA)
  step = functools.partial(eval_step_fn, config, model)
  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(DATA)), out_specs=P(),
                          check_vma=False)
  return jax.jit(sharded)


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  """Trains for config.num_epochs, evaluating and checkpointing every epoch; resumes itself."""
  process_index, process_count = _host_info()
  is_main = process_index == 0

  # --- mesh and data
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  train_source, test_source, info = input_pipeline.get_datasets(config)
  steps_per_epoch = input_pipeline.steps_per_epoch(info.num_train, config.batch_size)
  if config.get("steps_per_epoch", -1) > 0:
    steps_per_epoch = min(steps_per_epoch, config.steps_per_epoch)

  # --- model, optimizer, state
  model = create_model(config)
  rng = jax.random.key(config.seed)
  param_shapes = jax.eval_shape(
      functools.partial(init_variables, model, info.image_shape), rng)["params"]
  tx = optimizer.create_optimizer(config, steps_per_epoch, param_shapes)
  fresh = initial_state(model, tx, info.image_shape, rng)
  mngr = checkpoints.manager(os.path.join(workdir, checkpoints.CHECKPOINT_SUBDIR),
                             keep=config.keep_checkpoints)
  start_epoch, state = 0, fresh
  latest = mngr.latest_step()
  if latest is not None:
    raw, meta = checkpoints.restore_raw(mngr.directory, latest)
    state = state_from_checkpoint(raw, fresh, source=f"checkpoint {latest} in {workdir}")
    start_epoch = int(meta["epoch"])
    logging.info("Resuming from %s at epoch %d (step %d)", workdir, start_epoch, latest)
  elif config.init_from:
    raw, _ = checkpoints.restore_raw(config.init_from)
    state = state_from_checkpoint(raw, fresh, source=config.init_from,
                                  with_optimizer=config.init_optimizer_state,
                                  restart_counters=True)
    logging.info("Initialised from %s", config.init_from)
  state = parallel.replicate(state, mesh)

  train_step = make_train_step(config, tx, mesh)
  eval_step = make_eval_step(config, mesh)
  writer = metric_writers.MetricWriter(workdir, enabled=is_main, resume_epoch=start_epoch)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  metrics: Dict[str, float] = {}
  try:
    for epoch in range(start_epoch, config.num_epochs):
      # --- train one epoch
      t0 = time.time()
      sums, n_steps = None, 0
      bar = metric_writers.progress_bar(steps_per_epoch, f"epoch {epoch + 1}/{config.num_epochs}",
                                        enabled=is_main and config.progress_bar)
      batches = input_pipeline.train_batches(
          train_source, global_batch=config.batch_size, seed=config.seed, epoch=epoch,
          process_index=process_index, process_count=process_count)
      for batch in batches:
        if n_steps >= steps_per_epoch:
          break
        state, step_metrics = train_step(state, parallel.shard_batch(batch, mesh),
                                         jnp.float32(epoch))
        sums = step_metrics if sums is None else jax.tree.map(jnp.add, sums, step_metrics)
        n_steps += 1
        bar.update(1)
      bar.close()
      if hasattr(batches, "close"):
        batches.close()
      train_metrics = {k: float(v) / n_steps for k, v in parallel.to_host(sums).items()}
      if train_metrics.pop("train/grad_finite") < 1.0 or not np.isfinite(
          train_metrics["train/loss"]):
        raise FloatingPointError(f"non-finite loss or gradients in epoch {epoch + 1}: lower "
                                 "--config.lr; the last good checkpoint is kept")
      epoch_time = time.time() - t0

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
          "train_images_per_sec": n_steps * config.batch_size / epoch_time,
      })
      writer.write_epoch(epoch + 1, metrics)
      if is_main:
        print(f"epoch {epoch + 1}/{config.num_epochs}: {_brief(config, metrics)}", flush=True)
      checkpoints.save(mngr, (epoch + 1) * steps_per_epoch, parallel.to_host(state),
                       model_meta(config, model, epoch + 1), metrics=_best_metric(config, metrics))
    mngr.wait_until_finished()
    if is_main:
      writer.finish(heads(config))
  finally:
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
  return metrics


def _best_metric(config, metrics):
  """The value the checkpoint manager ranks by (ensemble top-1; the model's for a baseline)."""
  key = "test/top1/ensemble" if is_one_model(config) else "test/top1/model"
  return {checkpoints.BEST_METRIC: metrics[key]}


def _brief(config, metrics) -> str:
  keys = ["train/loss", "test/loss"] + [f"test/top1/{h}" for h in heads(config)]
  return ", ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics)


def evaluate_checkpoint(config, path: str) -> Dict[str, float]:
  """Evaluate-only mode: test metrics of a checkpoint on this config's test set."""
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  _, test_source, _ = input_pipeline.get_datasets(config)
  model, variables = checkpoints.load_model(path)
  eval_config = config_for_model(config, model)
  metrics = evaluate(eval_config, make_eval_step(eval_config, mesh), mesh,
                     parallel.replicate(jax.tree.map(np.asarray, variables), mesh), test_source)
  return metrics


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

  With config.vote, also the voting table over every subset of branches (voting.csv).
  """
  from one_jax import voting  # pylint: disable=g-import-not-at-top
  path = config.init_from or workdir
  metrics = evaluate_checkpoint(config, path)
  os.makedirs(workdir, exist_ok=True)
  model, _ = checkpoints.load_model(path)
  eval_config = config_for_model(config, model)
  rows = [dict(metrics)]
  table = metric_writers.summary_table([dict(rows[0], epoch=1)], heads(eval_config))
  if jax.process_index() == 0:
    print(f"Evaluation of {path} on {metrics['test/count']:.0f} test examples:\n{table}")
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(metrics, f, indent=2)
  if config.vote:
    vote_rows = vote(config, path)
    if jax.process_index() == 0:
      print(voting.format_vote_table(vote_rows))
      voting.write_vote_csv(vote_rows, os.path.join(workdir, "voting.csv"))
  return metrics


def vote(config, path: str):
  """Voting accuracies (gate-weighted, average, majority) of every subset of branches."""
  from one_jax import voting  # pylint: disable=g-import-not-at-top
  _, test_source, _ = input_pipeline.get_datasets(config)
  model, variables = checkpoints.load_model(path)
  if not isinstance(model, models.OneResNet):
    raise ValueError(f"{path} holds a baseline ResNet: voting needs a ONE model with branches")
  return voting.vote_accuracies(model, variables, input_pipeline.eval_batches(
      test_source, global_batch=config.eval_batch_size))

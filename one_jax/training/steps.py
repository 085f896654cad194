"""The jitted steps: training, a dispatch of several, evaluation (DESIGN.md sections 3, 4, 7).

Each is a per-device function run under shard_map over the mesh's 'data' axis (the state
replicated, the batch split, gradients and metrics averaged over 'data'), then jitted with the
run's compiler options. They are built from the run's ModelSpec and its method
(training/methods.py), which gives the loss, the heads and the update mask.
"""
import functools
import json
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from one_jax import parallel
from one_jax.architectures import model_spec, models
from one_jax.cpu import kernels, xla_options
from one_jax.data import device_data
from one_jax.training import (methods, nonfinite, optimizer, program_cache, temporal_mean,
                              voting)

DATA = parallel.DATA_AXIS


def topk_correct(logits, labels, k):
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
  """One SGD step on this device's slice of the global batch (run under shard_map).

  Returns (new state, metrics, nonfinite.Flags). The update is applied whatever the flags say:
  the loop stops at a bad step before its state can be saved (training/nonfinite.py). The
  flags are the same on every device (the terms and gradients are averaged over 'data')."""
  temporal, temporal_stats = None, None
  if method.spec.temporal_mean:   # PCL's teacher: the temporal mean on the same views
    temporal, temporal_stats = temporal_mean.forward(model, state["temporal_mean"],
                                                     batch["image"], train=True)

  def loss_fn(params):
    variables = dict(models.variables_in(state), params=params)
    output, new_vars = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"])
    if temporal is not None:
      output = output.replace(temporal_logits=temporal.branch_logits)
    loss, terms = method.loss(output, batch["label"], epoch)
    return loss, (output, terms, new_vars["batch_stats"])

  (_, (output, terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state["params"])
  grads = jax.lax.pmean(grads, DATA)
  mask = method.update_mask
  parts = optimizer.branch_parts(method.spec.independent)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  updates = optimizer.mask_branch_updates(updates, mask, parts)
  # Inactive branches stay exactly as they were: parameters, statistics and momentum.
  new_state = dict(state, params=jax.tree.map(jnp.add, state["params"], updates),
                   batch_stats=optimizer.select_branches(batch_stats, state["batch_stats"], mask,
                                                         parts),
                   opt_state=optimizer.select_branches(opt_state, state["opt_state"], mask,
                                                       parts))
  if temporal is not None:   # ... and their temporal means too
    old = state["temporal_mean"]
    new = temporal_mean.update(old, new_state["params"], temporal_stats, method.max_decay)
    new_state["temporal_mean"] = dict(
        new, params=optimizer.select_branches(new["params"], old["params"], mask, parts),
        batch_stats=optimizer.select_branches(new["batch_stats"], old["batch_stats"], mask,
                                              parts))
  metrics = {f"train/{k}": v for k, v in terms.items()}
  for head, logits in method.head_logits(output).items():
    metrics[f"train/top1/{head}"] = jnp.mean(topk_correct(logits, batch["label"], 1))
  metrics = jax.lax.pmean(metrics, DATA)
  flags = nonfinite.Flags.of_step({k: metrics[f"train/{k}"] for k in terms}, grads, updates)
  return new_state, metrics, flags


def dispatch_fn(method, model, tx, state, sums, batches, epoch, data=None):
  """n train steps in a row (lax.scan over the leading axis of `batches`), on this device.

  `sums` (the epoch's metric sums so far) is carried through the steps, so that the sums are
  added in step order whatever the steps per dispatch. With `data` (the train set on the
  device) the batches are device_data plans, augmented here. The guard carries the index of
  the first non-finite step and its flags; the sums keep only the steps before it. Returns
  (state, sums, guard) with guard = {'first_bad': int32 (n when every step was finite),
  'flags': nonfinite.Flags of that step}; the loop raises on a bad step, never saving the
  state of this dispatch.
  """
  n = jax.tree.leaves(batches)[0].shape[0]

  def body(carry, batch):
    state, sums, guard, index = carry
    if data is not None:
      batch = device_data.augment(data, batch)
    state, metrics, flags = train_step_fn(method, model, tx, state, batch, epoch)
    clean, ok = guard["first_bad"] == n, flags.ok()   # clean: no bad step before this one
    bad_here, keep = clean & ~ok, clean & ok
    sums = {k: jnp.where(keep, v + metrics[k], v) for k, v in sums.items()}
    guard = {"first_bad": jnp.where(bad_here, index, guard["first_bad"]),
             "flags": jax.tree.map(lambda new, old: jnp.where(bad_here, new, old), flags,
                                   guard["flags"])}
    return (state, sums, guard, index + 1), None

  guard = clean_guard(sums, n)
  # One step: no loop at all (a one-trip while loop still costs its carried copies, and XLA
  # optimises a loop body less than straight-line code: benchmarks/NOTES.md entries 2 and 14).
  (state, sums, guard, _), _ = jax.lax.scan(body, (state, sums, guard, jnp.int32(0)), batches,
                                            unroll=n == 1)
  return state, sums, guard


def clean_guard(sums, n):
  """A dispatch's guard before its first step (n: its steps): no bad step, every flag set."""
  terms = [k[len("train/"):] for k in sums if not k.startswith("train/top")]
  return {"first_bad": jnp.int32(n), "flags": nonfinite.Flags.clean(terms)}


def eval_step_fn(method, model, variables, batch):
  """Sums (not means) of correct predictions and losses over this device's real examples."""
  output = model.apply(variables, batch["image"], train=False)
  if method.spec.temporal_mean:
    temporal, _ = temporal_mean.forward(model, variables["temporal_mean"], batch["image"],
                                        train=False)
    output = output.replace(temporal_logits=temporal.branch_logits)
  mask = batch["mask"]
  _, terms = method.loss(output, batch["label"], 1e9, weights=mask)
  count = jnp.sum(mask)
  sums = {"count": count, "test/loss": terms["loss"] * count}
  for head, logits in method.head_logits(output).items():
    for k in (1, 5):
      sums[f"test/top{k}/{head}"] = jnp.sum(topk_correct(logits, batch["label"], k) * mask)
  return jax.lax.psum(sums, DATA)


def make_train_step(config, spec: model_spec.ModelSpec, tx, mesh):
  """jit(shard_map(train step)) over 'data': state replicated, batch split, state donated."""
  step = functools.partial(train_step_fn, methods.for_model(config, spec),
                           spec.build(axis_name=DATA), tx)
  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(DATA), P()),
                          out_specs=(P(), P(), P()), check_vma=False)
  return jax.jit(sharded, donate_argnums=0, compiler_options=_compiler_options(config, mesh))


def make_dispatch_step(config, spec: model_spec.ModelSpec, tx, mesh, on_device: bool = False,
                       program_dir: Optional[str] = None, steps_per_epoch: int = 0):
  """jit(shard_map(dispatch_fn)): (state, sums, batches [n, ...], epoch[, data]) ->
  (state, sums, guard); batches split over 'data' along their second axis; state and sums
  donated. on_device: the batches are plans and the last argument is device_data.put's set.

  program_dir: keep the traced program there (program_cache.CachedProgram: a later process
  loads it instead of tracing; single-process runs), found by what determines it besides the
  arguments (program_identity: the config, `steps_per_epoch` of tx's schedule, the model)."""
  step = functools.partial(dispatch_fn, methods.for_model(config, spec),
                           spec.build(axis_name=DATA), tx)
  in_specs = (P(), P(), P(None, DATA), P()) + ((P(),) if on_device else ())
  sharded = jax.shard_map(step, mesh=mesh, in_specs=in_specs, out_specs=(P(), P(), P()),
                          check_vma=False)
  options = _compiler_options(config, mesh)
  if program_dir and jax.process_count() == 1:
    out_tree = lambda args: jax.tree.structure(
        (args[0], args[1], clean_guard(args[1], 0)))
    return program_cache.CachedProgram(
        sharded, donate_argnums=(0, 1), compiler_options=options, out_tree=out_tree,
        program_dir=program_dir, custom_calls=kernels.FFI_TARGETS,
        identity=program_identity(config, spec, mesh, on_device, steps_per_epoch))
  return jax.jit(sharded, donate_argnums=(0, 1), compiler_options=options)


def program_identity(config, spec: model_spec.ModelSpec, mesh, on_device: bool,
                     steps_per_epoch: int) -> str:
  """What determines a dispatch program besides its arguments' signature: the whole config,
  the optimizer's steps per epoch, the model as built (its implementations resolved for this
  backend), where the data lives and the devices."""
  platform = mesh.devices.flat[0].platform
  return json.dumps({
      "config": json.loads(config.to_json_best_effort()), "steps_per_epoch": steps_per_epoch,
      "spec": repr(spec), "branch_impl": models.resolve_branch_impl(spec.branch_impl),
      "conv_impl": kernels.conv_impl_on(spec.conv_impl, platform, spec.compute_dtype),
      "options": _compiler_options(config, mesh), "on_device": bool(on_device),
      "mesh": {str(k): int(v) for k, v in mesh.shape.items()},
      "devices": [str(d) for d in mesh.devices.flat]}, sort_keys=True, default=str)


def zero_sums(config, spec: model_spec.ModelSpec, tx, mesh, state, image_shape,
              program_dir: Optional[str] = None) -> Dict[str, np.ndarray]:
  """Zeros of every training metric (the keys a train step returns), host arrays.

  Knowing the keys takes tracing the whole train step (seconds at ResNet-110, as much as the
  traced program's load saves): with program_dir (the dispatch step's,
  program_cache.directory) they are kept there and read by a later start."""
  def trace():
    batch = {"image": jax.ShapeDtypeStruct((config.batch_size,) + tuple(image_shape),
                                           jnp.float32),
             "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)}
    _, metrics, _ = jax.eval_shape(make_train_step(config, spec, tx, mesh), state, batch,
                                   jnp.float32(0))
    return metrics

  identity = json.dumps({"metrics_of": program_identity(config, spec, mesh, False, 0),
                         "image_shape": list(image_shape),
                         "state": program_cache.describe(state)})
  shapes = program_cache.cached_shapes(program_dir, identity, trace)
  return {k: np.zeros(v.shape, v.dtype) for k, v in shapes.items()}


def make_eval_step(config, spec: model_spec.ModelSpec, mesh, program_dir: Optional[str] = None):
  """jit(shard_map(eval step)): (variables, batch) -> sums over every device's real rows.

  program_dir: keep the traced program there, as make_dispatch_step does (its output's keys,
  the heads' metrics, kept beside it: program_cache.cached_shapes)."""
  step = functools.partial(eval_step_fn, methods.for_model(config, spec),
                           spec.build(axis_name=DATA))
  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(DATA)), out_specs=P(),
                          check_vma=False)
  identity = {"eval_step_of": program_identity(config, spec, mesh, False, 0)}
  return _kept_program(sharded, identity, _compiler_options(config, mesh), program_dir)


def make_vote_forward(config, spec: model_spec.ModelSpec, mesh,
                      program_dir: Optional[str] = None):
  """jit of (variables, images) -> {'branch_logits' [B, N, C], 'gate' [N, B]}: the outputs
  voting.vote_accuracies scores, on one device; its traced program kept in program_dir as the
  evaluation step's is."""
  model = spec.build()

  def forward(variables, images):
    return voting.voted_outputs(model.apply(variables, images, train=False))

  identity = {"vote_forward_of": program_identity(config, spec, mesh, False, 0)}
  return _kept_program(forward, identity, _compiler_options(config, mesh), program_dir)


def _kept_program(fn, identity: Dict[str, str], options, program_dir: Optional[str]):
  """jax.jit(fn), or with program_dir (one process) a program_cache.CachedProgram of it: a later
  start loads the traced program instead of tracing `fn`, and reads its output's structure
  (a dict of arrays) from the shapes kept beside it."""
  if not program_dir or jax.process_count() != 1:
    return jax.jit(fn, compiler_options=options)
  identity = json.dumps(identity)

  def out_tree(args):
    signature = json.dumps([identity, program_cache.describe(args)])
    return jax.tree.structure(program_cache.cached_shapes(
        program_dir, signature, lambda: jax.eval_shape(fn, *args)))

  return program_cache.CachedProgram(
      fn, donate_argnums=(), compiler_options=options, out_tree=out_tree,
      program_dir=program_dir, custom_calls=kernels.FFI_TARGETS, identity=identity)


def _compiler_options(config, mesh):
  return xla_options.compiler_options(config, mesh.devices.flat[0].platform)


def stack_steps(items, mesh):
  """[per-step pytrees of this process's rows] -> one [n, global rows, ...] pytree on the mesh."""
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *items)
  sharding = jax.sharding.NamedSharding(mesh, P(None, DATA))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), stacked)

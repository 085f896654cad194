"""The jitted steps: training, a dispatch of several, evaluation (DESIGN.md sections 3, 4, 7).

Each is a per-device function run under shard_map over the mesh's 'data' axis (the state
replicated, the batch split, gradients and metrics averaged over 'data'), then jitted with the
run's compiler options. They are built from the run's ModelSpec and its method
(training/methods.py), which gives the loss, the heads and the update mask.
"""
import functools
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from one_jax import parallel
from one_jax.architectures import model_spec, models
from one_jax.cpu import xla_options
from one_jax.data import device_data
from one_jax.training import methods, optimizer

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
  """One SGD step on this device's slice of the global batch (run under shard_map)."""
  def loss_fn(params):
    variables = dict(models.variables_in(state), params=params)
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
    metrics[f"train/top1/{head}"] = jnp.mean(topk_correct(logits, batch["label"], 1))
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
      sums[f"test/top{k}/{head}"] = jnp.sum(topk_correct(logits, batch["label"], k) * mask)
  return jax.lax.psum(sums, DATA)


def make_train_step(config, spec: model_spec.ModelSpec, tx, mesh):
  """jit(shard_map(train step)) over 'data': state replicated, batch split, state donated."""
  step = functools.partial(train_step_fn, methods.for_model(config, spec),
                           spec.build(axis_name=DATA), tx)
  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(DATA), P()), out_specs=(P(), P()),
                          check_vma=False)
  return jax.jit(sharded, donate_argnums=0, compiler_options=_compiler_options(config, mesh))


def make_dispatch_step(config, spec: model_spec.ModelSpec, tx, mesh, on_device: bool = False):
  """jit(shard_map(dispatch_fn)): (state, sums, batches [n, ...], epoch[, data]) ->
  (state, sums, guard); batches split over 'data' along their second axis; state and sums
  donated. on_device: the batches are plans and the last argument is device_data.put's set."""
  step = functools.partial(dispatch_fn, methods.for_model(config, spec),
                           spec.build(axis_name=DATA), tx)
  in_specs = (P(), P(), P(None, DATA), P()) + ((P(),) if on_device else ())
  sharded = jax.shard_map(step, mesh=mesh, in_specs=in_specs, out_specs=(P(), P(), P()),
                          check_vma=False)
  return jax.jit(sharded, donate_argnums=(0, 1),
                 compiler_options=_compiler_options(config, mesh))


def zero_sums(config, spec: model_spec.ModelSpec, tx, mesh, state,
              image_shape) -> Dict[str, np.ndarray]:
  """Zeros of every training metric (the keys a train step returns), host arrays."""
  batch = {"image": jax.ShapeDtypeStruct((config.batch_size,) + tuple(image_shape), jnp.float32),
           "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)}
  _, metrics = jax.eval_shape(make_train_step(config, spec, tx, mesh), state, batch, jnp.float32(0))
  return {k: np.zeros(v.shape, v.dtype) for k, v in metrics.items() if not k.startswith(FINITE)}


def make_eval_step(config, spec: model_spec.ModelSpec, mesh):
  """jit(shard_map(eval step)): (variables, batch) -> sums over every device's real rows."""
  step = functools.partial(eval_step_fn, methods.for_model(config, spec),
                           spec.build(axis_name=DATA))
  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(DATA)), out_specs=P(),
                          check_vma=False)
  return jax.jit(sharded, compiler_options=_compiler_options(config, mesh))


def _compiler_options(config, mesh):
  return xla_options.compiler_options(config, mesh.devices.flat[0].platform)


def stack_steps(items, mesh):
  """[per-step pytrees of this process's rows] -> one [n, global rows, ...] pytree on the mesh."""
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *items)
  sharding = jax.sharding.NamedSharding(mesh, P(None, DATA))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), stacked)

"""Learning-rate schedules, SGD as PyTorch does it, gradient-ratio learning rates, branch masks.

DESIGN.md section 4. Every transform here keeps its state as plain pytrees of arrays whose
params-shaped parts have the layout of the parameters, so checkpoints store them with
flax.serialization and surgery edits them like the parameters: a leaf under 'branches' has
the branch on axis 0, in the optimizer state as in the parameters.

The optimizer state of `create_optimizer` (an optax.chain, so a tuple):

  geo_lr == 0:  (EmptyState(),                       # add_decayed_weights
                 TraceState(trace=<params-shaped>),  # the momentum buffer
                 ScaleByScheduleState(count))        # the learning-rate schedule's step
  geo_lr  > 0:  (GradientRatioState(count, factors=<params-shaped>,
                                    inner_state=(EmptyState(), TraceState(trace=...))),
                 ScaleByScheduleState(count))

`optax.tree_utils.tree_get(opt_state, 'trace')` finds the momentum buffer in both.
"""
from typing import Any, NamedTuple, Optional, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from one_jax import validate
from one_jax.architectures import models

SCHEDULES = ("multistep", "cosine")
BRANCHES = "branches"


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules.


def _get(config, name, default):
  """An optional config field (ConfigDict, dataclass or namespace)."""
  return getattr(config, name, default)


def _check_schedule_config(config, steps_per_epoch):
  if not validate.is_int(steps_per_epoch) or steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch={steps_per_epoch!r} is invalid: "
                     "it must be a positive integer")
  if not config.lr > 0:
    raise ValueError(f"lr={config.lr!r} is invalid: it must be positive")
  if config.schedule not in SCHEDULES:
    raise ValueError(f"schedule={config.schedule!r} is unknown: use one of {', '.join(SCHEDULES)}")
  if not (validate.is_int(config.num_epochs) and config.num_epochs >= 1):
    raise ValueError(f"num_epochs={config.num_epochs!r} is invalid: it must be a positive integer")
  warmup = _get(config, "warmup_epochs", 0)
  if not 0 <= warmup < config.num_epochs:
    raise ValueError(f"warmup_epochs={warmup!r} is invalid: it must be in [0, num_epochs)")
  if config.schedule == "multistep":
    if not config.gamma > 0:
      raise ValueError(f"gamma={config.gamma!r} is invalid: it must be positive")
    if any(m < 0 for m in config.milestones):
      raise ValueError(f"milestones={tuple(config.milestones)!r} are invalid: epochs are >= 0")


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  """step -> learning rate.

  'multistep' is the reference's `--schedule`: lr * gamma ** (number of milestones <= epoch),
  epoch = step // steps_per_epoch, so the decay applies from the first step of a milestone
  epoch on (epoch 150 already trains at 0.01). 'cosine' decays per step from lr to 0 over
  num_epochs. warmup_epochs > 0 multiplies either by a linear ramp (step + 1) / warmup_steps
  (never a zero first step); the cosine then runs over the steps after the warm-up.
  """
  _check_schedule_config(config, steps_per_epoch)
  lr = float(config.lr)
  total_steps = int(config.num_epochs) * int(steps_per_epoch)
  warmup_steps = int(round(_get(config, "warmup_epochs", 0) * steps_per_epoch))

  if config.schedule == "multistep":
    scales = {}
    for milestone in config.milestones:   # a repeated milestone decays twice, as in PyTorch
      boundary = int(milestone) * int(steps_per_epoch)
      scales[boundary] = scales.get(boundary, 1.0) * float(config.gamma)
    base = optax.piecewise_constant_schedule(lr, scales)
  else:
    base = optax.join_schedules(
        [optax.constant_schedule(lr),
         optax.cosine_decay_schedule(lr, max(total_steps - warmup_steps, 1))], [warmup_steps])
  if warmup_steps == 0:
    # The default float type: float64 where x64 is enabled, else float32.
    return lambda step: jnp.asarray(base(step), float)

  # The ramp is written out: optax.linear_schedule computes (a - b) * frac + b, which in float32
  # loses the small first values (1 / warmup_steps - 1 + 1), e.g. 3.5e-5 relative at step 0.
  def warmed_up(step):
    return jnp.asarray(base(step) * jnp.minimum(1.0, (jnp.asarray(step) + 1) / warmup_steps),
                       float)

  return warmed_up


def epoch_learning_rate(config, epoch, steps_per_epoch: int = 1) -> float:
  """The learning rate at the first step of `epoch`, for logging.

  Independent of steps_per_epoch except during a warm-up, where the ramp is per step.
  """
  return float(learning_rate_schedule(config, steps_per_epoch)(int(epoch) * steps_per_epoch))


# ---------------------------------------------------------------------------------------------
# Branch selection (active-branch masks).


def _key_name(key):
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return key


def _path_names(path) -> Tuple[Any, ...]:
  return tuple(_key_name(k) for k in path)


def _is_branch_leaf(path, parts: Sequence[str] = (BRANCHES,)) -> bool:
  return bool(set(parts) & set(_path_names(path)))


def select_branches(new_tree, old_tree, active_branches: Optional[Sequence[bool]],
                    parts: Sequence[str] = (BRANCHES,)):
  """new_tree with old_tree's slices restored for inactive branches.

  Works on any tree whose leaves under a `parts` key ('branches'; also 'trunk' where each
  branch has its own, DML's and KDCL's networks) are stacked on axis 0: params, batch_stats,
  updates and optimizer states alike (so a masked branch keeps its running statistics and its
  momentum). Other leaves come from new_tree.
  """
  if active_branches is None:
    return new_tree
  active = np.asarray([bool(a) for a in active_branches])

  def select(path, new, old):
    if not _is_branch_leaf(path, parts):
      return new
    if new.ndim == 0 or new.shape[0] != active.size:
      raise ValueError(f"active_branches has {active.size} entries but the branch leaf "
                       f"{jax.tree_util.keystr(path)} has shape {new.shape} (branches on axis 0)")
    mask = jnp.asarray(active).reshape((-1,) + (1,) * (new.ndim - 1))
    return jnp.where(mask, new, old)

  return jax.tree_util.tree_map_with_path(select, new_tree, old_tree)


def mask_branch_updates(updates, active_branches: Optional[Sequence[bool]],
                        parts: Sequence[str] = (BRANCHES,)):
  """Zeroes the updates of inactive branch slices: they receive no update, weight decay included."""
  return select_branches(updates, jax.tree.map(jnp.zeros_like, updates), active_branches, parts)


def branch_parts(independent: bool) -> Tuple[str, ...]:
  """The parameter-tree parts stacked per branch: 'branches', and 'trunk' where every branch
  has its own (ModelSpec.independent)."""
  return (BRANCHES, "trunk") if independent else (BRANCHES,)


# ---------------------------------------------------------------------------------------------
# Gradient-ratio learning rates ("After LR").


class GradientRatioState(NamedTuple):
  count: chex.Array       # int32 [], the number of updates done
  factors: chex.ArrayTree  # params-shaped: [] per leaf, [B] per leaf under 'branches'
  inner_state: optax.OptState


def _modules(grads_like, output_layer):
  """Groups leaves by module (their parent dict); returns (leaf paths, module of each leaf)."""
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(grads_like)
  paths = [p for p, _ in leaves_with_path]
  modules = [_path_names(p)[:-1] for p in paths]
  if not any(output_layer in m for m in modules):
    raise ValueError(f"gradient-ratio learning rates need the output layer {output_layer!r} in "
                     "the parameter tree, and there is none")
  return paths, modules, treedef


def _abs_sums(path, g, parts):
  """Sum of |g| and element count: per branch slice ([B]) under `parts`, else scalars."""
  g = jnp.abs(g.astype(jnp.float32))
  if _is_branch_leaf(path, parts):
    return jnp.sum(g.reshape(g.shape[0], -1), axis=1), g[0].size
  return jnp.sum(g), g.size


def module_gradient_ratios(grads, output_layer: str = "classifier",
                           parts: Sequence[str] = (BRANCHES,)):
  """Per leaf, the ratio mean|g| of the output layer / mean|g| of the leaf's module.

  Shapes as the factors: [] outside `parts`, [B] under them (each branch slice against its
  own output layer; parts: branch_parts, the trunk too where each branch has its own); a
  shared trunk's and the gate's modules against all output-layer parameters together. Where
  either mean is zero the ratio is NaN (no information: the factor is kept).
  """
  paths, modules, treedef = _modules(grads, output_layer)
  sums = {}  # module -> (sum of |g|, element count), per branch slice under `parts`
  for path, module, g in zip(paths, modules, jax.tree.leaves(grads)):
    s, n = _abs_sums(path, g, parts)
    total, count = sums.get(module, (0.0, 0))
    sums[module] = (total + s, count + n)
  mean = {m: s / n for m, (s, n) in sums.items()}
  out = [m for m in sums if output_layer in m]
  # Trunk and gate: against every output-layer parameter of every branch together.
  out_global = (sum(jnp.sum(sums[m][0]) for m in out)
                / sum(sums[m][1] * jnp.size(sums[m][0]) for m in out))
  # A branch slice: against the output layer of the same branch.
  out_branch = [m for m in out if BRANCHES in m]
  branch_out = None
  if out_branch:
    branch_out = (sum(sums[m][0] for m in out_branch) / sum(sums[m][1] for m in out_branch))

  ratios = []
  for module in modules:
    per_branch = bool(set(parts) & set(module))
    ref = branch_out if (per_branch and branch_out is not None) else out_global
    m = mean[module]
    valid = (m > 0) & (ref > 0)
    ratios.append(jnp.where(valid, ref / jnp.where(valid, m, 1.0), jnp.nan))
  return jax.tree_util.tree_unflatten(treedef, ratios)


def gradient_ratio_lr(every_k: int, clip: Tuple[float, float] = (0.1, 20.0), ema: float = 0.9,
                      output_layer: str = "classifier",
                      inner: Optional[optax.GradientTransformation] = None,
                      parts: Sequence[str] = (BRANCHES,)) -> optax.GradientTransformation:
  """Per-module learning-rate factors from gradient ratios (DESIGN.md section 4, "After LR").

  On steps 0, k, 2k, ... each module's factor moves towards clip(mean|g_output| / mean|g_module|)
  by an exponential moving average (factor <- ema * factor + (1 - ema) * ratio, from 1.0);
  on the other steps the factors stay as they are. A module is the parent dict of leaves
  (a conv's kernel; a BatchNorm's scale and bias); under 'branches' each branch slice has its
  own factor, measured against its own output layer.

  The ratio is measured on the gradients this transform receives (the raw gradients, as
  p.grad in the reference, before weight decay); `inner` (e.g. weight decay + momentum) then
  runs, and the factors multiply its output. So with inner = momentum, the step is
  lr * factor * buf: a per-module learning rate, as with per-module torch param groups, and
  not a rescaled gradient fed into the momentum (which would mix old and new factors in buf).
  A factor updated on a step already scales that step. A module with no gradient (an
  inactive branch) keeps its factor.

  State: GradientRatioState(count, factors, inner_state); factors has the structure of the
  parameters, each leaf the factor broadcastable to that leaf's rows: shape [] outside
  'branches', [B] under it (`parts`: also under 'trunk' where each branch has its own, so a
  DML peer's trunk is measured against that peer's output layer).
  """
  validate.check_int("geo_lr", every_k, minimum=1,
                          why="the factors update every k-th step, k >= 1")
  lo, hi = (float(c) for c in clip)
  if not 0 < lo <= hi:
    raise ValueError(f"gradient-ratio clip={clip!r} is invalid: need 0 < min <= max")
  if not 0 <= ema < 1:
    raise ValueError(f"gradient-ratio ema={ema!r} is invalid: it must be in [0, 1)")
  inner = inner if inner is not None else optax.identity()

  def init_fn(params):
    _modules(params, output_layer)

    def one(path, p):
      shape = (p.shape[0],) if _is_branch_leaf(path, parts) else ()
      return jnp.ones(shape, jnp.float32)

    factors = jax.tree_util.tree_map_with_path(one, params)
    return GradientRatioState(count=jnp.zeros([], jnp.int32), factors=factors,
                              inner_state=inner.init(params))

  def update_fn(updates, state, params=None):
    ratios = module_gradient_ratios(updates, output_layer, parts)
    refresh = state.count % every_k == 0

    def new_factor(f, r):
      target = ema * f + (1.0 - ema) * jnp.clip(r, lo, hi)
      return jnp.where(refresh & ~jnp.isnan(r), target, f)

    factors = jax.tree.map(new_factor, state.factors, ratios)
    updates, inner_state = inner.update(updates, state.inner_state, params)

    def scale(u, f):
      return (u * f.reshape(f.shape + (1,) * (u.ndim - f.ndim))).astype(u.dtype)

    updates = jax.tree.map(scale, updates, factors)
    count = optax.safe_int32_increment(state.count)
    return updates, GradientRatioState(count=count, factors=factors, inner_state=inner_state)

  return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------
# The optimizer.


def create_optimizer(config, steps_per_epoch: int, params) -> optax.GradientTransformation:
  """SGD exactly as torch.optim.SGD(lr, momentum, weight_decay, nesterov), lr from the schedule.

  g <- g + wd * p on every parameter (BatchNorm and biases too, as the reference does);
  buf <- momentum * buf + g (a zero-initialised trace: torch's first-step buf = g);
  p <- p - lr * buf (nesterov: p - lr * (g + momentum * buf)). With geo_lr = k > 0 the
  gradient-ratio factors (measured on the raw gradients every k-th step) multiply lr per
  module. `params` is used to check the tree early, with a clear error.
  """
  schedule = learning_rate_schedule(config, steps_per_epoch)
  # The fields' ranges are config_checks.RULES' (checked once, at the command line).
  momentum = float(_get(config, "momentum", 0.9))
  weight_decay = float(_get(config, "weight_decay", 1e-4))
  sgd = [optax.add_decayed_weights(weight_decay),
         optax.trace(decay=momentum, nesterov=bool(_get(config, "nesterov", False)))]
  geo_lr = _get(config, "geo_lr", 0)
  if not geo_lr:
    return optax.chain(*sgd, optax.scale_by_learning_rate(schedule))
  # A branched model ('branches') of DML or KDCL: each branch has its own trunk.
  independent = BRANCHES in params and _get(config, "method", "one") in models.INDEPENDENT
  ratio = gradient_ratio_lr(
      geo_lr, clip=(_get(config, "geo_lr_min", 0.1), _get(config, "geo_lr_max", 20.0)),
      ema=_get(config, "geo_lr_ema", 0.9), inner=optax.chain(*sgd),
      parts=branch_parts(independent))
  jax.eval_shape(ratio.init, params)  # fails here, not at the first step, without an output layer
  return optax.chain(ratio, optax.scale_by_learning_rate(schedule))

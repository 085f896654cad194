"""PCL's temporal mean teacher: an exponential moving average of the whole model, kept in the
training state as the variable collection 'temporal_mean' = {'params', 'batch_stats', 'count'}
(models.with_temporal_mean starts it as the model itself, count 0).

After every optimizer step (inside the jitted step) its parameters move towards the model's:

    a = min(1 - 1 / (count + 1), max_decay),  ema <- a * ema + (1 - a) * params,  count += 1

the PCL reproduction's `update_ema_variables` (max_decay 0.999; count is its global step, from
0): the true average of the steps so far until the exponential one weighs more. Its BatchNorm
statistics are not averaged (the reference averages `parameters()` only): the temporal-mean
model runs in training mode on each batch to give the teacher's logits, with batch statistics,
and keeps the running statistics of those runs, as the reference's `mean_model.train()` does;
evaluation uses them.
"""
from typing import Any, Dict

import jax
import jax.numpy as jnp

MAX_DECAY = 0.999


def model_variables(temporal) -> Dict[str, Any]:
  """The temporal-mean model's variables, to apply as the model (params and batch_stats)."""
  return {"params": temporal["params"], "batch_stats": temporal["batch_stats"]}


def forward(model, temporal, images, train: bool):
  """The temporal-mean model on images: (its output, its new batch_stats). In training it runs
  with batch statistics and updates its running statistics; nothing flows back (stop_gradient)."""
  variables = model_variables(temporal)
  if not train:
    return model.apply(variables, images, train=False), temporal["batch_stats"]
  output, new = model.apply(variables, images, train=True, mutable=["batch_stats"])
  return jax.lax.stop_gradient(output), new["batch_stats"]


def decay(count, max_decay: float = MAX_DECAY):
  """a = min(1 - 1 / (count + 1), max_decay): 0 on the first update (count 0). In the default
  float type (float64 where x64 is enabled, as the reference's Python float)."""
  return jnp.minimum(1.0 - 1.0 / (count.astype(jnp.result_type(float)) + 1.0), max_decay)


def update(temporal, params, batch_stats, max_decay: float = MAX_DECAY) -> Dict[str, Any]:
  """The temporal mean after a step: its params moved towards `params` (the updated model's),
  its running statistics `batch_stats` (from its own forward pass), count + 1."""
  a = decay(temporal["count"], max_decay)
  averaged = jax.tree.map(lambda e, p: (a * e + (1.0 - a) * p).astype(e.dtype),
                          temporal["params"], params)
  return {"params": averaged, "batch_stats": batch_stats, "count": temporal["count"] + 1}

"""The training state: a plain dict of pytrees {'params', 'batch_stats', ['gate_offset'],
['temporal_mean'],
'opt_state'} (what checkpoints and surgery see), made fresh or fitted from a checkpoint."""
import json
from typing import Any, Dict, Optional

from absl import logging
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from one_jax.architectures import model_spec
from one_jax.cpu import kernels
from one_jax.storage import checkpoints
from one_jax.training import program_cache


def initial_state(spec: model_spec.ModelSpec, tx, image_shape, rng) -> Dict[str, Any]:
  """Fresh variables and optimizer state (host numpy arrays)."""
  return with_optimizer_state(fresh_variables(spec, image_shape, rng), tx)


def fresh_variables(spec: model_spec.ModelSpec, image_shape, rng,
                    program_dir: Optional[str] = None) -> Dict[str, Any]:
  """The model's freshly initialised variables (host numpy arrays).

  program_dir (a command's, program_cache.directory): the init's traced program is kept there,
  so that a later start of the same model loads it instead of tracing the model (seconds at
  ResNet-110, benchmarks/NOTES.md entry 27); its values are the plain init's, bit for bit.
  Single-process runs only, as for the step.
  """
  if not program_dir or jax.process_count() > 1:
    return jax.tree.map(np.asarray, spec.init(rng, image_shape))
  fn, options = model_spec.init_program(spec)
  impl = jax.random.key_impl(rng)
  images = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  variables = program_cache.cached_call(
      program_dir, json.dumps({"init": repr(spec), "key_impl": str(impl)}),
      lambda key_data, x: fn(jax.random.wrap_key_data(key_data, impl=impl), x),
      jax.random.key_data(rng), images, compiler_options=options,
      custom_calls=kernels.FFI_TARGETS)
  return jax.tree.map(np.asarray, variables)


def with_optimizer_state(variables: Dict[str, Any], tx) -> Dict[str, Any]:
  """A training state of these variables with `tx`'s fresh optimizer state."""
  state = dict(variables)
  state["opt_state"] = jax.tree.map(np.asarray, tx.init(state["params"]))
  return state


def abstract(tree):
  """Shapes and dtypes of a pytree of arrays (jax.ShapeDtypeStruct leaves)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)


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
  for key in ("params", "batch_stats", "gate_offset", "temporal_mean"):
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

"""Data parallelism: one global 1-D mesh over every device of every process (DESIGN.md section 7).

The train step is `jax.jit` of a `jax.shard_map` over the mesh axis 'data': each device
runs pmap-style per-device code on its slice of the global batch, and collectives over
'data' average gradients, metrics and BatchNorm statistics.
"""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  """All devices (of all processes) on the single axis 'data' (or the given ones)."""
  return Mesh(np.asarray(jax.devices() if devices is None else devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch: int, mesh: Mesh, name: str = "batch_size") -> None:
  """The global batch must split evenly over the devices (and hence the processes)."""
  n = mesh.devices.size
  if not isinstance(global_batch, int) or global_batch < 1 or global_batch % n:
    raise ValueError(f"{name}={global_batch!r} is not a positive multiple of the {n} devices: "
                     f"use e.g. --config.{name}={max(n, int(global_batch) // n * n)}")


def replicate(tree, mesh: Mesh):
  """Places a host pytree on every device (the same values everywhere)."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_callback(
      np.shape(x), sharding, lambda idx, x=x: np.asarray(x)[idx]), tree)


def shard_batch(local_batch, mesh: Mesh):
  """This process's rows of the global batch -> global arrays split over 'data'."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def to_host(tree):
  """Fully replicated global arrays -> numpy (works on every process)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array)
                      else np.asarray(x), tree)

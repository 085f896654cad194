"""What every data source shares: the description of a dataset, how a global batch splits
into steps and over processes, the seed word, the epoch's order (epoch_steps), the synthetic
sets' upsampling, and TFDS's log filter. A leaf
of the data layer: the sources (one_jax.data.in_memory, one_jax.data.imagenet) import it,
never each other's internals."""
import dataclasses
from typing import Callable

import grain
import numpy as np

from one_jax import validate


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_classes: int
  num_train: int
  num_test: int
  image_shape: tuple  # (H, W, 3), (32, 32, 3) for every built-in dataset


def steps_per_epoch(num_train: int, global_batch: int) -> int:
  """Training steps per epoch: the last partial batch is dropped (every batch is full)."""
  validate.check_int("global_batch", global_batch, minimum=1)
  steps = num_train // global_batch
  if steps < 1:
    raise ValueError(f"global_batch={global_batch} is larger than the training set "
                     f"({num_train} examples): use a smaller batch size")
  return steps


def num_eval_steps(num_test: int, global_batch: int) -> int:
  """Evaluation steps covering every test example once (the last batch is padded)."""
  validate.check_int("global_batch", global_batch, minimum=1)
  return -(-num_test // global_batch)


def check_sharding(global_batch, process_index, process_count) -> int:
  """The per-process batch size; raises unless the global batch splits evenly over processes."""
  validate.check_int("global_batch", global_batch, minimum=1)
  validate.check_int("process_count", process_count, minimum=1)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is out of range for "
                     f"process_count={process_count}")
  if global_batch % process_count:
    raise ValueError(f"global_batch={global_batch} does not divide over {process_count} "
                     "processes: use a multiple of the process count")
  return global_batch // process_count


def seed_word(seed) -> int:
  """Any integer seed (negative too) as a non-negative word for numpy's SeedSequence."""
  validate.check_int("seed", seed, why="it must be an integer")
  return int(seed) % 2**64


def quiet_tfds(record) -> bool:
  """Drops TFDS's warnings about a dataset folder that is not prepared yet (we say so)."""
  return "has no dataset_info.json" not in record.getMessage()


def epoch_steps(num_examples: int, make_step: Callable, *, global_batch: int, seed: int,
                epoch: int, start_step: int = 0):
  """The one definition of an epoch's order, shared by every pipeline: a grain MapDataset
  whose element for step i (from start_step on) is make_step(i, ids), ids being the example
  ids of global batch i. The permutation is a function of (seed, epoch) only, so a batch is a
  function of (seed, epoch, position) whatever the process count or where a run resumed;
  make_step draws its augmentation from the same three and slices its process's rows."""
  steps = steps_per_epoch(num_examples, global_batch)
  validate.check_int("epoch", epoch, minimum=0)
  if not validate.is_int(start_step) or not 0 <= start_step <= steps:
    raise ValueError(f"start_step={start_step!r} is out of range: an epoch has {steps} steps")
  epoch_seed = np.random.SeedSequence([seed_word(seed), int(epoch), 0]).generate_state(1)[0]
  ds = grain.MapDataset.range(num_examples).shuffle(seed=int(epoch_seed))
  ds = ds.batch(global_batch, drop_remainder=True)   # element = example ids of one global batch
  return ds.map_with_index(make_step)[start_step:]


def linear_upsampling(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of linear interpolation (pixel centres aligned, edges clamped): the
  smooth class templates of both synthetic datasets."""
  pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
  lo = np.floor(pos).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = pos - lo
  m = np.zeros((n_out, n_in))
  m[np.arange(n_out), lo] += 1 - frac
  m[np.arange(n_out), hi] += frac
  return m

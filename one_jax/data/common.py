"""What every data source shares: the description of a dataset, how a global batch splits
into steps and over processes, the seed word, and TFDS's log filter. A leaf
of the data layer: the sources (one_jax.data.in_memory, one_jax.data.imagenet) import it,
never each other's internals."""
import dataclasses

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


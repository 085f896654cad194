"""The data layer's front door: which source a config's data comes from.

`get_datasets(config)` checks the dataset's name and class count once and hands over to the
source that builds it: one_jax.data.in_memory (CIFAR-10/100, SVHN, an .npz, synthetic) or
one_jax.data.imagenet (ImageNet from TFDS, synthetic ImageNet-shaped images). It sits above
both, which never import each other.
"""
from typing import Any, Tuple

from one_jax import validate
from one_jax.data import common, imagenet, in_memory

# ImageNet-like datasets: images of any size, decoded and augmented per example.
IMAGENET_DATASETS = ("imagenet2012", "synthetic_imagenet")
DATASETS = ("cifar10", "cifar100", "svhn", "synthetic") + IMAGENET_DATASETS


def get_datasets(config) -> Tuple[Any, Any, common.DatasetInfo]:
  """(train source, test source, DatasetInfo) for config.dataset / config.npz_path (a
  non-empty npz_path takes precedence over the dataset's name)."""
  dataset = getattr(config, "dataset", "cifar10")
  npz_path = getattr(config, "npz_path", "") or ""
  if dataset not in DATASETS:
    raise ValueError(f"config.dataset={dataset!r} is unknown: use one of {', '.join(DATASETS)} "
                     "(or --config.npz_path=FILE.npz for local arrays)")
  validate.check_int("config.num_classes", getattr(config, "num_classes", None), minimum=1)
  if dataset in IMAGENET_DATASETS and not npz_path:
    return imagenet.get_datasets(config)
  return in_memory.get_datasets(config)

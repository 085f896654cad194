"""ImageNet input (DESIGN.md section 5): TFDS imagenet2012, or ImageNet-shaped synthetic images.

Examples are images of any size (uint8 [h, w, 3]) read at random from a source that holds
nothing in memory: TFDS's ArrayRecord data source (`tfds.data_source`, the JPEGs decoded by
TFDS when an example is read), or synthetic images computed from (seed, index). Batches are
built with grain as in one_jax.data.in_memory, with the same guarantees: the order of an epoch and
the augmentation of every example depend only on (seed, epoch, position in the epoch), never
on the number of processes (process p of P, jax.process_index() of jax.process_count(), reads
rows [p * local, (p + 1) * local) of each global batch), and resuming at step k of an
epoch yields batches k, k + 1, ... Reading, JPEG decoding and augmentation run per batch in
grain worker processes (`workers`), each up to `prefetch` batches ahead; memory is bounded
by those buffers.

Augmentation is torchvision's ImageNet recipe: RandomResizedCrop(size, scale (0.08, 1),
ratio (3/4, 4/3), bilinear) + RandomHorizontalFlip for training; Resize(size / 0.875) of the
shorter side + CenterCrop(size) for evaluation (256 and 224 at size 224). Normalisation uses
ImageNet's mean and std.
"""
import dataclasses
import math
from typing import Iterator, Optional, Tuple

import grain
import numpy as np
from PIL import Image

from one_jax import cli, validate
from one_jax.data import common

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
NUM_CLASSES = 1000
TFDS_NAME = "imagenet2012"
TFDS_SPLITS = ("train", "validation")
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CENTER_CROP_FRACTION = 0.875   # 224 of 256
DEFAULT_IMAGE_SIZE = 224

_MANUAL_DOWNLOAD = (
    "download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from image-net.org into "
    "TFDS's manual directory ({where}/downloads/manual), then run `tfds build imagenet2012 "
    "--file_format=array_record --data_dir={where}` once (it needs tensorflow), or train on "
    "--config.dataset=synthetic_imagenet")


# ---------------------------------------------------------------------------------------------
# Per-example transforms (torchvision's, on PIL images).


def resize_for_eval(image_size: int) -> int:
  """The shorter side an evaluation image is resized to before the centre crop (256 for 224)."""
  return int(round(image_size / CENTER_CROP_FRACTION))


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale=CROP_SCALE, ratio=CROP_RATIO) -> Tuple[int, int, int, int]:
  """(top, left, h, w) of torchvision's RandomResizedCrop.get_params with draws from rng.

  Up to 10 tries of an area fraction in `scale` and a log-uniform aspect ratio in `ratio`;
  when none fits, the centre crop with the aspect ratio clamped into `ratio`.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _pil(image) -> Image.Image:
  image = np.asarray(image, np.uint8)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  pil = Image.fromarray(image)
  return pil if pil.mode == "RGB" else pil.convert("RGB")


def train_image(image, image_size: int, rng: np.random.Generator) -> np.ndarray:
  """RandomResizedCrop(image_size) + RandomHorizontalFlip: uint8 [image_size, image_size, 3]."""
  pil = _pil(image)
  top, left, h, w = random_resized_crop_box(pil.height, pil.width, rng)
  # torchvision's resized_crop on PIL images: crop, then resize the crop (its edges clamp).
  out = np.asarray(pil.crop((left, top, left + w, top + h)).resize((image_size, image_size),
                                                                   Image.BILINEAR))
  return out[:, ::-1] if rng.random() < 0.5 else out


def eval_image(image, image_size: int) -> np.ndarray:
  """Resize(shorter side to resize_for_eval) + CenterCrop(image_size), as torchvision does."""
  pil = _pil(image)
  size = resize_for_eval(image_size)
  w, h = pil.width, pil.height
  if w <= h:
    new_w, new_h = size, int(size * h / w)
  else:
    new_w, new_h = int(size * w / h), size
  out = np.asarray(pil.resize((new_w, new_h), Image.BILINEAR))
  top = int(round((new_h - image_size) / 2.0))
  left = int(round((new_w - image_size) / 2.0))
  return out[top:top + image_size, left:left + image_size]


def normalize(images: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32 (x / 255 - MEAN) / STD."""
  std = np.asarray(STD, np.float32)
  out = np.multiply(images, np.float32(1.0 / 255.0) / std, dtype=np.float32)
  out -= np.asarray(MEAN, np.float32) / std
  return out


# ---------------------------------------------------------------------------------------------
# Sources.


class SyntheticImages:
  """ImageNet-shaped synthetic examples, each computed from (seed, split, index) when read.

  Images have sizes between image_size and 1.5 x image_size on each side (so the crops and
  resizes of the real pipeline do real work); the class is a smooth colour layout (a 4 x 4
  random grid per class, bilinearly upsampled) under pixel noise, learnable from the crops.
  Nothing is stored: any number of examples costs no memory.
  """

  def __init__(self, num_examples: int, num_classes: int, seed: int, split: int,
               image_size: int):
    self.num_examples = validate.check_int(
        f"config.synthetic_{('train', 'test')[min(split, 1)]}_size", num_examples, minimum=1)
    self.num_classes = num_classes
    self.word = common.seed_word(seed)
    self.split = split
    self.image_size = image_size

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {self.num_examples} examples")
    label = index % self.num_classes
    grid = np.random.default_rng([self.word, 0, label]).normal(size=(4, 4, 3))
    rng = np.random.default_rng([self.word, 1 + self.split, index])
    h, w = rng.integers(self.image_size, self.image_size * 3 // 2 + 1, size=2)
    up_h, up_w = common.linear_upsampling(4, int(h)), common.linear_upsampling(4, int(w))
    image = 128.0 + 40.0 * np.einsum("hi,ijc,wj->hwc", up_h, grid, up_w)
    image += rng.normal(scale=32.0, size=image.shape)
    return {"image": np.clip(np.round(image), 0, 255).astype(np.uint8), "label": label}


@dataclasses.dataclass
class ImageNetSource:
  """Examples of any image size and how to batch them (in_memory.train_batches and
  eval_batches hand a source with `train_batches` / `eval_batches` over to it).

  examples: a random-access source (TFDS data source or SyntheticImages) of
  {'image': uint8 [h, w, 3], 'label': int, ...}; image_size: the model's input side;
  workers: grain worker processes reading, decoding and augmenting batches (0: threads of
  this process).
  """
  examples: object
  image_size: int = DEFAULT_IMAGE_SIZE
  workers: int = 0

  def __len__(self) -> int:
    return len(self.examples)

  def __getitem__(self, index: int) -> dict:
    example = self.examples[int(index)]
    return {"image": np.asarray(example["image"], np.uint8), "label": int(example["label"])}

  def read(self, indices) -> list:
    """The examples of `indices` (a TFDS source decodes their JPEGs here)."""
    return [self.examples[int(i)] for i in indices]

  def train_batches(self, **kwargs) -> Iterator[dict]:
    return train_batches(self, **kwargs)

  def eval_batches(self, **kwargs) -> Iterator[dict]:
    return eval_batches(self, **kwargs)


# ---------------------------------------------------------------------------------------------
# Datasets from a config.


def get_datasets(config):
  """(train source, test source, common.DatasetInfo) for an ImageNet dataset config:
  'imagenet2012' from TFDS (train and validation splits) or 'synthetic_imagenet'."""
  dataset = config.dataset
  num_classes = config.num_classes
  image_size = validate.check_int("config.image_size", config.get("image_size", 224),
                                       minimum=validate.MIN_IMAGE_SIZE)
  workers = validate.check_int("config.data_workers", config.get("data_workers", 0),
                                    minimum=0)
  if dataset == "synthetic_imagenet":
    seed = config.get("seed", 0)
    train, test = (SyntheticImages(config.get(f"synthetic_{split}_size"), num_classes, seed, tag,
                                   image_size) for tag, split in enumerate(("train", "test")))
  else:
    if num_classes != NUM_CLASSES:
      raise ValueError(f"config.num_classes={num_classes} but {TFDS_NAME} has {NUM_CLASSES} "
                       f"classes: set --config.num_classes={NUM_CLASSES}")
    train, test = (load_tfds(split, config.get("data_dir", "") or None)
                   for split in TFDS_SPLITS)
  train, test = (ImageNetSource(s, image_size, workers) for s in (train, test))
  if not len(train) or not len(test):
    raise ValueError(f"dataset {dataset!r} has {len(train)} training and {len(test)} test "
                     "examples: both splits need at least one")
  info = common.DatasetInfo(name=dataset, num_classes=num_classes, num_train=len(train),
                                    num_test=len(test), image_shape=(image_size, image_size, 3))
  return train, test, info


def load_tfds(split: str, data_dir: Optional[str] = None):
  """The TFDS ArrayRecord data source of an imagenet2012 split (JPEGs decoded when read).

  ImageNet cannot be downloaded by a program: a missing dataset is one ValueError line
  saying how to prepare it from the manual download.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow, optional)
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.get_absl_logger().addFilter(common.quiet_tfds)
  where = data_dir or tfds.core.constants.DATA_DIR
  try:
    return tfds.data_source(TFDS_NAME, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # pylint: disable=broad-except  (tfds raises many types here)
    cause = cli.first_line(e)
  try:
    prepared = tfds.builder(TFDS_NAME, data_dir=data_dir).is_prepared()
  except Exception:  # pylint: disable=broad-except
    prepared = False
  if not prepared:
    raise ValueError(f"TFDS dataset {TFDS_NAME!r} is not prepared under {where}: "
                     f"{_MANUAL_DOWNLOAD.format(where=where)}")
  raise ValueError(f"TFDS dataset {TFDS_NAME!r} (split {split!r}) under {where} cannot be read "
                   f"in ArrayRecord format ({cause}): prepare it with `tfds build {TFDS_NAME} "
                   f"--file_format=array_record --data_dir={where}`")


# ---------------------------------------------------------------------------------------------
# Batching.


def train_batches(source: ImageNetSource, *, global_batch: int, seed: int, epoch: int,
                  start_step: int = 0, process_index: int = 0, process_count: int = 1,
                  augment: bool = True, num_threads: Optional[int] = None,
                  prefetch: int = 4) -> Iterator[dict]:
  """This process's rows of the training batches start_step, ... of `epoch`, as
  in_memory.train_batches: {'image': float32 [local, S, S, 3], 'label': int32 [local]}.

  Each example's crop and flip come from its own generator seeded by (seed, epoch, position
  in the epoch). augment=False gives the evaluation transform instead.
  """
  local = common.check_sharding(global_batch, process_index, process_count)
  word = common.seed_word(seed)
  first_row = process_index * local
  size = source.image_size

  def make_batch(step: int, ids: np.ndarray) -> dict:
    examples = source.read(ids[first_row:first_row + local])
    images = np.empty((local, size, size, 3), np.uint8)
    for row, example in enumerate(examples):
      position = step * global_batch + first_row + row
      if augment:
        rng = np.random.default_rng([word, int(epoch), 1, position])
        images[row] = train_image(example["image"], size, rng)
      else:
        images[row] = eval_image(example["image"], size)
    labels = np.array([int(e["label"]) for e in examples], np.int32)
    return {"image": normalize(images), "label": labels}

  ds = common.epoch_steps(len(source), make_batch, global_batch=global_batch, seed=seed,
                          epoch=epoch, start_step=start_step)
  return _iterate(ds, source, num_threads, prefetch)


def eval_batches(source: ImageNetSource, *, global_batch: int, process_index: int = 0,
                 process_count: int = 1, num_threads: Optional[int] = None,
                 prefetch: int = 4) -> Iterator[dict]:
  """Every example once, in order, as in_memory.eval_batches (padding rows: mask 0)."""
  local = common.check_sharding(global_batch, process_index, process_count)
  n = len(source)
  first_row = process_index * local
  size = source.image_size

  def make_batch(step: int) -> dict:
    start = step * global_batch + first_row
    ids = np.arange(start, min(start + local, n))
    images = np.zeros((local, size, size, 3), np.uint8)
    labels = np.zeros((local,), np.int32)
    for row, example in enumerate(source.read(ids) if len(ids) else []):
      images[row] = eval_image(example["image"], size)
      labels[row] = int(example["label"])
    mask = (np.arange(local) < len(ids)).astype(np.float32)
    return {"image": normalize(images), "label": labels, "mask": mask}

  ds = grain.MapDataset.range(common.num_eval_steps(n, global_batch)).map(make_batch)
  return _iterate(ds, source, num_threads, prefetch)


def _iterate(ds, source: ImageNetSource, num_threads, prefetch) -> Iterator[dict]:
  """Batches in order: computed in source.workers processes (each `prefetch` batches ahead),
  or, with 0 workers, in num_threads threads of this process (default 4: reads wait on I/O)."""
  if num_threads is None:
    num_threads = 4
  if num_threads < 0 or prefetch < 0:
    raise ValueError(f"num_threads={num_threads} and prefetch={prefetch} must be >= 0")
  if not source.workers:
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                     prefetch_buffer_size=prefetch)))
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():  # grain reads its absl flags when it starts workers
    flags.FLAGS.mark_as_parsed()   # (the command line has parsed them; library use: defaults)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  options = grain.MultiprocessingOptions(num_workers=source.workers,
                                         per_worker_buffer_size=max(1, prefetch))
  return iter(it.mp_prefetch(options))

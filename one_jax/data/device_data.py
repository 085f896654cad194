"""The train set in device memory: uint8 images on every device, augmented inside the step.

With `data_on_device` the host sends per step only what in_memory.train_plans draws
(example ids, crop offsets, flips: a few bytes per example) and the jitted step gathers,
pads, crops, flips and normalises on the device. The result is bit for bit the batch
in_memory.train_batches builds on the host: the same draws, integer crops, and the
normalisation read from a [256, 3] table that numpy's own `normalize` computed (a multiply-add
on the device could be fused into one rounding and differ in the last bit).

'auto' keeps the set on the device when it is an in-memory one (synthetic, .npz, the decoded
TFDS sets) of at most MAX_AUTO_BYTES and at most a quarter of one device's memory (where the
device reports it). The set is replicated: every device holds all of it; each device gathers
its own rows of every batch (multi-process runs too: every process feeds its rows' ids).
"""
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from one_jax import parallel
from one_jax.data import in_memory

MODES = ("auto", "true", "false")
MAX_AUTO_BYTES = 2 * 1024**3   # CIFAR-10/100 train: 150 MB; SVHN train + extra would be ~2 GB


def use_device_data(mode: str, source, device=None) -> bool:
  """Whether to keep the train set on the device, for config.data_on_device = mode.

  device: the device whose memory is asked (default: this process's first; only addressable
  devices report memory, so never a device of another process)."""
  if mode not in MODES:
    raise ValueError(f"data_on_device={mode!r} is unknown: use one of {', '.join(MODES)}")
  resident = isinstance(source, in_memory.ArraySource)
  if mode == "true":
    if not resident:
      raise ValueError("data_on_device='true' needs an in-memory train set (synthetic, an .npz "
                       "or a decoded TFDS set): use --config.data_on_device=auto or false")
    return True
  if mode == "false" or not resident:
    return False
  size = source.images.nbytes + source.labels.nbytes
  limit = MAX_AUTO_BYTES
  stats = (device or jax.local_devices()[0]).memory_stats() or {}
  if stats.get("bytes_limit"):
    limit = min(limit, stats["bytes_limit"] // 4)
  return size <= limit


def put(source: "in_memory.ArraySource", mesh) -> Dict[str, jax.Array]:
  """{'image': uint8 [N, H, W, 3], 'label': int32 [N]} replicated over the mesh."""
  return parallel.replicate({"image": source.images, "label": source.labels}, mesh)


def _normalize_table() -> np.ndarray:
  """[256, 3] float32: in_memory.normalize of every pixel value in every channel."""
  return in_memory.normalize(np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1))


def augment(data: Dict[str, jax.Array], plan: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
  """This device's batch {'image': float32 normalised, 'label'} from its rows of a plan (a
  plan of several views, in_memory.train_plans' views > 1, gives 'image' [n, views, H, W, 3])."""
  images = data["image"][plan["index"]]
  n, h, w, c = images.shape
  pad = in_memory.CROP_PADDING
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def crop_flip(offsets, flips):
    crop = jax.vmap(lambda im, off: jax.lax.dynamic_slice(im, (off[0], off[1], 0), (h, w, c)))
    cropped = crop(padded, offsets)
    return jnp.where(flips[:, None, None, None], cropped[:, :, ::-1], cropped)

  if plan["flip"].ndim == 2:   # [n, views]: one crop and flip per view
    images = jnp.stack([crop_flip(plan["offset"][:, v], plan["flip"][:, v])
                        for v in range(plan["flip"].shape[1])], axis=1)
  else:
    images = crop_flip(plan["offset"], plan["flip"])
  table = jnp.asarray(_normalize_table())
  normalised = jnp.take_along_axis(table, images.reshape(-1, c).astype(jnp.int32), axis=0)
  return {"image": normalised.reshape(images.shape), "label": data["label"][plan["index"]]}

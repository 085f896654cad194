"""The training pipeline against the reference's torchvision transforms and DataLoader.

The reference trains on
    Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(), ToTensor(),
             Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))])
with DataLoader(trainset, batch_size=128, shuffle=True) (drop_last=False by default).
torchvision cannot be installed beside this torch build, so its documented semantics are
written in torch ops in tests/torch_reference.py (from torchvision/transforms/transforms.py
and functional.py):
  RandomCrop.forward: F.pad(img, padding, fill=0, padding_mode='constant') on the uint8
    image, then get_params draws i = randint(0, h - th + 1) (top) and j = randint(0, w - tw
    + 1) (left) and F.crop(img, i, j, th, tw): offsets uniform on 0..2 * padding;
  RandomHorizontalFlip.forward: F.hflip(img) if torch.rand(1) < p (p = 0.5), i.e. img[..., ::-1];
  ToTensor: uint8 HWC -> float CHW divided by 255; Normalize: (x - mean) / std per channel.
"""
import numpy as np
import torch
from scipy import stats

from one_jax.data import common, in_memory
from tests import torch_reference as tr

MEAN = (0.4914, 0.4822, 0.4465)    # the reference's transforms.Normalize arguments
STD = (0.2023, 0.1994, 0.2010)
PADDING = 4
SIZE = 32


def test_normalisation_constants_are_the_references():
  assert in_memory.MEAN == MEAN == tr.MEAN and in_memory.STD == STD == tr.STD
  assert in_memory.CROP_PADDING == PADDING == tr.CROP_PADDING


def test_crop_flip_normalise_equal_torchvision_for_given_draws():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(40, SIZE, SIZE, 3), dtype=np.uint8)
  offsets = rng.integers(0, 2 * PADDING + 1, size=(40, 2))
  offsets[:4] = [[0, 0], [0, 8], [8, 0], [8, 8]]   # every extreme: padding on two sides
  flips = rng.random(40) < 0.5
  flips[:4] = [False, True, False, True]
  got = in_memory.normalize(in_memory.random_crop_flip(images, offsets, flips))
  for k in range(len(images)):
    want = tr.crop_flip_normalize(images[k], int(offsets[k, 0]), int(offsets[k, 1]),
                                  bool(flips[k])).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got[k], want, rtol=0, atol=2e-6, err_msg=f"image {k}")
  # The padding is black before normalisation: (0 - mean) / std in every channel.
  np.testing.assert_allclose(got[0, 0, 0], -np.asarray(MEAN) / np.asarray(STD), atol=2e-6)


def test_test_images_are_only_normalised():
  image = np.random.default_rng(1).integers(0, 256, size=(1, SIZE, SIZE, 3), dtype=np.uint8)
  want = tr.test_transform(image[0]).permute(1, 2, 0).numpy()
  np.testing.assert_allclose(in_memory.normalize(image)[0], want, rtol=0, atol=2e-6)


# ----------------------------------------------------------------------------- distribution


def _coordinate_images(n):
  """Images whose red/green values are row + 1 / column + 1 (0 only in the padding)."""
  rows, cols = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
  image = np.stack([rows + 1, cols + 1, np.full_like(rows, 200)], axis=-1).astype(np.uint8)
  return np.broadcast_to(image, (n,) + image.shape).copy()


def _decode_draws(batch_images):
  """(top, left, flip) of each augmented coordinate image, read back from its pixels."""
  pixels = np.rint((batch_images * np.asarray(STD) + np.asarray(MEAN)) * 255).astype(int)
  red, green = pixels[:, 16, 16, 0], pixels[:, 16, 16:18, 1]
  flip = green[:, 1] < green[:, 0]   # columns run backwards in a mirrored crop
  # Output row 16 shows padded row 16 + top, i.e. source row 12 + top; output column 16 shows
  # cropped column 16 (15 when mirrored), i.e. source column 12 + left (11 + left).
  top = red - 1 - 12
  left = np.where(flip, green[:, 0] - 1 - 11, green[:, 0] - 1 - 12)
  return top, left, flip


def _draws(num_examples=512, batch=64, epochs=6):
  source = in_memory.ArraySource(_coordinate_images(num_examples),
                                      np.zeros(num_examples, np.int32))
  tops, lefts, flips = [], [], []
  for epoch in range(epochs):
    for b in in_memory.train_batches(source, global_batch=batch, seed=7, epoch=epoch,
                                          num_threads=0):
      t, l, f = _decode_draws(b["image"])
      tops.append(t)
      lefts.append(l)
      flips.append(f)
  return np.concatenate(tops), np.concatenate(lefts), np.concatenate(flips)


def _uniform_p(values, k):
  """p-value of a chi-square goodness-of-fit test of `values` against uniform on 0..k-1."""
  counts = np.bincount(values, minlength=k)
  assert len(counts) == k, f"values outside 0..{k - 1}: {np.unique(values)}"
  return stats.chisquare(counts).pvalue


P_MIN = 1e-3   # with the fixed seed the test is deterministic; a real bias gives p ~ 0


def test_offsets_and_flips_are_distributed_as_torchvision():
  top, left, flip = _draws()
  n = len(top)
  assert n == 6 * 512
  assert top.min() >= 0 and top.max() <= 8 and left.min() >= 0 and left.max() <= 8
  assert _uniform_p(top, 9) > P_MIN and _uniform_p(left, 9) > P_MIN
  # Joint uniformity on the 81 (top, left) cells: offsets independent across the axes.
  assert _uniform_p(top * 9 + left, 81) > P_MIN
  # Flip probability 0.5, independent of the offsets.
  assert stats.binomtest(int(flip.sum()), n, 0.5).pvalue > P_MIN
  table = np.stack([np.bincount(top[flip], minlength=9), np.bincount(top[~flip], minlength=9)])
  assert stats.chi2_contingency(table).pvalue > P_MIN
  # The statistics have the power to see the classic mistakes: offsets on 0..7 (an exclusive
  # upper bound), or the crop and flip drawn from one number.
  rng = np.random.default_rng(0)
  assert _uniform_p(rng.integers(0, 8, n), 9) < 1e-6
  coupled = rng.integers(0, 9, n)
  coupled_table = np.stack([np.bincount(coupled[coupled < 4], minlength=9),
                            np.bincount(coupled[coupled >= 4], minlength=9)])
  assert stats.chi2_contingency(coupled_table + 1).pvalue < 1e-6


def test_the_reference_transform_draws_the_same_distribution():
  """tests/torch_reference.train_transform (the PyTorch trainer's augmentation) passes too."""
  image = _coordinate_images(1)[0]
  g = torch.Generator().manual_seed(0)
  out = np.stack([tr.train_transform(image, g).permute(1, 2, 0).numpy() for _ in range(2000)])
  top, left, flip = _decode_draws(out)
  assert _uniform_p(top * 9 + left, 81) > P_MIN
  assert stats.binomtest(int(flip.sum()), len(flip), 0.5).pvalue > P_MIN


# ----------------------------------------------------------------------------- epochs


def test_an_epoch_covers_each_example_at_most_once_dropping_the_last_partial_batch():
  """Each epoch is a permutation cut into full batches: n // batch steps, the n % batch
  examples left over are dropped (a different few each epoch). The reference's DataLoader
  keeps them as a last, smaller batch (drop_last=False); one_jax deliberately does not (fixed
  shapes: one compiled step, and a global batch that splits evenly over devices)."""
  n, batch = 50, 8
  source = in_memory.ArraySource(np.zeros((n, 4, 4, 3), np.uint8), np.arange(n))
  assert common.steps_per_epoch(n, batch) == n // batch
  dropped = []
  for epoch in range(4):
    seen = np.concatenate([b["label"] for b in in_memory.train_batches(
        source, global_batch=batch, seed=0, epoch=epoch, augment=False, num_threads=0)])
    assert len(seen) == (n // batch) * batch
    assert len(np.unique(seen)) == len(seen), "an example was seen twice in one epoch"
    dropped.append(frozenset(range(n)) - frozenset(seen.tolist()))
  assert all(len(d) == n % batch for d in dropped)
  assert len(set(dropped)) > 1   # not always the same examples
  # The reference's loader on the same data: ceil(n / batch) batches, every example once.
  loader = torch.utils.data.DataLoader(torch.arange(n), batch_size=batch, shuffle=True)
  sizes = [len(b) for b in loader]
  assert len(sizes) == -(-n // batch) and sizes[-1] == n % batch and sum(sizes) == n

"""Tests of the input pipeline: sources, validation, sharding, resume, augmentation."""
import io
import re
import socket

import chex
import ml_collections
import numpy as np
import pytest
from PIL import Image

from one_jax.data import common, in_memory, sources


def _config(**overrides):
  config = ml_collections.ConfigDict(dict(
      dataset="cifar10", npz_path="", data_dir="", synthetic_train_size=96,
      synthetic_test_size=40, num_classes=10, seed=0))
  config.update(overrides)
  return config


def _arrays(n_train=24, n_test=10, num_classes=10, shape=(32, 32, 3), seed=0):
  rng = np.random.default_rng(seed)
  return dict(x_train=rng.integers(0, 256, (n_train,) + shape, dtype=np.uint8),
              y_train=rng.integers(0, num_classes, n_train),
              x_test=rng.integers(0, 256, (n_test,) + shape, dtype=np.uint8),
              y_test=rng.integers(0, num_classes, n_test))


def _write_npz(tmp_path, name="data.npz", **arrays):
  path = str(tmp_path / name)
  np.savez(path, **arrays)
  return path


def _indexed_source(n, shape=(32, 32, 3)):
  """An ArraySource whose label is the example index and whose pixels encode it too."""
  images = np.empty((n,) + shape, np.uint8)
  images[...] = (np.arange(n) % 251 + 1)[:, None, None, None]   # never 0 (the padding value)
  return in_memory.ArraySource(images, np.arange(n))


def _single_line_error(excinfo):
  message = str(excinfo.value)
  assert "\n" not in message, message
  return message


# ---------------------------------------------------------------------------------------------
# Normalisation and augmentation.


def test_normalisation_constants_and_formula():
  assert in_memory.MEAN == (0.4914, 0.4822, 0.4465)
  assert in_memory.STD == (0.2023, 0.1994, 0.2010)
  x = np.arange(256, dtype=np.uint8)[:, None].repeat(3, axis=1).reshape(16, 16, 3)
  y = in_memory.normalize(x)
  assert y.dtype == np.float32
  expected = (x / 255.0 - np.array(in_memory.MEAN)) / np.array(in_memory.STD)
  chex.assert_trees_all_close(y, expected.astype(np.float32), atol=1e-5)


def test_random_crop_flip_matches_pad_crop_mirror():
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, (3, 6, 5, 3), dtype=np.uint8)
  offsets = np.array([[4, 4], [0, 0], [8, 3]])
  flips = np.array([False, True, True])
  out = in_memory.random_crop_flip(images, offsets, flips, padding=4)
  padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
  chex.assert_trees_all_equal(out[0], images[0])                      # centre crop, no flip
  chex.assert_trees_all_equal(out[1], padded[1, 0:6, 0:5][:, ::-1])   # corner crop, mirrored
  chex.assert_trees_all_equal(out[2], padded[2, 8:14, 3:8][:, ::-1])


# ---------------------------------------------------------------------------------------------
# .npz sources.


def test_npz_round_trip(tmp_path):
  arrays = _arrays()
  arrays["y_test"] = arrays["y_test"][:, None]   # [N, 1] labels (keras layout) are accepted
  path = _write_npz(tmp_path, **arrays)
  train, test, info = sources.get_datasets(_config(npz_path=path))
  assert info == common.DatasetInfo(name="data", num_classes=10, num_train=24, num_test=10,
                                image_shape=(32, 32, 3))
  assert len(train) == 24 and len(test) == 10
  chex.assert_trees_all_equal(np.stack([train[i]["image"] for i in range(24)]), arrays["x_train"])
  assert [train[i]["label"] for i in range(24)] == arrays["y_train"].tolist()
  assert [test[i]["label"] for i in range(10)] == arrays["y_test"][:, 0].tolist()
  assert isinstance(train[0]["label"], int) and train[0]["image"].dtype == np.uint8


def test_array_source_is_read_only_and_checks_lengths():
  images = np.zeros((4, 8, 8, 3), np.uint8)
  source = in_memory.ArraySource(images, np.arange(4))
  assert not source.images.flags.writeable and images.flags.writeable   # caller's array untouched
  with pytest.raises(ValueError, match="4 images but 3 labels"):
    in_memory.ArraySource(images, np.arange(3))


def test_npz_path_takes_precedence_over_dataset(tmp_path):
  path = _write_npz(tmp_path, **_arrays(num_classes=3))
  _, _, info = sources.get_datasets(_config(dataset="synthetic", npz_path=path, num_classes=3))
  assert (info.num_train, info.num_classes) == (24, 3)


def test_npz_any_image_size(tmp_path):
  path = _write_npz(tmp_path, **_arrays(shape=(24, 20, 3)))
  train, test, info = sources.get_datasets(_config(npz_path=path))
  assert info.image_shape == (24, 20, 3)
  batch = next(in_memory.train_batches(train, global_batch=8, seed=0, epoch=0))
  chex.assert_shape(batch["image"], (8, 24, 20, 3))
  batch = next(in_memory.eval_batches(test, global_batch=16))
  chex.assert_shape(batch["image"], (16, 24, 20, 3))


def _bad_npz_cases():
  """(name, arrays or None, num_classes, fragments the one-line message must contain)."""
  good = _arrays()
  nchw = dict(good, x_train=good["x_train"].transpose(0, 3, 1, 2))
  return [
      ("missing_keys", {k: v for k, v in good.items() if k != "y_test"}, 10,
       ["lacks y_test", "x_train, y_train, x_test, y_test"]),
      ("grayscale", dict(good, x_train=good["x_train"][..., 0]), 10,
       ["x_train has shape (24, 32, 32)", "[N, H, W, 3]", "RGB"]),
      ("nchw", nchw, 10, ["x_train has shape (24, 3, 32, 32)", "NHWC"]),
      ("float_images", dict(good, x_test=good["x_test"] / 255.0), 10,
       ["x_test has dtype float64", "uint8"]),
      ("labels_too_large", dict(good, y_train=np.full(24, 12)), 10,
       ["y_train has labels in [12, 12] but num_classes=10", "--config.num_classes=13"]),
      ("negative_labels", dict(good, y_test=np.full(10, -1)), 10,
       ["y_test has labels in [-1, -1]", "[0, num_classes)", "start at 0"]),
      ("mismatched_lengths", dict(good, y_train=good["y_train"][:20]), 10,
       ["x_train has 24 images but y_train has 20 labels"]),
      ("float_labels", dict(good, y_train=good["y_train"].astype(np.float32)), 10,
       ["y_train has dtype float32", "integer class indices"]),
      ("one_hot_labels", dict(good, y_test=np.eye(10, dtype=np.int64)[good["y_test"]]), 10,
       ["y_test has shape (10, 10)", "argmax"]),
      ("empty_split", dict(good, x_test=good["x_test"][:0], y_test=good["y_test"][:0]), 10,
       ["x_test holds no images"]),
      ("split_shapes_differ", dict(good, x_test=good["x_test"][:, :28, :28]), 10,
       ["x_train images are (32, 32, 3) but x_test images are (28, 28, 3)"]),
      ("missing_file", None, 10, ["does not exist", ".npz"]),
  ]


@pytest.mark.parametrize("name,arrays,num_classes,fragments", _bad_npz_cases(),
                         ids=[c[0] for c in _bad_npz_cases()])
def test_npz_validation_errors(tmp_path, name, arrays, num_classes, fragments):
  path = str(tmp_path / "absent.npz") if arrays is None else _write_npz(tmp_path, **arrays)
  with pytest.raises(ValueError) as excinfo:
    sources.get_datasets(_config(npz_path=path, num_classes=num_classes))
  message = _single_line_error(excinfo)
  for fragment in fragments:
    assert fragment in message, (name, message)


def test_npz_that_is_not_an_npz(tmp_path):
  path = tmp_path / "notes.npz"
  path.write_text("not a zip file")
  with pytest.raises(ValueError, match="is not a readable .npz") as excinfo:
    sources.get_datasets(_config(npz_path=str(path)))
  _single_line_error(excinfo)
  np.save(tmp_path / "one.npy", np.zeros(3))
  with pytest.raises(ValueError, match="single array"):
    in_memory.load_npz(str(tmp_path / "one.npy"), 10)


# ---------------------------------------------------------------------------------------------
# The packed JPEG layout (the CIFAR-10 copy the benchmarks used).


def _jpeg(image):
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", quality=95)
  return np.frombuffer(buffer.getvalue(), np.uint8)


def _packed_split(images):
  blobs = [_jpeg(x) for x in images]
  offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
  return np.concatenate(blobs), offsets


def test_packed_jpeg_npz(tmp_path):
  # Smooth images survive JPEG nearly unchanged; noise would not.
  ramp = np.linspace(40, 200, 32).astype(np.uint8)
  flat = np.full((32, 32), 90, np.uint8)
  base = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], flat), axis=-1)
  train_images = np.stack([np.roll(base, k, axis=1) for k in range(5)])
  test_images = np.stack([np.roll(base, k, axis=0) for k in range(3)])
  jpeg_train, offsets_train = _packed_split(train_images)
  jpeg_test, offsets_test = _packed_split(test_images)
  path = _write_npz(tmp_path, "packed.npz", jpeg_train=jpeg_train, offsets_train=offsets_train,
                    y_train=np.array([0, 1, 2, 3, 4], np.uint8), jpeg_test=jpeg_test,
                    offsets_test=offsets_test, y_test=np.array([4, 0, 1], np.uint8),
                    label_names=np.array(list("abcde")))
  train, test, info = sources.get_datasets(_config(npz_path=path, num_classes=5))
  assert (info.num_train, info.num_test, info.image_shape) == (5, 3, (32, 32, 3))
  decoded = np.stack([train[i]["image"] for i in range(5)])
  expected = np.stack([np.asarray(Image.open(io.BytesIO(_jpeg(x).tobytes())))
                       for x in train_images])
  chex.assert_trees_all_equal(decoded, expected)
  assert np.abs(decoded.astype(int) - train_images).mean() < 3
  assert [test[i]["label"] for i in range(3)] == [4, 0, 1]


def test_packed_jpeg_npz_errors(tmp_path):
  jpeg, offsets = _packed_split(np.zeros((2, 8, 8, 3), np.uint8))
  arrays = dict(jpeg_train=jpeg, offsets_train=offsets, y_train=np.zeros(2, np.uint8),
                jpeg_test=jpeg, offsets_test=offsets, y_test=np.zeros(2, np.uint8))
  corrupt = jpeg.copy()
  corrupt[:offsets[1]] = 7
  with pytest.raises(ValueError, match="image 0 of jpeg_train cannot be decoded") as excinfo:
    in_memory.load_npz(_write_npz(tmp_path, "a.npz", **dict(arrays, jpeg_train=corrupt)), 10)
  _single_line_error(excinfo)
  with pytest.raises(ValueError, match="jpeg_test/offsets_test are inconsistent"):
    in_memory.load_npz(_write_npz(tmp_path, "b.npz", **dict(arrays, offsets_test=offsets[::-1])), 10)
  with pytest.raises(ValueError, match=re.escape("y_train has labels in [3, 3]")):
    in_memory.load_npz(_write_npz(tmp_path, "c.npz", **dict(arrays, y_train=np.full(2, 3))), 3)


# ---------------------------------------------------------------------------------------------
# Synthetic data.


def test_synthetic_is_deterministic_balanced_and_learnable():
  config = _config(dataset="synthetic", synthetic_train_size=400, synthetic_test_size=100, seed=3)
  train, test, info = sources.get_datasets(config)
  again, _, _ = sources.get_datasets(config)
  other, _, _ = sources.get_datasets(_config(dataset="synthetic", synthetic_train_size=400, seed=4))
  assert info == common.DatasetInfo("synthetic", 10, 400, 100, (32, 32, 3))
  chex.assert_trees_all_equal((train.images, train.labels), (again.images, again.labels))
  assert not np.array_equal(train.images, other.images)
  assert train.images.dtype == np.uint8 and train.labels.dtype == np.int32
  assert np.bincount(train.labels).tolist() == [40] * 10
  assert not np.array_equal(train.images[:100], test.images)
  # Learnable: even a nearest-class-mean classifier is far above chance (10%).
  x = train.images.reshape(400, -1).astype(np.float32)
  means = np.stack([x[train.labels == c].mean(0) for c in range(10)])
  xt = test.images.reshape(100, -1).astype(np.float32)
  pred = np.argmin(((xt[:, None] - means[None]) ** 2).sum(-1), axis=1)
  assert (pred == test.labels).mean() > 0.5


@pytest.mark.parametrize("overrides,match", [
    (dict(synthetic_train_size=0), "synthetic_train_size=0"),
    (dict(num_classes=0), "num_classes=0"),
    (dict(dataset="imagenet"), "config.dataset='imagenet' is unknown"),
])
def test_config_errors(overrides, match):
  with pytest.raises(ValueError, match=re.escape(match)):
    sources.get_datasets(_config(**dict(dict(dataset="synthetic"), **overrides)))


# ---------------------------------------------------------------------------------------------
# TFDS.


def test_tfds_under_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=21, policy=tfds.testing.MockPolicy.USE_CODE):
    train, test, info = sources.get_datasets(_config(dataset="cifar100", num_classes=100))
  assert info == common.DatasetInfo("cifar100", 100, 21, 21, (32, 32, 3))
  assert isinstance(train, in_memory.ArraySource) and isinstance(test, in_memory.ArraySource)  # decoded once
  example = train[3]
  assert set(example) == {"image", "label"}
  assert example["image"].dtype == np.uint8 and 0 <= example["label"] < 100
  batches = list(in_memory.train_batches(train, global_batch=8, seed=0, epoch=0))
  assert len(batches) == 2
  chex.assert_shape(batches[0]["image"], (8, 32, 32, 3))
  assert batches[0]["label"].dtype == np.int32
  evals = list(in_memory.eval_batches(test, global_batch=8))
  assert len(evals) == 3 and sum(b["mask"].sum() for b in evals) == 21


def test_tfds_class_count_must_match():
  with pytest.raises(ValueError, match=re.escape("--config.num_classes=100")):
    sources.get_datasets(_config(dataset="cifar100", num_classes=10))


def _no_network(monkeypatch):
  attempts = []

  def no_network(*args, **kwargs):
    attempts.append(args)
    raise OSError("network disabled in this test")

  monkeypatch.setattr(socket, "getaddrinfo", no_network)
  monkeypatch.setattr(socket.socket, "connect", no_network)
  return attempts


def test_tfds_download_forbidden_fails_fast_without_network(tmp_path, monkeypatch):
  attempts = _no_network(monkeypatch)
  with pytest.raises(ValueError) as excinfo:
    sources.get_datasets(_config(dataset="cifar10", data_dir=str(tmp_path), download=False))
  message = _single_line_error(excinfo)
  for fragment in ["'cifar10'", "not prepared", str(tmp_path), "--config.download=False",
                   "--config.npz_path"]:
    assert fragment in message, message
  assert not attempts


def test_tfds_offline_download_is_one_line_with_the_fix(tmp_path, monkeypatch):
  _no_network(monkeypatch)
  with pytest.raises(ValueError) as excinfo:
    sources.get_datasets(_config(dataset="cifar10", data_dir=str(tmp_path)))
  message = _single_line_error(excinfo)
  # Either the download fails (no internet) or preparing lacks a package: both say the fix.
  assert "'cifar10'" in message and "--config.npz_path" in message, message
  assert "pip install " in message or "could not be downloaded" in message, message


def test_tfds_first_use_downloads_and_prepares(tmp_path, capsys):
  from tensorflow_datasets.testing import mocking  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  prepared = []
  with mocking.mock_data(num_examples=6):  # TFDS's double: a no-op download, fake examples
    mocked = tfds.core.DatasetBuilder.download_and_prepare

    def recording(self, *args, **kwargs):
      prepared.append((self.name, kwargs.get("file_format")))
      return mocked(self, *args, **kwargs)

    tfds.core.DatasetBuilder.download_and_prepare = recording
    try:
      train, test, info = sources.get_datasets(_config(dataset="cifar10", data_dir=str(tmp_path)))
    finally:
      tfds.core.DatasetBuilder.download_and_prepare = mocked
  assert prepared and prepared[0] == ("cifar10", "array_record")
  assert (info.num_train, info.num_test, info.image_shape) == (6, 6, (32, 32, 3))
  assert train[0]["image"].dtype == np.uint8 and 0 <= train[0]["label"] < 10
  assert f"preparing TFDS dataset 'cifar10' in {tmp_path}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Batching: steps, sharding, resume, augmentation.


def test_step_counts_and_argument_errors():
  assert common.steps_per_epoch(50000, 128) == 390
  assert common.num_eval_steps(10000, 128) == 79 and common.num_eval_steps(10000, 100) == 100
  with pytest.raises(ValueError, match="larger than the training set"):
    common.steps_per_epoch(10, 16)
  source = _indexed_source(40)
  for kwargs, match in [(dict(process_count=3), "does not divide over 3 processes"),
                        (dict(process_index=2, process_count=2), "process_index=2 is out of range"),
                        (dict(start_step=6), "start_step=6 is out of range"),
                        (dict(epoch=-1), "epoch=-1")]:
    with pytest.raises(ValueError, match=match):
      in_memory.train_batches(source, global_batch=8, seed=0, **dict(dict(epoch=0), **kwargs))
  with pytest.raises(ValueError, match="does not divide"):
    in_memory.eval_batches(source, global_batch=9, process_count=2)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_every_example_exactly_once(process_count):
  n, global_batch = 37, 8
  source = _indexed_source(n)
  local = global_batch // process_count
  per_process = [list(in_memory.eval_batches(source, global_batch=global_batch, process_index=p,
                                      process_count=process_count, num_threads=t))
                 for p, t in zip(range(process_count), (0, 2))]
  assert all(len(b) == common.num_eval_steps(n, global_batch) == 5 for b in per_process)
  seen = []
  for batches in per_process:
    for batch in batches:
      chex.assert_shape([batch["image"], batch["label"], batch["mask"]],
                        [(local, 32, 32, 3), (local,), (local,)])
      assert batch["mask"].dtype == np.float32 and batch["label"].dtype == np.int32
      real = batch["mask"] == 1
      seen += batch["label"][real].tolist()
      chex.assert_trees_all_close(batch["image"][real],
                                  in_memory.normalize(source.images[batch["label"][real]]))
      chex.assert_trees_all_close(batch["image"][~real],
                                  in_memory.normalize(np.zeros((int((~real).sum()), 32, 32, 3), np.uint8)))
  assert sorted(seen) == list(range(n))
  if process_count == 2:   # process p holds rows [p * local, (p + 1) * local) of each global batch
    assert per_process[0][0]["label"].tolist() == [0, 1, 2, 3]
    assert per_process[1][0]["label"].tolist() == [4, 5, 6, 7]


def _epoch(source, **kwargs):
  kwargs = dict(dict(global_batch=8, seed=0, epoch=0), **kwargs)
  return list(in_memory.train_batches(source, **kwargs))


def test_train_global_batches_do_not_depend_on_process_count():
  source = _indexed_source(50)
  single = _epoch(source, epoch=1)
  assert len(single) == common.steps_per_epoch(50, 8) == 6
  for process_count in (2, 4):
    shards = [_epoch(source, epoch=1, process_index=p, process_count=process_count)
              for p in range(process_count)]
    for step, batch in enumerate(single):
      combined = {k: np.concatenate([s[step][k] for s in shards]) for k in batch}
      chex.assert_trees_all_equal(combined, batch)


def test_train_resume_matches_tail_of_epoch_and_threads_do_not_matter():
  source = _indexed_source(50)
  full = _epoch(source, seed=5, epoch=2, num_threads=0)
  chex.assert_trees_all_equal(_epoch(source, seed=5, epoch=2, num_threads=3), full)
  for start_step in (1, 4, 6):
    chex.assert_trees_all_equal(_epoch(source, seed=5, epoch=2, start_step=start_step),
                                full[start_step:])


def test_train_order_is_a_permutation_that_changes_with_epoch_and_seed():
  source = _indexed_source(64)

  def order(**kwargs):
    return np.concatenate([b["label"] for b in _epoch(source, augment=False, **kwargs)])

  first = order(epoch=0)
  assert sorted(first.tolist()) == list(range(64))        # an epoch is a permutation
  assert not np.array_equal(first, np.arange(64))         # ... that is shuffled
  np.testing.assert_array_equal(order(epoch=0), first)    # ... deterministically
  assert not np.array_equal(order(epoch=1), first)
  assert not np.array_equal(order(epoch=0, seed=1), first)
  assert not np.array_equal(order(epoch=0, seed=-1), first)


def test_train_augmentation_is_crop_and_flip_of_the_example():
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, (32, 32, 32, 3), dtype=np.uint8)
  source = in_memory.ArraySource(images, np.arange(32))
  plain = _epoch(source, augment=False)
  augmented = _epoch(source, augment=True)
  for p, a in zip(plain, augmented):
    chex.assert_trees_all_equal(p["label"], a["label"])
    chex.assert_trees_all_close(p["image"], in_memory.normalize(images[p["label"]]))
    chex.assert_shape(a["image"], (8, 32, 32, 3))
    assert a["image"].dtype == np.float32 and a["label"].dtype == np.int32
    lo, hi = in_memory.normalize(np.array([0, 255], np.uint8)[:, None].repeat(3, 1))
    assert np.all(a["image"] >= lo - 1e-6) and np.all(a["image"] <= hi + 1e-6)
  # Recover each example's (dy, dx, flip) by search: every augmented image must be one of them.
  draws = []
  for batch in augmented:
    for label, image in zip(batch["label"], batch["image"]):
      matches = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
                 if np.allclose(image, in_memory.normalize(in_memory.random_crop_flip(
                     images[label][None], np.array([[dy, dx]]), np.array([flip]))[0]), atol=1e-5)]
      assert matches, label
      draws.append(matches[0])
  assert {d[2] for d in draws} == {False, True}
  assert len({d[:2] for d in draws}) > 10

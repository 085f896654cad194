"""Tests of the ImageNet input: torchvision's transforms, TFDS under mock data, synthetic images,
process sharding, resume, and batches built in grain worker processes."""
import ml_collections
import numpy as np
import pytest
from PIL import Image

from one_jax.data import imagenet, in_memory, sources


def _config(**overrides):
  config = ml_collections.ConfigDict(dict(
      dataset="synthetic_imagenet", num_classes=10, image_size=32, data_workers=0, seed=0,
      data_dir="", npz_path="", synthetic_train_size=48, synthetic_test_size=13))
  config.update(overrides)
  return config


def _batches(iterator):
  batches = list(iterator)
  if hasattr(iterator, "close"):
    iterator.close()
  return batches


# ---------------------------------------------------------------------------------------------
# Transforms.


def test_random_resized_crop_box_follows_torchvision():
  rng = np.random.default_rng(0)
  for _ in range(200):
    h, w = (int(v) for v in rng.integers(20, 400, size=2))
    top, left, ch, cw = imagenet.random_resized_crop_box(h, w, rng)
    assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
    if ch * cw < h * w:  # a drawn crop (not the fallback): area and aspect in range
      assert ch * cw >= 0.08 * h * w * 0.8
  # No draw fits a 1000 x 10 strip: the centre crop with the aspect clamped to 3/4.
  assert imagenet.random_resized_crop_box(1000, 10, np.random.default_rng(0)) == (493, 0, 13, 10)


def test_eval_image_is_resize_256_then_centre_crop_224():
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
  out = imagenet.eval_image(image, 224)
  resized = np.asarray(Image.fromarray(image).resize((341, 256), Image.BILINEAR))
  np.testing.assert_array_equal(out, resized[16:240, 58:282])
  assert imagenet.resize_for_eval(224) == 256
  gray = imagenet.eval_image(image[..., :1], 32)   # grayscale [h, w, 1] becomes RGB
  assert gray.shape == (32, 32, 3) and np.array_equal(gray[..., 0], gray[..., 2])


def test_train_image_crops_resizes_and_flips():
  image = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (48, 1, 3))  # x gradient
  directions = set()
  for seed in range(12):
    out = imagenet.train_image(image, 16, np.random.default_rng(seed))
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    directions.add(int(np.sign(int(out[0, -1, 0]) - int(out[0, 0, 0]))))
  assert directions == {-1, 1}   # some flipped, some not
  # torchvision's order of draws: the box, then the flip; crop, then bilinear resize.
  photo = np.random.default_rng(2).integers(0, 256, (50, 70, 3), dtype=np.uint8)
  rng = np.random.default_rng(7)
  top, left, h, w = imagenet.random_resized_crop_box(50, 70, rng)
  want = np.asarray(Image.fromarray(photo).crop((left, top, left + w, top + h)).resize(
      (24, 24), Image.BILINEAR))
  want = want[:, ::-1] if rng.random() < 0.5 else want
  np.testing.assert_array_equal(imagenet.train_image(photo, 24, np.random.default_rng(7)), want)


def test_normalize_uses_imagenet_statistics():
  x = np.full((1, 2, 2, 3), 255, np.uint8)
  expected = (1.0 - np.array(imagenet.MEAN)) / np.array(imagenet.STD)
  np.testing.assert_allclose(imagenet.normalize(x)[0, 0, 0], expected, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Sources.


def test_synthetic_images_are_lazy_and_deterministic():
  images = imagenet.SyntheticImages(1_281_167, 1000, seed=3, split=0, image_size=224)
  assert len(images) == 1_281_167     # nothing is stored
  a, b = images[1_281_166], images[1_281_166]
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["label"] == 1_281_166 % 1000
  h, w, c = a["image"].shape
  assert 224 <= h <= 336 and 224 <= w <= 336 and c == 3
  with pytest.raises(IndexError):
    images[1_281_167]


def test_tfds_imagenet_under_mock_data():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  config = _config(dataset="imagenet2012", num_classes=1000)
  with tfds.testing.mock_data(num_examples=21, policy=tfds.testing.MockPolicy.USE_CODE):
    train, test, info = sources.get_datasets(config)
    assert (info.num_train, info.num_test, info.image_shape) == (21, 21, (32, 32, 3))
    batches = _batches(in_memory.train_batches(train, global_batch=8, seed=0, epoch=0))
    evals = _batches(in_memory.eval_batches(test, global_batch=8))
  assert len(batches) == 2 and batches[0]["image"].shape == (8, 32, 32, 3)
  assert batches[0]["image"].dtype == np.float32 and batches[0]["label"].dtype == np.int32
  assert all(0 <= l < 1000 for b in batches for l in b["label"])
  assert len(evals) == 3 and sum(float(b["mask"].sum()) for b in evals) == 21


def test_imagenet_errors_are_one_line(tmp_path):
  with pytest.raises(ValueError, match=r"num_classes=10 but imagenet2012 has 1000") as e:
    sources.get_datasets(_config(dataset="imagenet2012"))
  with pytest.raises(ValueError, match=r"not prepared under .*: download "
                                       r"ILSVRC2012_img_train.tar") as e:
    sources.get_datasets(_config(dataset="imagenet2012", num_classes=1000, data_dir=str(tmp_path)))
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match=r"config.image_size=2 is invalid"):
    sources.get_datasets(_config(image_size=2))


# ---------------------------------------------------------------------------------------------
# Batches: sharding, resume, workers.


@pytest.fixture(scope="module")
def synthetic():
  train, test, _ = sources.get_datasets(_config())
  return train, test


def test_processes_read_their_rows_of_the_same_global_batches(synthetic):
  train, _ = synthetic
  whole = _batches(in_memory.train_batches(train, global_batch=12, seed=5, epoch=2))
  halves = [_batches(in_memory.train_batches(train, global_batch=12, seed=5, epoch=2, process_index=p,
                                      process_count=2)) for p in range(2)]
  assert len(whole) == 4
  for k, batch in enumerate(whole):
    for key in ("image", "label"):
      np.testing.assert_array_equal(batch[key], np.concatenate([h[k][key] for h in halves]))
  other_epoch = _batches(in_memory.train_batches(train, global_batch=12, seed=5, epoch=3))
  assert not np.array_equal(other_epoch[0]["image"], whole[0]["image"])


def test_resume_yields_the_remaining_batches(synthetic):
  train, _ = synthetic
  whole = _batches(in_memory.train_batches(train, global_batch=12, seed=1, epoch=0))
  resumed = _batches(in_memory.train_batches(train, global_batch=12, seed=1, epoch=0, start_step=2))
  assert len(resumed) == 2
  for a, b in zip(whole[2:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])


def test_eval_covers_every_example_once_over_processes(synthetic):
  _, test = synthetic
  labels = []
  for p in range(2):
    for batch in _batches(in_memory.eval_batches(test, global_batch=8, process_index=p,
                                          process_count=2)):
      labels += batch["label"][batch["mask"] > 0].tolist()
  assert sorted(labels) == sorted(test[i]["label"] for i in range(13))


def test_worker_processes_build_the_same_batches(synthetic):
  train, _ = synthetic
  in_process = _batches(in_memory.train_batches(train, global_batch=16, seed=0, epoch=0, start_step=1))
  workers = imagenet.ImageNetSource(train.examples, train.image_size, workers=1)
  in_workers = _batches(in_memory.train_batches(workers, global_batch=16, seed=0, epoch=0,
                                         start_step=1))
  assert len(in_workers) == len(in_process) == 2
  for a, b in zip(in_process, in_workers):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])

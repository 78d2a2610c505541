"""Training iterator (contract, resume, shards, workers), eval dataset, raw vs TFDS."""

import shutil

import numpy as np
import pytest

from mtaclip_jax import errors
from mtaclip_jax.config import recipes
from mtaclip_jax.data import generate
from mtaclip_jax.data import pipeline
from mtaclip_jax.data import readers
from mtaclip_jax.data import transforms

SIZE = (64, 96)
K = 6
CROP = (48, 48)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  base = tmp_path_factory.mktemp("pipe")
  generate.write_dataset("ade20k", str(base / "ade"), {"train": 6, "val": 2}, 0, SIZE, K)
  return base / "ade"


def _config(root, **kw):
  defaults = dict(
      num_classes=K,
      crop_size=CROP,
      test_scale=(192, 48),
      batch_size=2,
      max_segments=8,
      num_threads=1,
  )
  defaults.update(kw)
  return recipes.data_config(defaults.pop("name", "ade20k"), str(root), **defaults)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return len(a) == len(b) and all(
      x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
  )


def test_batch_contract(root):
  b = next(pipeline.make_train_iterator(_config(root), 0, 0, 1))
  assert b["image"].shape == (2,) + CROP + (3,) and b["image"].dtype == np.float32
  assert b["label"].shape == (2,) + CROP and b["label"].dtype == np.int32
  assert b["masks"].shape == (2, 8) + CROP and b["masks"].dtype == np.uint8
  assert b["classes"].dtype == np.int32 and b["valid"].dtype == bool
  for i in range(2):
    lab = b["label"][i]
    assert set(np.unique(lab)) <= set(range(K)) | {255}
    n = b["valid"][i].sum()
    np.testing.assert_array_equal(b["classes"][i, :n], np.unique(lab[lab != 255]))
    for t in range(n):
      np.testing.assert_array_equal(b["masks"][i, t], lab == b["classes"][i, t])
    assert b["masks"][i, n:].sum() == 0


def test_resume_gives_same_next_batches(root):
  cfg = _config(root)
  it = pipeline.make_train_iterator(cfg, 7, 0, 1)
  _take(it, 2)
  state = it.get_state()
  expected = _take(it, 4)  # crosses an epoch boundary (6 images, batch 2)
  it2 = pipeline.make_train_iterator(cfg, 7, 0, 1)
  it2.set_state(state)
  assert _same(_take(it2, 4), expected)
  other = _take(pipeline.make_train_iterator(cfg, 8, 0, 1), 6)
  fresh = _take(pipeline.make_train_iterator(cfg, 7, 0, 1), 6)
  assert not _same(other, fresh)


def test_process_shards_disjoint_and_covering(root):
  # identity transforms (no augmentation) so each output maps back to its image
  cfg = _config(root, transforms=["normalize()"], batch_size=3, crop_size=SIZE)
  src = readers.RawSource("ade20k", str(root), "train", K)
  refs = [transforms.normalize(src[i], None)["image"] for i in range(len(src))]
  seen = []
  for p in range(3):
    it = pipeline.make_train_iterator(cfg, 0, p, 3)
    mine = []
    for _ in range(2):  # one epoch of this shard (6 images / 3 processes)
      img = next(it)["image"][0]
      mine += [i for i, r in enumerate(refs) if np.array_equal(r, img)]
    assert len(mine) == 2
    seen.append(set(mine))
  assert set.union(*seen) == set(range(6)) and sum(map(len, seen)) == 6
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.make_train_iterator(_config(root, batch_size=3), 0, 0, 2)


def test_eval_dataset(root):
  ev = pipeline.make_eval_dataset(_config(root), "val")
  assert len(ev) == 2
  ex = ev[1]
  assert ex["image"].dtype == np.uint8 and ex["image"].shape == SIZE + (3,)
  assert ex["label"].dtype == np.int32 and ex["name"] == "ADE_val_00000002"
  assert [e["name"] for e in ev] == ["ADE_val_00000001", "ADE_val_00000002"]


@pytest.fixture(scope="module")
def cs_root(tmp_path_factory):
  base = tmp_path_factory.mktemp("pipe_cs")
  generate.write_dataset("cityscapes", str(base / "cs"), {"train": 4, "val": 2}, 0, SIZE, K)
  return base / "cs"


@pytest.mark.parametrize("name", ["ade20k", "cityscapes"])
def test_raw_and_tfds_identical(root, cs_root, tmp_path, name):
  r = root if name == "ade20k" else cs_root
  raw_cfg = _config(r, name=name)
  tfds_cfg = _config(r, name=name, source="tfds", tfds_dir=str(tmp_path / "tfds"))
  for split in ("train", "val"):
    a = pipeline.make_eval_dataset(raw_cfg, split)
    b = pipeline.make_eval_dataset(tfds_cfg, split)
    assert len(a) == len(b)
    for x, y in zip(a, b):
      assert x["name"] == y["name"]
      np.testing.assert_array_equal(x["image"], y["image"])
      np.testing.assert_array_equal(x["label"], y["label"])
  assert _same(
      _take(pipeline.make_train_iterator(raw_cfg, 3, 0, 1), 4),
      _take(pipeline.make_train_iterator(tfds_cfg, 3, 0, 1), 4),
  )


def test_skip_in_training_replaces_deterministically(root, tmp_path):
  bad = tmp_path / "ade"
  shutil.copytree(root, bad)
  (bad / "ADEChallengeData2016" / "images" / "training" / "ADE_train_00000004.jpg").write_bytes(b"")
  cfg = _config(bad, on_bad_sample="skip")
  a = _take(pipeline.make_train_iterator(cfg, 1, 0, 1), 4)
  b = _take(pipeline.make_train_iterator(cfg, 1, 0, 1), 4)
  assert _same(a, b)
  with pytest.raises(errors.BadSampleError, match="ADE_train_00000004.jpg: empty"):
    _take(pipeline.make_train_iterator(_config(bad), 1, 0, 1), 4)


@pytest.mark.slow
def test_multiprocess_workers_same_batches_resume_and_errors(root, tmp_path):
  cfg = _config(root)
  expected = _take(pipeline.make_train_iterator(cfg, 5, 0, 1), 5)
  cfg_w = _config(root, num_workers=2)
  it = pipeline.make_train_iterator(cfg_w, 5, 0, 1)
  got = _take(it, 2)
  state = it.get_state()
  assert _same(got, expected[:2])
  it.close()
  it = pipeline.make_train_iterator(cfg_w, 5, 0, 1)
  it.set_state(state)
  assert _same(_take(it, 3), expected[2:])
  it.close()
  bad = tmp_path / "ade"
  shutil.copytree(root, bad)
  (bad / "ADEChallengeData2016" / "images" / "training" / "ADE_train_00000002.jpg").write_bytes(
      b"garbage" * 20
  )
  it = pipeline.make_train_iterator(_config(bad, num_workers=2), 5, 0, 1)
  with pytest.raises(Exception, match="ADE_train_00000002.jpg: cannot decode image"):
    _take(it, 6)  # raises in the main process; workers do not hang
  it.close()
  # A crop larger than the images with padding disabled: the worker's CropConfigError
  # reaches the main process with its type (the CLI prints user errors in one line).
  cfg = _config(root, num_workers=2)
  cfg.transforms = [t for t in cfg.transforms if not t.startswith("pad")]
  cfg.transforms = [
      "random_crop(size=(4000, 4000))" if t.startswith("random_crop") else t for t in cfg.transforms
  ]
  it = pipeline.make_train_iterator(cfg, 5, 0, 1)
  with pytest.raises(errors.CropConfigError, match=r"ADE_train_\d+: .*pad\(size="):
    next(it)
  it.close()

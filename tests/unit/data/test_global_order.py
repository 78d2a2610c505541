"""One global data order: the global batch of a step is the same whatever the number
of processes (or the rows each loads), a run can start at any step, and one process
reads exactly the batches the per-process pipeline of earlier versions read (so their
one-process checkpoints resume exactly)."""

import grain
import numpy as np
import pytest

from mtaclip_jax.config import recipes
from mtaclip_jax.data import generate
from mtaclip_jax.data import pipeline

K = 5
BATCH = 4
STEPS = 4  # 16 samples: crosses two epochs of the 6 images


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  base = tmp_path_factory.mktemp("order")
  generate.write_dataset("ade20k", str(base / "ade"), {"train": 6, "val": 1}, 0, (64, 96), K)
  return recipes.data_config(
      "ade20k",
      str(base / "ade"),
      num_classes=K,
      crop_size=(48, 48),
      test_scale=(192, 48),
      batch_size=BATCH,
      max_segments=6,
      num_threads=1,
  )


def _batches(it, n=STEPS):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _assemble(parts, rows):
  """The global batches from each process's batches and rows."""
  order = np.argsort(np.concatenate(rows))
  return [
      {k: np.concatenate([p[s][k] for p in parts])[order] for k in parts[0][s]}
      for s in range(len(parts[0]))
  ]


@pytest.mark.parametrize(
    "rows",
    [
        [[0, 1], [2, 3]],  # 2 processes
        [[0], [1], [2], [3]],  # 4 processes, one row each
        [[0, 2], [1, 3]],  # a mesh whose devices alternate between 2 processes
    ],
)
def test_global_batch_is_the_same_for_any_split(config, rows):
  whole = _batches(pipeline.make_train_iterator(config, 3))
  parts = [_batches(pipeline.make_train_iterator(config, 3, rows=r)) for r in rows]
  for part, r in zip(parts, rows):
    assert part[0]["image"].shape[0] == len(r)
  _assert_same(_assemble(parts, rows), whole)


def test_process_i_of_n_loads_the_ith_block_of_rows(config):
  _assert_same(
      _batches(pipeline.make_train_iterator(config, 3, 1, 2)),
      _batches(pipeline.make_train_iterator(config, 3, rows=[2, 3])),
  )


def test_a_run_can_start_at_any_step(config):
  whole = _batches(pipeline.make_train_iterator(config, 3))
  _assert_same(_batches(pipeline.make_train_iterator(config, 3, start_step=2), 2), whole[2:])
  batches = pipeline.TrainBatches(config, 3, rows=[1, 3])
  batches.start_at(1)
  got = _batches(batches, 3)
  batches.close()
  _assert_same(got, [{k: v[[1, 3]] for k, v in b.items()} for b in whole[1:]])
  assert batches.num_samples == 6


def test_one_process_reads_what_the_per_process_pipeline_read(config):
  """The pipeline of earlier versions (each process shuffled its own shard) with one
  process: the same batches, so a checkpoint it wrote resumes exactly."""
  source = pipeline.make_source(config, "train")
  seed = 3
  old = grain.MapDataset.source(source)[0::1].shuffle(seed=seed).repeat()
  old = old.random_map(
      pipeline.TrainTransform(list(config.transforms), config.max_segments),
      seed=(seed * 1_000_003 + 0) % 2**32,
  ).batch(BATCH, drop_remainder=True)
  _assert_same(_batches(pipeline.make_train_iterator(config, seed)), [old[s] for s in range(STEPS)])


def test_bad_rows_are_refused(config):
  with pytest.raises(ValueError, match="not distinct rows"):
    pipeline.make_train_iterator(config, 0, rows=[0, 4])
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.make_train_iterator(config, 0, 0, 3)

"""grain pipelines: the training batches and the evaluation dataset.

Training has one global data order: the global batch of step s is a function of
(seed, s, dataset) alone. Global sample position p (step p // batch_size, row
p % batch_size) reads image `shuffle(seed + epoch)[p % N]` of epoch p // N, and its
random crop, flip and photometric changes are drawn from an RNG keyed by (seed, p).
Each process loads only the rows of each global batch that its devices hold
(`rows`), so the same images, crops and flips reach the model whatever the number of
processes, devices or micro-batches, and the position of a run in the data follows
from its step (`start_step`): a checkpoint needs no iterator state to resume, on any
topology (docs/SCALING.md).
"""

import logging

from absl import flags
import cv2
import grain
import jax
import numpy as np

from mtaclip_jax import errors
from mtaclip_jax.data import classes
from mtaclip_jax.data import readers
from mtaclip_jax.data import tfds_builder
from mtaclip_jax.data import transforms

log = logging.getLogger(__name__)


def make_source(data_config, split):
  """Random-access source of decoded, checked `{"image", "label", "name"}` examples."""
  num_classes = classes.num_classes(data_config)
  kind = data_config.get("source", "raw")
  if kind == "raw":
    return readers.RawSource(
        data_config.name,
        data_config.root,
        split,
        num_classes,
        data_config.get("on_bad_sample", "error"),
        readers.label_rules(data_config, num_classes),
    )
  if kind == "tfds":
    return tfds_builder.TfdsSource(data_config, split, num_classes)
  raise ValueError(f"config.data.source={kind!r}: expected 'raw' or 'tfds'")


class TrainTransform(grain.transforms.RandomMap):
  """The configured transform list followed by the mask targets; picklable."""

  def __init__(self, specs, max_segments):
    self.ops = transforms.parse(specs)
    self.max_segments = max_segments

  def random_map(self, element, rng):
    example = transforms.apply(self.ops, element, rng)
    return transforms.make_targets(example, self.max_segments)


def batch_rows(batch_size, process_index=None, process_count=None):
  """Rows of each global batch that process `process_index` of `process_count` loads
  when the processes split the batch in equal consecutive blocks (the layout of a
  mesh whose devices are ordered by process; the train loop asks the mesh itself,
  `sharding.process_rows`)."""
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  if batch_size % process_count:
    raise ValueError(
        f"config.data.batch_size={batch_size} is not divisible by the {process_count} processes"
    )
  per = batch_size // process_count
  return list(range(process_index * per, (process_index + 1) * per))


class _GlobalRows(grain.MapDataset):
  """Local index i -> global sample position (i // n) * batch_size + rows[i % n]
  (n = len(rows)): this process's rows of every global batch, in step order."""

  def __init__(self, parent, batch_size, rows):
    super().__init__(parent)
    self._batch, self._rows = int(batch_size), tuple(int(r) for r in rows)

  def __len__(self):
    return (len(self._parent) // self._batch) * len(self._rows)

  def _position(self, index):
    step, j = divmod(index, len(self._rows))
    return step * self._batch + self._rows[j]

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._position(index)]

  def _getitems(self, indices):
    return self._parent._getitems([self._position(i) for i in indices])  # pylint: disable=protected-access

  def __str__(self):
    return f"GlobalRows(batch_size={self._batch}, rows={list(self._rows)})"


def make_train_dataset(
    data_config, seed, process_index=None, process_count=None, split="train", rows=None
):
  """This process's batches of the global order, as a MapDataset indexed by step.

  `rows` (sorted row indices of the global batch) default to `batch_rows` of
  `process_index` of `process_count` (this process of all, when not given)."""
  if rows is None:
    rows = batch_rows(data_config.batch_size, process_index, process_count)
  return _global_order(data_config, seed, split, rows)[0]


def _global_order(data_config, seed, split, rows):
  """(the batches of `rows` in the global order, number of samples per epoch)."""
  batch = data_config.batch_size
  rows = sorted(int(r) for r in rows)
  if not rows or rows[0] < 0 or rows[-1] >= batch or len(set(rows)) != len(rows):
    raise ValueError(f"rows {rows} are not distinct rows of a batch of {batch}")
  source = make_source(data_config, split)
  # The seeds are those the single-process pipeline has always used, so a one-process
  # run sees the batches it saw before the order became global (and resumes them).
  ds = grain.MapDataset.source(source).shuffle(seed=seed % 2**32).repeat()
  ds = ds.random_map(
      TrainTransform(list(data_config.transforms), data_config.max_segments),
      seed=(seed * 1_000_003) % 2**32,
  )
  return _GlobalRows(ds, batch, rows).batch(len(rows), drop_remainder=True), len(source)


def _init_worker(worker_index, worker_count):
  """One OpenCV thread per prefetch worker: the workers already use the cores."""
  del worker_index, worker_count
  cv2.setNumThreads(1)


def make_train_iterator(
    data_config, seed, process_index=None, process_count=None, *, rows=None, start_step=0
):
  """Endless iterator of this process's training batches from global step
  `start_step` on (numpy dicts: image, label, masks, classes, valid), with
  get_state()/set_state()."""
  ds = make_train_dataset(data_config, seed, process_index, process_count, rows=rows)
  return _iterate(ds[int(start_step) :], data_config)


def _iterate(ds, data_config):
  it = ds.to_iter_dataset(
      grain.ReadOptions(
          num_threads=data_config.get("num_threads", 2),
          prefetch_buffer_size=data_config.get("prefetch", 4),
      )
  )
  workers = data_config.get("num_workers", 0)
  if workers > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (not run via app.run)
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=workers), worker_init_fn=_init_worker
    )
  return iter(it)


class TrainBatches:
  """The train loop's iterator: this process's rows of the global batches from a
  step on. Built (and the dataset checked) up front; reading starts at the first
  `next`, from the step given to `start_at` (0 unless a checkpoint was restored)."""

  def __init__(self, data_config, seed, rows):
    self._config = data_config
    if rows is None:
      rows = range(data_config.batch_size)
    self._dataset, self.num_samples = _global_order(data_config, seed, "train", rows)
    self._start = 0
    self._it = None

  def start_at(self, step: int) -> None:
    self.close()
    self._start = int(step)

  def __iter__(self):
    return self

  def __next__(self):
    if self._it is None:
      self._it = _iterate(self._dataset[self._start :], self._config)
    return next(self._it)

  def close(self) -> None:
    """Stops grain's prefetch threads and processes (their shared memory is freed)."""
    if self._it is not None:
      self._it.close()
      self._it = None


class EvalDataset:
  """Sequence of `{"image": uint8 [H, W, 3], "label": int32 [H, W], "name"}`."""

  def __init__(self, source, indices):
    self.source, self.indices = source, indices

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    if not 0 <= i < len(self):
      raise IndexError(i)
    ex = self.source.load(self.indices[i])
    return {"image": ex["image"], "label": ex["label"].astype(np.int32), "name": ex["name"]}

  def __iter__(self):
    for i in range(len(self)):
      yield self[i]


def make_eval_dataset(data_config, split="val"):
  """Original-size evaluation examples. With `on_bad_sample="skip"` every sample
  is checked once here and the bad ones are left out (with a warning)."""
  source = make_source(data_config, split)
  indices = list(range(len(source)))
  if data_config.get("on_bad_sample", "error") == "skip":
    good = []
    for i in indices:
      try:
        source.load(i)
        good.append(i)
      except errors.BadSampleError as e:
        log.warning("evaluation skips bad sample: %s", e)
    indices = good
  return EvalDataset(source, indices)

"""grain pipelines: the training iterator and the evaluation dataset.

Training: source -> this process's shard (every process_count-th sample) ->
seeded shuffle (reshuffled each epoch) -> repeat -> transforms + targets ->
per-process batch -> optional multiprocess prefetch. The iterator's
`get_state()` / `set_state()` resume at exactly the next batch.
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


def _process_info(process_index, process_count):
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  return process_index, process_count


def make_train_dataset(data_config, seed, process_index=None, process_count=None, split="train"):
  """The per-process batched MapDataset (before prefetching)."""
  process_index, process_count = _process_info(process_index, process_count)
  batch = data_config.batch_size
  if batch % process_count:
    raise ValueError(
        f"config.data.batch_size={batch} is not divisible by the " f"{process_count} processes"
    )
  source = make_source(data_config, split)
  if len(source) < process_count:
    raise ValueError(f"{source!r} has fewer samples than the {process_count} processes")
  ds = grain.MapDataset.source(source)[process_index::process_count]
  ds = ds.shuffle(seed=seed % 2**32).repeat()
  ds = ds.random_map(
      TrainTransform(list(data_config.transforms), data_config.max_segments),
      seed=(seed * 1_000_003 + process_index) % 2**32,
  )
  return ds.batch(batch // process_count, drop_remainder=True)


def _init_worker(worker_index, worker_count):
  """One OpenCV thread per prefetch worker: the workers already use the cores."""
  del worker_index, worker_count
  cv2.setNumThreads(1)


def make_train_iterator(data_config, seed, process_index=None, process_count=None):
  """Endless iterator of this process's training batches (numpy dicts:
  image, label, masks, classes, valid), with get_state()/set_state()."""
  ds = make_train_dataset(data_config, seed, process_index, process_count)
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

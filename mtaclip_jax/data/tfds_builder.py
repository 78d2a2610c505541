"""TFDS builders (ArrayRecord, no TensorFlow needed) prepared from the raw folders.

The raw folder is the manual dir. Examples hold the decoded, checked and mapped
sample (`image` uint8 RGB, `label` train ids with 255 = ignore, `name`), PNG
encoded, in the raw reader's order, so both sources yield identical examples.
"""

import os

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from mtaclip_jax import errors
from mtaclip_jax.data import readers

TFDS_SPLITS = {
    "train": "train",
    "training": "train",
    "val": "validation",
    "validation": "validation",
    "test": "test",
}


class _SegmentationBuilder(tfds.core.GeneratorBasedBuilder):
  """Common part; subclasses set DATASET and the splits they have."""

  VERSION = tfds.core.Version("1.0.0")
  DATASET = ""
  SPLITS = ()
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Point manual_dir at the raw dataset folder."

  def __init__(self, *, num_classes, on_bad_sample="error", label_rules=None, **kwargs):
    self._num_classes = num_classes
    self._on_bad_sample = on_bad_sample
    self._label_rules = label_rules
    super().__init__(**kwargs)

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                "name": tfds.features.Text(),
            }
        ),
        disable_shuffling=True,
        description=f"{self.DATASET} for mtaclip_jax, labels in train ids (255 ignore)",
    )

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    out = {}
    for split in self.SPLITS:
      try:
        samples = readers.list_samples(self.DATASET, root, split)
      except FileNotFoundError:
        if split == "train":
          raise
        continue
      out[TFDS_SPLITS[split]] = self._generate_examples(samples)
    return out

  def _generate_examples(self, samples):
    for sample in samples:
      try:
        ex = readers.load_sample(sample, self.DATASET, self._num_classes, self._label_rules)
      except errors.BadSampleError as e:
        if self._on_bad_sample == "error":
          raise
        readers.warn_once(("skip", str(e)), f"not writing bad sample: {e}")
        continue
      # PIL images: tfds encodes them without TensorFlow (arrays would need it).
      yield ex["name"], {
          "image": Image.fromarray(ex["image"]),
          "label": Image.fromarray(ex["label"], mode="L"),
          "name": ex["name"],
      }


class MtaclipAde20k(_SegmentationBuilder):
  DATASET = "ade20k"
  SPLITS = ("train", "val")


class MtaclipCityscapes(_SegmentationBuilder):
  DATASET = "cityscapes"
  SPLITS = ("train", "val", "test")


class MtaclipFolder(_SegmentationBuilder):
  """A folder dataset (data/folder.py); its label rules come from the config and
  classes.txt, so prepare it again (remove its tfds folder) after changing them."""

  DATASET = "folder"
  SPLITS = ("train", "val", "test")


BUILDERS = {"ade20k": MtaclipAde20k, "cityscapes": MtaclipCityscapes, "folder": MtaclipFolder}


def tfds_dir(data_config):
  return data_config.get("tfds_dir", None) or os.path.join(
      os.path.expanduser(data_config.root), "tfds"
  )


def prepare(data_config, num_classes):
  """Builds the ArrayRecord files once (a no-op when already prepared)."""
  builder = BUILDERS[data_config.name](
      data_dir=tfds_dir(data_config),
      num_classes=num_classes,
      on_bad_sample=data_config.get("on_bad_sample", "error"),
      label_rules=readers.label_rules(data_config, num_classes),
      file_format="array_record",
  )
  manual = readers.dataset_dir(data_config.name, data_config.root)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
  return builder


class TfdsSource:
  """grain random-access source over a prepared split (`tfds.data_source`)."""

  def __init__(self, data_config, split, num_classes):
    self.name, self.num_classes = data_config.name, num_classes
    self.on_bad_sample = data_config.get("on_bad_sample", "error")
    builder = prepare(data_config, num_classes)
    tsplit = TFDS_SPLITS.get(split)
    if tsplit not in builder.info.splits:
      raise ValueError(
          f"split {split!r}: the TFDS dataset in {tfds_dir(data_config)} "
          f"has {sorted(builder.info.splits)}"
      )
    self.source = tfds.data_source(
        builder.name,
        split=tsplit,
        data_dir=tfds_dir(data_config),
        builder_kwargs={
            "num_classes": num_classes,
            "label_rules": readers.label_rules(data_config, num_classes),
            "file_format": "array_record",
        },
    )
    self.split = tsplit

  def __len__(self):
    return len(self.source)

  def load(self, index):
    ex = self.source[index]
    name = ex["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    label = np.asarray(ex["label"], np.uint8)
    example = {
        "image": np.asarray(ex["image"], np.uint8),
        "label": label[..., 0] if label.ndim == 3 else label,
        "name": name,
    }
    return readers.check_example(
        example, self.num_classes, f"{self.name} TFDS {self.split} example {name}"
    )

  def __getitem__(self, index):
    return readers.get_with_replacement(self, index)

  def __repr__(self):
    return f"TfdsSource({self.name}/{self.split}, {len(self)} examples)"

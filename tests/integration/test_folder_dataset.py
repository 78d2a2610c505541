"""Your own data: a generated folder dataset with made-up class names trains the tiny
model until it clearly learns; evaluation in every mode, predict, open vocabulary,
export and resume then work on it as on ADE20k, with its names."""

import json
import os

import numpy as np
from PIL import Image
import pytest

from mtaclip_jax import errors
from mtaclip_jax.config import recipes
from mtaclip_jax.data import generate
from mtaclip_jax.evaluation import evaluate
from mtaclip_jax.evaluation import report
from mtaclip_jax.serve import export
from mtaclip_jax.serve import outputs
from mtaclip_jax.serve import predict
from tests import train_fixtures

NAMES = ("scratch", "dent", "rust", "paint")
STEPS, BATCH = 80, 4
# Chance: a model that cannot tell the four classes apart gets at most about 1/4 of
# each class's pixels right, an mIoU of about 25 or less. Measured: 69.6 after the 80
# steps (2-core CPU, 2026-12-06), so 50 leaves a margin for float rounding.
CHANCE, THRESHOLD = 100 / len(NAMES), 50.0


def folder_tiny_config(root, steps=STEPS, batch=BATCH):
  """tests/train_fixtures.py's tiny model on a folder dataset: the class count and
  names from its classes.txt (`num_classes=-1`), 64x64 crops, the device matcher."""
  c = train_fixtures.tiny_config(root, steps=steps, batch=batch, num_classes=len(NAMES))
  c.model.num_classes = -1
  c.data.update(dict(name="folder", num_classes=-1, test_scale=(80, 64)))
  c.data.classes_file = ""
  c.data.ignore_index = 255
  c.data.reduce_zero_label = False
  c.data.transforms = recipes.train_transforms((64, 64), (80, 64), ratio_range=(0.75, 1.25))
  c.optim.update(dict(warmup_steps=5, lr=2e-3))
  c.eval.update(dict(at_end=True, mode="whole"))
  return c


@pytest.mark.slow
def test_folder_dataset_trains_and_predicts_with_its_names(tmp_path):
  """80 steps of batch 4 (64x64 crops of 32 generated 64x80 images): the held-out
  mIoU must clear THRESHOLD, twice chance."""
  root = generate.write_folder_dataset(
      str(tmp_path / "data"), {"train": 32, "val": 8}, 0, (64, 80), NAMES
  )
  workdir = str(tmp_path / "work")
  config = folder_tiny_config(root)
  results = train_fixtures.train_run(config, workdir)
  assert config.model.num_classes == config.data.num_classes == len(NAMES)  # from the file

  miou = results["eval_mIoU"]
  assert miou > THRESHOLD, f"mIoU {miou:.1f} on the held-out split (chance ~{CHANCE:.0f})"
  with open(report.results_path(workdir, STEPS, "whole", "class")) as f:
    assert sorted(json.load(f)["per_class"]) == sorted(NAMES)  # the table's names

  # predict, the config taken from the checkpoint: its JSON and legend use the names.
  val = os.path.join(root, "images", "val")
  images = sorted(os.path.join(val, f) for f in os.listdir(val))[:2]
  out = str(tmp_path / "out")
  assert predict.run(None, workdir, images, out, progress=False) == []
  for path in images:
    stem = os.path.splitext(os.path.basename(path))[0]
    with open(os.path.join(out, stem + ".json")) as f:
      info = json.load(f)
    assert info["classes"] == list(NAMES)
    assert set(info["fractions"]) == set(NAMES)
    label_path, overlay_path, _ = outputs.output_files(out, stem)
    label_png = Image.open(label_path)
    label = np.asarray(label_png)
    palette = np.asarray(label_png.getpalette()[: 3 * len(NAMES)]).reshape(-1, 3)
    image = np.asarray(Image.open(path).convert("RGB"))
    # The overlay is the one drawn with the folder's names in its legend.
    expected = outputs.overlay(image, label, NAMES, [tuple(p) for p in palette])
    np.testing.assert_array_equal(np.asarray(Image.open(overlay_path)), np.asarray(expected))

  # Every evaluation mode, and the results carry the names.
  for mode in ("slide", "ms_flip"):
    c = folder_tiny_config(root)
    c.eval.update(dict(mode=mode, ms_mode="whole", scales=(0.75, 1.0), crop_size=(64, 64)))
    c.eval.stride = (43, 43)
    r = evaluate.run(c, workdir)
    assert r["step"] == STEPS and r["mIoU"] > CHANCE, (mode, r["mIoU"])
    with open(report.results_path(workdir, STEPS, mode, "class")) as f:
      assert sorted(json.load(f)["per_class"]) == sorted(NAMES), mode

  # Open vocabulary: a subset of the names, in another order, label the outputs.
  ov = str(tmp_path / "ov")
  assert predict.run(None, workdir, images[:1], ov, classes="rust,dent", progress=False) == []
  with open(os.path.join(ov, os.path.basename(images[0])[:-4] + ".json")) as f:
    assert json.load(f)["classes"] == ["rust", "dent"]

  # Export: the sidecar carries the names, and predict through the artifact uses them.
  artifact = str(tmp_path / "folder.jaxexport")
  assert export.export_checkpoint(None, workdir, artifact, size=64)["class_names"] == list(NAMES)
  art = str(tmp_path / "art")
  assert predict.run(None, None, images[:1], art, artifact=artifact, progress=False) == []
  with open(os.path.join(art, os.path.basename(images[0])[:-4] + ".json")) as f:
    assert json.load(f)["classes"] == list(NAMES)

  # Resume: the same run with two more steps continues from the checkpoint, its data
  # position restored (tests/unit/data/test_folder.py: the batches after a resume).
  more = folder_tiny_config(root, steps=STEPS + 2)
  more.optim.total_steps = STEPS
  more.eval.at_end = False
  train_fixtures.train_run(more, workdir)
  assert str(STEPS + 2) in os.listdir(os.path.join(workdir, "checkpoints"))

  # The checkpoint reads its names from the dataset it was trained on: moved, it is
  # named before anything is restored.
  os.rename(root, root + "_moved")
  with pytest.raises(errors.ClassListError, match="if the dataset moved, pass --config"):
    predict.run(None, workdir, [images[0].replace(root, root + "_moved")], out, progress=False)

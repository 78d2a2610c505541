"""predict CLI pieces on a tiny model trained for 2 steps: outputs, open vocabulary,
a corrupt image among good ones."""

import json
import os

import numpy as np
from PIL import Image
import pytest

from mtaclip_jax.evaluation import inference
from mtaclip_jax.serve import image_io
from mtaclip_jax.serve import outputs
from mtaclip_jax.serve import predict
from tests import train_fixtures


@pytest.fixture(scope="module")
def trained():
  return train_fixtures.trained_tiny()


def _check_outputs(out, name, image_path, num_classes):
  label = np.asarray(Image.open(os.path.join(out, f"{name}_label.png")))
  h, w = np.asarray(Image.open(image_path)).shape[:2]
  assert label.shape == (h, w)
  assert Image.open(os.path.join(out, f"{name}_label.png")).mode == "P"
  assert label.max() < num_classes
  ov = Image.open(os.path.join(out, f"{name}_overlay.png"))
  assert ov.size[0] >= w and ov.size[1] >= h
  with open(os.path.join(out, f"{name}.json")) as f:
    info = json.load(f)
  assert len(info["fractions"]) == num_classes
  assert abs(sum(info["fractions"].values()) - 1.0) < 1e-6
  counts = np.bincount(label.ravel(), minlength=num_classes)
  np.testing.assert_allclose(list(info["fractions"].values()), counts / label.size)
  return info


def test_predict_writes_consistent_outputs(trained, tmp_path):
  config, workdir, images = trained
  out = str(tmp_path / "out")
  failures = predict.run(config, workdir, [os.path.dirname(images[0])], out, progress=False)
  assert not failures
  for path in images:
    name = os.path.splitext(os.path.basename(path))[0]
    info = _check_outputs(out, name, path, config.model.num_classes)
    assert info["classes"][0] == "wall"


def test_slide_mode_and_glob(trained, tmp_path):
  config, workdir, images = trained
  out = str(tmp_path / "out")
  pattern = os.path.join(os.path.dirname(images[0]), "*.jpg")
  assert not predict.run(config, workdir, [pattern], out, mode="slide", progress=False)
  assert len([f for f in os.listdir(out) if f.endswith("_label.png")]) == len(images)


def test_open_vocabulary_with_renamed_classes(trained, tmp_path):
  config, workdir, images = trained
  out = str(tmp_path / "out")
  names_file = tmp_path / "names.txt"
  names_file.write_text("partition\nedifice\nheavens\n")  # 3 of the 4 slots
  assert not predict.run(config, workdir, images[:1], out, classes=str(names_file), progress=False)
  name = os.path.splitext(os.path.basename(images[0]))[0]
  info = _check_outputs(out, name, images[0], 3)
  assert info["classes"] == ["partition", "edifice", "heavens"]
  with pytest.raises(ValueError, match="class slots"):
    predict.run(config, workdir, images[:1], out, classes="a,b,c,d,e", progress=False)


def test_corrupt_image_does_not_stop_the_others(trained, tmp_path):
  config, workdir, images = trained
  bad = tmp_path / "broken.png"
  bad.write_bytes(b"not a png at all")
  out = str(tmp_path / "out")
  failures = predict.run(config, workdir, [str(bad)] + images, out, progress=False)
  assert len(failures) == 1 and "broken.png" in failures[0]
  assert len([f for f in os.listdir(out) if f.endswith(".json")]) == len(images)


def test_missing_input_names_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope"):
    image_io.expand_images([str(tmp_path / "nope*.png")])


def test_overlay_legend_lists_present_classes():
  image = np.zeros((20, 30, 3), np.uint8)
  label = np.zeros((20, 30), np.int32)
  label[10:] = 2
  ov = outputs.overlay(image, label, ["a", "b", "c"], [(255, 0, 0), (0, 255, 0), (0, 0, 255)])
  arr = np.asarray(ov)
  assert ov.size[0] > 30 and ov.size[1] >= 20  # image + legend panel on the right
  np.testing.assert_array_equal(arr[0, 0], [127, 0, 0])
  np.testing.assert_array_equal(arr[15, 0], [0, 0, 127])


def _recording(fn, shapes):
  def call(x):
    shapes.append(tuple(np.shape(x)))
    return fn(x)

  return call


def _outputs(out):
  return {
      f: open(os.path.join(out, f), "rb").read()
      for f in sorted(os.listdir(out))
      if f.endswith(("_label.png", ".json"))
  }


def test_batched_whole_inference_equals_one_at_a_time(trained, tmp_path):
  config, workdir, images = trained
  val = [np.asarray(Image.open(p)) for p in images]
  extra = {
      "wide.png": Image.fromarray(val[0]).resize((120, 50)),  # same padded shape
      "tall.png": Image.fromarray(val[1]).resize((60, 100)),
  }  # another shape
  for name, im in extra.items():
    im.save(tmp_path / name)
  (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
  paths = images + [str(tmp_path / n) for n in ("wide.png", "broken.jpg", "tall.png")]
  fn, names, palette, _ = predict.checkpoint_predictor(config, workdir)
  settings = inference.Settings.from_config(config.eval)
  runs = {}
  for batch in (1, 4):
    shapes = []
    out = str(tmp_path / f"b{batch}")
    failures = predict.predict_images(
        _recording(fn, shapes), settings, paths, out, names, palette, progress=False, batch=batch
    )
    assert len(failures) == 1 and "broken.jpg" in failures[0]
    runs[batch] = (_outputs(out), shapes)
  assert runs[1][0] == runs[4][0]  # label PNGs and JSON byte-identical
  assert len(runs[1][0]) == 2 * 4
  assert sorted(runs[1][1]) == [(1, 64, 96, 3)] * 3 + [(1, 96, 64, 3)]
  # 3 images of one padded shape in one call (batch: the next power of two, at most
  # 4), the other one alone.
  assert sorted(runs[4][1]) == [(1, 96, 64, 3), (4, 64, 96, 3)]
  # Batch 1 is the per-image path of inference.segment.
  label = np.asarray(Image.open(tmp_path / "b1" / "wide_label.png"))
  np.testing.assert_array_equal(
      label, inference.segment(fn, np.asarray(Image.open(tmp_path / "wide.png")), settings)
  )


def test_slide_windows_batched_equal_one_at_a_time(trained, tmp_path):
  config, workdir, images = trained
  fn, names, palette, _ = predict.checkpoint_predictor(config, workdir)
  settings = inference.Settings.from_config(dict(config.eval.to_dict(), mode="slide"))
  outs = []
  for batch in (1, 8):
    shapes = []
    out = str(tmp_path / f"b{batch}")
    assert not predict.predict_images(
        _recording(fn, shapes), settings, images, out, names, palette, progress=False, batch=batch
    )
    # 64x80 images, 64x64 windows every 32: 2 windows per image.
    assert set(shapes) == {(min(batch, 2), 64, 64, 3)}
    outs.append(_outputs(out))
  assert outs[0] == outs[1]

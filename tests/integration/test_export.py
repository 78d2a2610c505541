"""jax.export artifact: round trip against in-process inference, predict --artifact."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from mtaclip_jax.serve import export
from mtaclip_jax.serve import predict
from tests import train_fixtures


@pytest.fixture(scope="module")
def trained():
  return train_fixtures.trained_tiny()


SIZE = 64


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
  """(path, sidecar) of the trained checkpoint exported once for the module's tests;
  a test that changes the files works on a copy."""
  config, workdir, _ = trained
  path = str(tmp_path_factory.mktemp("export") / "model.jaxexport")
  return path, export.export_checkpoint(config, workdir, path, size=SIZE)


def test_export_round_trip_equals_in_process(trained, exported, tmp_path):
  config, workdir, images = trained
  path, meta = exported
  assert meta["size"] == [SIZE, SIZE] and len(meta["class_names"]) == 4
  call, meta2 = export.load(path)
  assert meta2 == meta
  fn, _, _, _ = predict.checkpoint_predictor(config, workdir)
  rng = np.random.default_rng(0)
  for batch in (1, 3):  # symbolic batch dimension
    x = rng.normal(size=(batch, SIZE, SIZE, 3)).astype(np.float32)
    got, want = np.asarray(call(x)), np.asarray(fn(x))
    assert got.shape == (batch, SIZE, SIZE, 4)
    # Same XLA program on the same backend; only constant folding may differ.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  out = str(tmp_path / "out")
  assert not predict.run(None, None, images, out, artifact=path, progress=False)
  assert len([f for f in os.listdir(out) if f.endswith("_overlay.png")]) == len(images)


def test_export_open_vocabulary(trained, tmp_path):
  config, workdir, _ = trained
  path = str(tmp_path / "ov.jaxexport")
  meta = export.export_checkpoint(
      config, workdir, path, size=SIZE, classes=["partition", "edifice"]
  )
  call, _ = export.load(path)
  x = np.zeros((2, SIZE, SIZE, 3), np.float32)
  assert np.asarray(call(x)).shape == (2, SIZE, SIZE, 2)
  assert meta["head"] == "similarity"


def test_load_names_a_bad_file(tmp_path):
  bad = tmp_path / "bad.jaxexport"
  bad.write_bytes(b"garbage")
  try:
    export.load(str(bad))
  except ValueError as e:
    assert "bad.jaxexport" in str(e)
  else:
    raise AssertionError("expected ValueError")


def test_artifact_runs_with_jax_alone(trained, exported, tmp_path):
  """A fresh interpreter with only jax + numpy imported runs the artifact."""
  config, workdir, _ = trained
  path, _ = exported
  x = np.random.default_rng(1).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
  np.save(tmp_path / "x.npy", x)
  code = (
      "import sys, jax, numpy as np\n"
      f"exp = jax.export.deserialize(bytearray(open({path!r}, 'rb').read()))\n"
      f"np.save({str(tmp_path / 'y.npy')!r}, np.asarray(exp.call(np.load("
      f"{str(tmp_path / 'x.npy')!r}))))\n"
      "assert not [m for m in sys.modules if m.startswith(('mtaclip_jax', 'flax'))]\n"
  )
  subprocess.run([sys.executable, "-c", code], check=True, cwd=str(tmp_path))
  fn, _, _, _ = predict.checkpoint_predictor(config, workdir)
  np.testing.assert_allclose(np.load(tmp_path / "y.npy"), np.asarray(fn(x)), rtol=1e-5, atol=1e-5)


def test_artifact_slide_mode_runs_windows_of_its_size(trained, exported, tmp_path):
  config, workdir, images = trained
  path = str(tmp_path / "m.jaxexport")
  for suffix in ("", ".json"):  # a copy: its sidecar is changed below
    shutil.copyfile(exported[0] + suffix, path + suffix)
  meta = dict(exported[1])
  assert meta["test_scale"] == list(config.eval.test_scale)
  assert meta["stride"] == list(config.eval.stride)  # the config's crop is SIZE
  call, names, palette, settings = predict.artifact_predictor(path, "slide")
  assert (settings.mode, settings.crop_size) == ("slide", (SIZE, SIZE))
  shapes = []
  recorded = lambda x: (shapes.append(np.shape(x)), call(x))[1]
  out = str(tmp_path / "artifact")
  assert not predict.predict_images(recorded, settings, images, out, names, palette, progress=False)
  # 64x80 images at test_scale (80, 64): two 64x64 windows each, in one call.
  assert shapes == [(2, SIZE, SIZE, 3)] * len(images)
  ref = str(tmp_path / "checkpoint")
  assert not predict.run(config, workdir, images, ref, mode="slide", progress=False)
  for f in os.listdir(ref):
    if f.endswith("_label.png"):
      a = np.asarray(Image.open(os.path.join(out, f)))
      b = np.asarray(Image.open(os.path.join(ref, f)))
      # The same program up to constant folding (scores agree to 1e-5 above).
      assert (a == b).mean() > 0.999, f

  with pytest.raises(ValueError, match="ms_flip"):
    predict.artifact_predictor(path, "ms_flip")
  del meta["test_scale"]  # an artifact exported before slide mode existed
  with open(path + ".json", "w") as f:
    json.dump(meta, f)
  with pytest.raises(ValueError, match="test_scale"):
    predict.artifact_predictor(path, "slide")

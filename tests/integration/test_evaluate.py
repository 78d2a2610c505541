"""evaluate(): end to end over a small dataset; results written as JSON + TensorBoard."""

import glob
import json
import os

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mtaclip_jax.evaluation import evaluate
from mtaclip_jax.evaluation import inference
from mtaclip_jax.evaluation import metrics
from mtaclip_jax.evaluation import report
from tests import train_fixtures

NUM_CLASSES = 4
NAMES = ["wall", "sky", "road", "tree"]


def decode_fn(x):
  """Reads the class back from the red channel (red = 60 * class + 20): a perfect
  pixel-local model for `_dataset`, except that it never predicts class 3."""
  red = jnp.asarray(x)[..., 0] * inference.STD[0] + inference.MEAN[0]
  centres = 60.0 * jnp.arange(NUM_CLASSES) + 20.0
  scores = -jnp.abs(red[..., None] - centres)
  return scores.at[..., 3].set(-1e9)


def _dataset(sizes, seed=0):
  rng = np.random.RandomState(seed)
  items = []
  for i, (h, w) in enumerate(sizes):
    label = rng.randint(0, NUM_CLASSES, (h, w)).astype(np.int32)
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = 60 * label + 20
    image[..., 1] = rng.randint(0, 256, (h, w))
    label[rng.rand(h, w) < 0.1] = 255
    items.append(dict(image=image, label=label, name=f"img{i}"))
  return items


def _config(**kw):
  return ml_collections.ConfigDict(
      dict(
          dict(
              mode="whole",
              crop_size=(16, 16),
              stride=(11, 11),
              scales=(1.0,),
              flip=False,
              test_scale=(64, 16),
              max_images=0,
          ),
          **kw,
      )
  )


@pytest.mark.parametrize("mode", ["whole", "slide", "ms_flip"])
def test_evaluate_matches_numpy_metrics(mode):
  # Short side 16 = test_scale's short side, long side <= 64: no resizing, so the
  # decoder is exact: classes 0-2 perfect, class 3 always wrong.
  data = _dataset([(16, 30), (20, 16), (16, 41)])
  results = evaluate.evaluate(
      decode_fn, data, _config(mode=mode, flip=True), NUM_CLASSES, NAMES, progress=False
  )
  preds = [
      inference.segment(
          decode_fn, d["image"], inference.Settings.from_config(_config(mode=mode, flip=True))
      )
      for d in data
  ]
  labels = [d["label"] for d in data]
  for pred, label in zip(preds, labels):
    keep = (label != 255) & (label != 3)
    np.testing.assert_array_equal(pred[keep], label[keep])
  cm = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
  for pred, label in zip(preds, labels):
    keep = label != 255
    np.add.at(cm, (label[keep], pred[keep]), 1)
  want = metrics.compute_metrics(cm, NAMES)
  np.testing.assert_array_equal(results["confusion_matrix"], cm)
  assert results["mIoU"] == pytest.approx(want["mIoU"])
  assert results["per_class"]["tree"]["IoU"] == 0.0
  assert results["per_class"]["sky"]["IoU"] == pytest.approx(
      100 * cm[1, 1] / (cm[1].sum() + cm[:, 1].sum() - cm[1, 1])
  )
  assert results["mode"] == mode and results["num_images"] == 3
  assert results["seconds"] > 0


def test_max_images_and_bad_labels():
  data = _dataset([(16, 20)] * 3)
  results = evaluate.evaluate(decode_fn, data, _config(max_images=2), NUM_CLASSES, progress=False)
  assert results["num_images"] == 2
  assert list(results["per_class"]) == ["0", "1", "2", "3"]
  bad = dict(data[0], image=data[0]["image"][..., :1], name="grey")
  with pytest.raises(ValueError, match="grey: expected a uint8"):
    evaluate.evaluate(decode_fn, [bad], _config(), NUM_CLASSES, progress=False)
  data[0]["label"] = data[0]["label"][:, :5]
  with pytest.raises(ValueError, match="img0"):
    evaluate.evaluate(decode_fn, data, _config(), NUM_CLASSES, progress=False)
  with pytest.raises(ValueError, match="num_classes"):
    evaluate.evaluate(decode_fn, data[1:], _config(), NUM_CLASSES + 1, progress=False)


def test_confusion_matrix_flush(monkeypatch):
  # A tiny flush threshold moves counts to the int64 host matrix mid-way.
  monkeypatch.setattr(evaluate, "_FLUSH_PIXELS", 600)
  data = _dataset([(16, 20), (16, 30), (16, 17)])
  flushed = evaluate.evaluate(decode_fn, data, _config(), NUM_CLASSES, progress=False)
  monkeypatch.setattr(evaluate, "_FLUSH_PIXELS", 2**30)
  direct = evaluate.evaluate(decode_fn, data, _config(), NUM_CLASSES, progress=False)
  np.testing.assert_array_equal(flushed["confusion_matrix"], direct["confusion_matrix"])


def test_write_results_json_and_tensorboard(tmp_path):
  data = _dataset([(16, 20)])
  results = evaluate.evaluate(decode_fn, data, _config(), NUM_CLASSES, NAMES, progress=False)
  results["per_class"]["tree"]["Acc"] = float("nan")  # e.g. absent from the GT
  path = report.write_results(results, str(tmp_path), step=1234)
  assert path == os.path.join(str(tmp_path), "eval", "step_1234_whole_class.json")
  with open(path) as f:
    saved = json.load(f)
  assert saved["step"] == 1234 and saved["mode"] == "whole"
  assert saved["mIoU"] == pytest.approx(results["mIoU"])
  assert saved["per_class"]["tree"]["Acc"] is None
  assert np.asarray(saved["confusion_matrix"]).shape == (NUM_CLASSES, NUM_CLASSES)
  events = glob.glob(os.path.join(str(tmp_path), "eval", "events.out.tfevents.*"))
  scalars = train_fixtures.tensorboard_scalars(events[0])
  assert scalars["eval/whole/class/mIoU"] == (1234, pytest.approx(results["mIoU"], rel=1e-6))
  assert scalars["eval_per_class/whole/class/IoU/sky"][1] == pytest.approx(
      results["per_class"]["sky"]["IoU"], rel=1e-6
  )
  assert "eval_per_class/whole/class/Acc/tree" not in scalars  # nan is not logged
  table = report.format_table(results)
  assert "| tree" in table and "mIoU" in table and "nan" in table


def test_sum_over_processes_keeps_int64_counts(monkeypatch):
  monkeypatch.setattr(evaluate.jax, "process_count", lambda: 2)
  monkeypatch.setattr(evaluate.distributed, "barrier", lambda name: None)  # no other process
  # Two processes holding the same values.
  monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.stack([np.asarray(x)] * 2))
  cm = np.array([[3 * 2**31 + 5, 7], [0, 2**30 - 1]], np.int64)
  total, n = evaluate.sum_over_processes(cm, 4)
  np.testing.assert_array_equal(total, 2 * cm)
  assert n == 8


@pytest.mark.slow
def test_evaluate_model_with_a_contract_model(tmp_path, capsys):
  head = "similarity"  # reads tau from config.loss
  from tests.parity.test_inference import _ContractModel

  model = _ContractModel(num_classes=NUM_CLASSES)
  tokens = np.zeros((NUM_CLASSES + 1, 5), np.int32)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), tokens)
  config = ml_collections.ConfigDict(
      dict(
          model=dict(num_classes=NUM_CLASSES),
          loss=dict(tau=0.5),
          eval=dict(_config(mode="slide"), head=head),
      )
  )
  data = _dataset([(16, 30), (16, 20)])
  results = evaluate.evaluate_model(
      model, variables, tokens, data, config, NAMES, workdir=str(tmp_path), step=7, progress=False
  )
  predict_fn = inference.make_predict_fn(model, variables, tokens, head=head, tau=0.5)
  direct = evaluate.evaluate(predict_fn, data, config.eval, NUM_CLASSES, NAMES, progress=False)
  np.testing.assert_array_equal(results["confusion_matrix"], direct["confusion_matrix"])
  assert results["head"] == head and results["num_images"] == 2
  assert "| road" in capsys.readouterr().out
  assert os.path.exists(os.path.join(str(tmp_path), "eval", "step_7_slide_similarity.json"))
  # Another split, the first image only: a result of its own, named so.
  config.eval.update(dict(split="test", max_images=1))
  results = evaluate.evaluate_model(
      model, variables, tokens, data, config, NAMES, workdir=str(tmp_path), step=7, progress=False
  )
  assert (results["split"], results["max_images"], results["num_images"]) == ("test", 1, 1)
  assert "step 7, slide, similarity head, test split, first 1 image:" in capsys.readouterr().out
  assert sorted(os.listdir(tmp_path / "eval"))[-2:] == [
      "step_7_slide_similarity.json",
      "step_7_slide_similarity_test_max1.json",
  ]

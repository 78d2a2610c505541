"""Confusion matrix on device vs a direct numpy computation of mmseg's metrics."""

import math

import numpy as np
import pytest

from mtaclip_jax.evaluation import metrics


def _numpy_metrics(preds, labels, num_classes, ignore=255):
  """mmseg `intersect_and_union` summed over images, written out per class."""
  inter = np.zeros(num_classes)
  area_pred = np.zeros(num_classes)
  area_label = np.zeros(num_classes)
  for pred, label in zip(preds, labels):
    keep = label != ignore
    p, l = pred[keep], label[keep]
    for c in range(num_classes):
      inter[c] += np.sum((p == c) & (l == c))
      area_pred[c] += np.sum(p == c)
      area_label[c] += np.sum(l == c)
  union = area_pred + area_label - inter
  iou = np.array([inter[c] / union[c] if union[c] else np.nan for c in range(num_classes)])
  acc = np.array(
      [inter[c] / area_label[c] if area_label[c] else np.nan for c in range(num_classes)]
  )
  return 100 * iou, 100 * acc, 100 * inter.sum() / area_label.sum()


def test_hand_computed_example():
  # 2 classes + ignore: label row [0 0 1 255], pred row [0 1 1 0].
  cm = metrics.update(
      metrics.new_confusion_matrix(3), np.array([[0, 1, 1, 0]]), np.array([[0, 0, 1, 255]]), 3
  )
  np.testing.assert_array_equal(np.asarray(cm), [[1, 1, 0], [0, 1, 0], [0, 0, 0]])
  r = metrics.compute_metrics(cm, ["a", "b", "c"])
  np.testing.assert_allclose(r["IoU"][:2], [50.0, 50.0])
  np.testing.assert_allclose(r["Acc"][:2], [50.0, 100.0])
  assert math.isnan(r["IoU"][2]) and math.isnan(r["Acc"][2])  # absent from GT and pred
  assert r["mIoU"] == pytest.approx(50.0)
  assert r["mAcc"] == pytest.approx(75.0)
  assert r["aAcc"] == pytest.approx(200 / 3)
  assert math.isnan(r["per_class"]["c"]["IoU"])


def test_matches_numpy_with_ignore_and_absent_classes():
  rng = np.random.RandomState(0)
  num_classes = 7
  preds, labels = [], []
  cm = metrics.new_confusion_matrix(num_classes)
  for shape in [(13, 17), (20, 9), (5, 31)]:
    label = rng.randint(0, 5, shape)  # classes 5, 6 never in GT
    label[rng.rand(*shape) < 0.2] = 255  # ignore pixels
    pred = rng.randint(0, 6, shape)  # class 5 predicted, 6 never
    pred[label == 255] = 6  # predictions on ignore never count
    preds.append(pred)
    labels.append(label)
    cm = metrics.update(cm, pred, label, num_classes)
  r = metrics.compute_metrics(cm)
  iou, acc, aacc = _numpy_metrics(preds, labels, num_classes)
  np.testing.assert_allclose(r["IoU"], iou, rtol=1e-12)
  np.testing.assert_allclose(r["Acc"], acc, rtol=1e-12)
  assert r["IoU"][5] == 0.0 and math.isnan(r["Acc"][5])  # predicted only
  assert math.isnan(r["IoU"][6])
  assert r["mIoU"] == pytest.approx(np.nanmean(iou), rel=1e-12)
  assert r["mAcc"] == pytest.approx(np.nanmean(acc), rel=1e-12)
  assert r["aAcc"] == pytest.approx(aacc, rel=1e-12)
  assert int(np.asarray(cm)[:, 6].sum()) == 0


def test_out_of_range_labels_are_ignored():
  cm = metrics.update(metrics.new_confusion_matrix(2), np.array([0, 1, 1]), np.array([0, 7, -1]), 2)
  np.testing.assert_array_equal(np.asarray(cm), [[1, 0], [0, 0]])


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match="class_names"):
    metrics.compute_metrics(np.eye(3), ["a"])
  with pytest.raises(ValueError, match="confusion matrix"):
    metrics.compute_metrics(np.zeros((2, 3)))

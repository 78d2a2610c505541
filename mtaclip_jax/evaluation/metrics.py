"""Semantic segmentation metrics: a confusion matrix accumulated on device, and
mIoU / mAcc / aAcc computed from it on the host, as mmseg's `IoUMetric` does.

cm[i, j] counts pixels with ground truth i predicted as j. Pixels labelled
`ignore_index` (or any label outside [0, C)) are not counted. Metrics are in percent.
For a class absent from both ground truth and prediction IoU is nan; Acc is nan for
a class absent from the ground truth; the means are nan-means over classes.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = 255


def new_confusion_matrix(num_classes: int) -> jax.Array:
  return jnp.zeros((num_classes, num_classes), jnp.int32)


@functools.partial(jax.jit, static_argnames=("num_classes", "ignore_index"))
def update(
    cm: jax.Array,
    pred: jax.Array,
    label: jax.Array,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
) -> jax.Array:
  """Adds the pixels of `pred` vs `label` (same shape, any rank) to `cm` [C, C].

  `pred` holds class ids in [0, C). The counts are int32: flush `cm` to the host
  (`np.int64`) before it can hold 2**31 pixels (see `evaluation/evaluate.py`).
  """
  pred = jnp.asarray(pred, jnp.int32).reshape(-1)
  label = jnp.asarray(label, jnp.int32).reshape(-1)
  valid = (
      (label != ignore_index)
      & (label >= 0)
      & (label < num_classes)
      & (pred >= 0)
      & (pred < num_classes)
  )
  index = jnp.where(valid, label * num_classes + pred, 0)
  counts = jax.ops.segment_sum(
      valid.astype(cm.dtype), index, num_segments=num_classes * num_classes
  )
  return cm + counts.reshape(num_classes, num_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def _nanmean(x: np.ndarray) -> float:
  return float(np.nanmean(x)) if np.any(~np.isnan(x)) else float("nan")


def compute_metrics(cm, class_names: Sequence[str] | None = None) -> dict:
  """mIoU, mAcc, aAcc (percent) and per-class IoU / Acc from a confusion matrix.

  Returns:
    {"mIoU", "mAcc", "aAcc": float, "IoU", "Acc": float64 [C] arrays,
     "per_class": {name: {"IoU", "Acc"}} (names = class_names or "0", "1", ...)}.
  """
  cm = np.asarray(cm, np.int64)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
    raise ValueError(f"confusion matrix: expected [C, C], got shape {cm.shape}")
  num_classes = cm.shape[0]
  if class_names is None:
    class_names = [str(i) for i in range(num_classes)]
  if len(class_names) != num_classes:
    raise ValueError(f"class_names: expected {num_classes} names, got {len(class_names)}")
  intersect = np.diag(cm).astype(np.float64)
  area_label = cm.sum(axis=1).astype(np.float64)
  area_pred = cm.sum(axis=0).astype(np.float64)
  iou = 100 * _ratio(intersect, area_label + area_pred - intersect)
  acc = 100 * _ratio(intersect, area_label)
  total = area_label.sum()
  return {
      "mIoU": _nanmean(iou),
      "mAcc": _nanmean(acc),
      "aAcc": float(100 * intersect.sum() / total) if total > 0 else float("nan"),
      "IoU": iou,
      "Acc": acc,
      "per_class": {
          name: {"IoU": float(i), "Acc": float(a)} for name, i, a in zip(class_names, iou, acc)
      },
  }

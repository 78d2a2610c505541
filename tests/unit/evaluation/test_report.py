"""Evaluation results are kept per checkpoint step, mode and head: one JSON file and
one TensorBoard event file each, tagged eval/MODE/HEAD/...; running the same
evaluation again replaces that result alone; the printed line names both."""

import glob
import json
import os

from mtaclip_jax.evaluation import report
from tests import train_fixtures


def _results(miou, mode, head):
  return {
      "mIoU": miou,
      "mAcc": 50.0,
      "aAcc": 60.0,
      "seconds": 1.0,
      "per_class": {"wall": {"IoU": miou, "Acc": 50.0}},
      "IoU": [miou],
      "Acc": [50.0],
      "confusion_matrix": [[1]],
      "mode": mode,
      "head": head,
      "num_images": 2,
  }


def _board(workdir):
  """{tag: [(step, value)]} over every event file of workdir/eval."""
  out = {}
  for path in glob.glob(os.path.join(workdir, "eval", "events.out.tfevents.*")):
    for tag, point in train_fixtures.tensorboard_scalars(path).items():
      out.setdefault(tag, []).append(point)
  return out


def test_results_per_step_mode_and_head_and_a_rerun_replaces_only_its_own(tmp_path):
  w = str(tmp_path)
  report.write_results(_results(40.0, "whole", "class"), w, 300)
  report.write_results(_results(42.0, "slide", "class"), w, 300)
  report.write_results(_results(41.0, "whole", "similarity"), w, 300)
  report.write_results(_results(30.0, "whole", "class"), w, 200)
  report.write_results(_results(45.0, "whole", "class"), w, 300)  # the same evaluation again
  names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(w, "eval", "*.json")))
  assert names == [
      "step_200_whole_class.json",
      "step_300_slide_class.json",
      "step_300_whole_class.json",
      "step_300_whole_similarity.json",
  ]
  with open(report.results_path(w, 300, "whole", "class")) as f:
    assert json.load(f)["mIoU"] == 45.0
  board = _board(w)
  assert sorted(board["eval/whole/class/mIoU"]) == [(200, 30.0), (300, 45.0)]
  assert board["eval/slide/class/mIoU"] == [(300, 42.0)]
  assert board["eval/whole/similarity/mIoU"] == [(300, 41.0)]
  assert board["eval_per_class/slide/class/IoU/wall"] == [(300, 42.0)]
  line = report.format_table(dict(_results(45.0, "whole", "class"), step=300)).splitlines()[-1]
  assert line.startswith("step 300, whole, class head: mIoU  45.00"), line

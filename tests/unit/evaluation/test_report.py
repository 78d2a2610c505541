"""Evaluation results are kept per checkpoint step, mode and head (and split and image
limit, when not the full validation split): one JSON file and one TensorBoard event
file each, tagged eval/MODE/HEAD/...; running the same evaluation again replaces that
result alone; the printed line names both."""

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


def test_another_split_or_an_image_limit_is_a_result_of_its_own(tmp_path):
  """eval.split other than the validation split and eval.max_images are in the name,
  the tags and the printed line, so neither replaces the full result of the step."""
  w = str(tmp_path)
  report.write_results(_results(40.0, "slide", "class"), w, 300)
  for split, limit, miou in (("test", 0, 41.0), ("val", 10, 42.0), ("test", 10, 43.0)):
    report.write_results(
        dict(_results(miou, "slide", "class"), split=split, max_images=limit), w, 300
    )
  report.write_results(dict(_results(44.0, "slide", "class"), split="validation"), w, 300)
  names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(w, "eval", "*.json")))
  assert names == [
      "step_300_slide_class.json",
      "step_300_slide_class_max10.json",
      "step_300_slide_class_test.json",
      "step_300_slide_class_test_max10.json",
  ]
  with open(report.results_path(w, 300, "slide", "class")) as f:
    assert json.load(f)["mIoU"] == 44.0  # "validation" is the validation split too
  with open(report.results_path(w, 300, "slide", "class", "test", 10)) as f:
    assert json.load(f)["mIoU"] == 43.0
  board = _board(w)
  assert board["eval/slide/class/mIoU"] == [(300, 44.0)]
  assert board["eval/slide/class/test/mIoU"] == [(300, 41.0)]
  assert board["eval/slide/class/max10/mIoU"] == [(300, 42.0)]
  assert board["eval/slide/class/test/max10/mIoU"] == [(300, 43.0)]
  assert board["eval_per_class/slide/class/test/max10/IoU/wall"] == [(300, 43.0)]
  assert report.tag("slide", "class", "mAcc", "test", 10) == "eval/slide/class/test/max10/mAcc"
  results = dict(_results(43.0, "slide", "class"), step=300, split="test", max_images=10)
  line = report.format_table(results).splitlines()[-1]
  assert line.startswith("step 300, slide, class head, test split, first 10 images: mIoU  43.00")

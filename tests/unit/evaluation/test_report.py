"""Evaluation results are kept per checkpoint step, mode and head: one JSON file and
one TensorBoard event file each, tagged eval/MODE/HEAD/...; running the same
evaluation again replaces that result alone; the printed line names both."""

import glob
import json
import os
import struct

from tensorboardX.proto import event_pb2

from mtaclip_jax.evaluation import report


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


def _scalars(path):
  out = {}
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos : pos + 8])
    event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
    pos += 16 + length
    for value in event.summary.value:
      out[value.tag] = (event.step, value.simple_value)
  return out


def _board(workdir):
  """{tag: [(step, value)]} over every event file of workdir/eval."""
  out = {}
  for path in glob.glob(os.path.join(workdir, "eval", "events.out.tfevents.*")):
    for tag, point in _scalars(path).items():
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

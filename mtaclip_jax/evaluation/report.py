"""Evaluation results on disk, one set per checkpoint step, mode and head:
`workdir/eval/step_N_MODE_HEAD.json` and TensorBoard scalars tagged
`eval/MODE/HEAD/mIoU` (...); and the per-class table printed at the end of a run.
Evaluating the same step, mode and head again replaces that result only.

An evaluation of another split than the validation split (`eval.split`), or of the
first images only (`eval.max_images`), is a result of its own: the split and the
limit are added to its name, `step_N_MODE_HEAD_SPLIT_maxM.json` and
`eval/MODE/HEAD/SPLIT/maxM/...`, so it never replaces the full validation result."""

from __future__ import annotations

import glob
import json
import math
import os

import jax
import numpy as np

from mtaclip_jax import errors


def format_table(results: dict) -> str:
  """Per-class IoU / Acc table and the summary line, mmseg style."""
  names = list(results["per_class"])
  width = max([len("Class")] + [len(n) for n in names])
  rule = f"+{'-' * (width + 2)}+--------+--------+"

  def fmt(x):
    return "   nan" if x is None or math.isnan(x) else f"{x:6.2f}"

  lines = [rule, f"| {'Class':<{width}} |  IoU   |  Acc   |", rule]
  for name in names:
    row = results["per_class"][name]
    lines.append(f"| {name:<{width}} | {fmt(row['IoU'])} | {fmt(row['Acc'])} |")
  lines.append(rule)
  lines.append(
      f"{title(results)}: mIoU {fmt(results['mIoU'])}  mAcc "
      f"{fmt(results['mAcc'])}  aAcc {fmt(results['aAcc'])}  "
      f"({results['num_images']} images, {results['seconds']:.1f} s)"
  )
  return "\n".join(lines)


def title(results: dict) -> str:
  """What the printed line calls an evaluation: `step N, MODE, HEAD head` and, when
  set, `, SPLIT split` and `, first M images`."""
  step = f"step {results['step']}, " if "step" in results else ""
  split, limit = results.get("split", DEFAULT_SPLIT), int(results.get("max_images", 0) or 0)
  extra = "" if split in VALIDATION_SPLITS else f", {split} split"
  extra += f", first {limit} image{'s' * (limit > 1)}" if limit else ""
  return f"{step}{results['mode']}, {results.get('head', 'class')} head{extra}"


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.ndarray, jax.Array)):
    return _jsonable(np.asarray(x).tolist())
  if isinstance(x, (np.floating, float)):
    return None if math.isnan(x) else float(x)
  if isinstance(x, np.integer):
    return int(x)
  return x


# The split evaluated by default (config.eval.split) and its other name: results of
# either carry no split in their name.
DEFAULT_SPLIT = "val"
VALIDATION_SPLITS = ("val", "validation")


def _qualifiers(split: str, max_images: int) -> list[str]:
  """The parts that set an evaluation apart from the full validation one."""
  out = [] if split in VALIDATION_SPLITS else [split]
  return out + ([f"max{int(max_images)}"] if max_images else [])


def result_name(
    step: int, mode: str, head: str, split: str = DEFAULT_SPLIT, max_images: int = 0
) -> str:
  """What names one evaluation: the checkpoint step, the mode and the head, then the
  split unless it is the validation split and `max{M}` when only the first M images
  were evaluated (e.g. `step_300_slide_class_test_max10`)."""
  return "_".join([f"step_{int(step)}", mode, head] + _qualifiers(split, max_images))


def results_path(
    workdir: str, step: int, mode: str, head: str, split: str = DEFAULT_SPLIT, max_images: int = 0
) -> str:
  name = result_name(step, mode, head, split, max_images)
  return os.path.join(workdir, "eval", name + ".json")


def write_results(results: dict, workdir: str, step: int) -> str | None:
  """Writes workdir/eval/{result_name}.json and the TensorBoard scalars
  eval/{mode}/{head}[/{split}][/max{M}]/... in an event file of that evaluation alone,
  in workdir/eval; an earlier result of the same name is replaced, others are kept.
  `results["split"]` and `results["max_images"]` default to the validation split and
  every image.

  Only process 0 writes. nan values become null in the JSON. Returns the JSON path
  (None on other processes).
  """
  if jax.process_index() != 0:
    return None
  mode, head = results["mode"], results.get("head", "class")
  which = (results.get("split", DEFAULT_SPLIT), int(results.get("max_images", 0) or 0))
  name = result_name(step, mode, head, *which)
  path = results_path(workdir, step, mode, head, *which)
  out_dir = os.path.dirname(path)
  try:
    os.makedirs(out_dir, exist_ok=True)
    # Written whole then renamed: a kill never leaves a half file that looks done.
    with open(path + ".tmp", "w") as f:
      json.dump(_jsonable(dict(results, step=int(step))), f, indent=1)
    os.replace(path + ".tmp", path)
  except OSError as e:
    raise errors.WorkdirError(
        f"cannot write evaluation results {path}: {e}. If the disk is full, free space "
        "and run the same command again (checkpoints already written are intact)"
    ) from e

  # One event file per evaluation, named by its suffix: a rerun deletes its own
  # earlier file, so TensorBoard shows each evaluation once.
  suffix = "." + name
  for old in glob.glob(os.path.join(out_dir, "events.out.tfevents.*" + suffix)):
    os.remove(old)
  import tensorboardX  # pylint: disable=g-import-not-at-top  (imports torch if installed: ~2 s)

  writer = tensorboardX.SummaryWriter(out_dir, filename_suffix=suffix)
  try:
    for key in ("mIoU", "mAcc", "aAcc", "seconds"):
      if not math.isnan(results[key]):
        writer.add_scalar(tag(mode, head, key, *which), results[key], int(step))
    per_class = "/".join(["eval_per_class", mode, head] + _qualifiers(*which))
    for cls, row in results["per_class"].items():
      for key in ("IoU", "Acc"):
        if not math.isnan(row[key]):
          writer.add_scalar(f"{per_class}/{key}/{cls}", row[key], int(step))
  finally:
    writer.close()
  return path


def tag(mode: str, head: str, key: str, split: str = DEFAULT_SPLIT, max_images: int = 0) -> str:
  """The TensorBoard tag of one metric of an evaluation: eval/MODE/HEAD/KEY, with
  the split and `max{M}` before KEY as in `result_name`."""
  return "/".join(["eval", mode, head] + _qualifiers(split, max_images) + [key])

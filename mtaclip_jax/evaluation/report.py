"""Evaluation results on disk: `workdir/eval/step_N.json` and TensorBoard scalars,
and the per-class table printed at the end of a run."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import tensorboardX

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
      f"{results['mode']}: mIoU {fmt(results['mIoU'])}  mAcc "
      f"{fmt(results['mAcc'])}  aAcc {fmt(results['aAcc'])}  "
      f"({results['num_images']} images, {results['seconds']:.1f} s)"
  )
  return "\n".join(lines)


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


def results_path(workdir: str, step: int) -> str:
  return os.path.join(workdir, "eval", f"step_{int(step)}.json")


def write_results(results: dict, workdir: str, step: int) -> str | None:
  """Writes workdir/eval/step_{step}.json and TensorBoard scalars in workdir/eval.

  Only process 0 writes. nan values become null in the JSON. Returns the JSON path
  (None on other processes).
  """
  if jax.process_index() != 0:
    return None
  path = results_path(workdir, step)
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

  writer = tensorboardX.SummaryWriter(out_dir)
  try:
    for key in ("mIoU", "mAcc", "aAcc", "seconds"):
      if not math.isnan(results[key]):
        writer.add_scalar(f"eval/{key}", results[key], int(step))
    for name, row in results["per_class"].items():
      for key in ("IoU", "Acc"):
        if not math.isnan(row[key]):
          writer.add_scalar(f"eval_per_class/{key}/{name}", row[key], int(step))
  finally:
    writer.close()
  return path

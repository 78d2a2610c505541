"""Training and evaluation scalars as JSON lines and TensorBoard event files."""

from __future__ import annotations

import json
import os
import time

from mtaclip_jax import errors


class MetricWriter:
  """JSON lines + TensorBoard event files (tensorboardX: no TensorFlow needed)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    self.path = os.path.join(workdir, "metrics.jsonl")
    if enabled:
      self._jsonl = open(self.path, "a", encoding="utf-8")
      import tensorboardX  # pylint: disable=g-import-not-at-top  (imports torch if installed: ~2 s)

      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    try:
      self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **scalars}) + "\n")
      self._jsonl.flush()
    except OSError as e:
      raise errors.WorkdirError(
          f"cannot write metrics to {self.path} at step {step}: {e}. If the disk is "
          "full, free space and run the same command again: training resumes from the "
          "last complete checkpoint, which is intact"
      ) from e
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()

"""Training and evaluation scalars as JSON lines and TensorBoard event files."""

from __future__ import annotations

import json
import os
import sys
import time

from mtaclip_jax import errors


def _tensorboardx():
  """tensorboardX, imported without torch. It imports torch when torch is installed
  (2 s of every run's start on a CPU) only to accept torch tensors, inside a
  `try/except ImportError`; this writer passes floats. torch already imported by the
  process is used as is, and a later `import torch` works."""
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    import tensorboardX  # pylint: disable=g-import-not-at-top  (optional, heavy)

    return tensorboardX
  sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top

    return tensorboardX
  finally:
    del sys.modules["torch"]


class MetricWriter:
  """JSON lines + TensorBoard event files (tensorboardX: no TensorFlow needed)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    self.path = os.path.join(workdir, "metrics.jsonl")
    if enabled:
      self._jsonl = open(self.path, "a", encoding="utf-8")
      self._tb = _tensorboardx().SummaryWriter(os.path.join(workdir, "tb"))

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

"""The metric writer: JSON lines and TensorBoard event files, without importing torch
(tensorboardX would import it, 2 s of every run's start, when it is installed)."""

import json
import os
import subprocess
import sys

from tests import train_fixtures

SCRIPT = """
import json, sys
from mtaclip_jax.train import metric_writer
w = metric_writer.MetricWriter(sys.argv[1])
w.write(3, {"train/loss": 1.5})
print(json.dumps({"torch": "torch" in sys.modules}))
import torch  # still importable afterwards
torch.zeros(1)
"""


def test_writes_both_files_without_importing_torch(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-c", SCRIPT, str(tmp_path)],
      capture_output=True,
      text=True,
      cwd=train_fixtures.ROOT,
      env=dict(os.environ, PYTHONPATH=train_fixtures.ROOT),
      timeout=120,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.splitlines()[-1]) == {"torch": False}
  with open(tmp_path / "metrics.jsonl") as f:
    line = json.loads(f.readline())
  assert line["step"] == 3 and line["train/loss"] == 1.5
  (events,) = os.listdir(tmp_path / "tb")
  assert events.startswith("events.out.tfevents") and os.path.getsize(tmp_path / "tb" / events)

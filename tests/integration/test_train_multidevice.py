"""8 fake CPU devices (data parallel, and + FSDP) train exactly like one device; so do 4
with 2 micro-batches per step; and no tensor needs XLA's "involuntary" resharding."""

import os
import re
import subprocess
import sys

import pytest

from tests import train_fixtures

ROOT = train_fixtures.ROOT


@pytest.mark.slow
def test_eight_devices_equal_one(tmp_path):
  root = train_fixtures.make_dataset(tmp_path / "data", train=8)
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tests", "multidevice_train_check.py"), root],
      capture_output=True,
      text=True,
      env=env,
      timeout=900,
      check=False,
  )
  print(proc.stdout[-3000:])
  assert proc.returncode == 0, proc.stderr[-5000:]
  # XLA's SPMD partitioner found a sharding for every tensor of the step (the text
  # tower's shared prompt prefix under FSDP once needed constraints for that).
  assert "Involuntary full rematerialization" not in proc.stderr, proc.stderr[-5000:]
  m = re.search(r"OK max_param_diff=(\S+) max_loss_diff=(\S+)", proc.stdout)
  assert m, proc.stdout[-2000:]
  # Tolerance: fp32, relative to each parameter's largest magnitude / the loss.
  assert float(m.group(1)) <= 1e-5
  assert float(m.group(2)) <= 1e-5

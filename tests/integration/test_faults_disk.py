"""Faults of a real training run (subprocesses): a damaged latest checkpoint, a
checkpoint of another model, the disk filling up mid-run. Each ends bit-identical to
an uninterrupted run or stops with one clear error (faults.py)."""

import errno
import glob
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from mtaclip_jax import errors
from mtaclip_jax.runtime import checkpoint
from mtaclip_jax.train import loop
from mtaclip_jax.train import metric_writer
from tests import train_fixtures
from tests.integration.faults import EVAL_STEP
from tests.integration.faults import ROOT
from tests.integration.faults import STEPS
from tests.integration.faults import assert_identical
from tests.integration.faults import command
from tests.integration.faults import eval_results
from tests.integration.faults import final_state
from tests.integration.faults import run
from tests.integration.faults import steps_on_disk

pytestmark = pytest.mark.slow


def test_damaged_latest_checkpoint_falls_back_and_is_kept(
    data_root, reference, reference_dir, tmp_path
):
  workdir = str(tmp_path / "damaged")
  shutil.copytree(reference_dir, workdir)  # a finished run, as the reference is
  files = [
      f
      for f in glob.glob(
          os.path.join(workdir, "checkpoints", str(STEPS), "state", "**"), recursive=True
      )
      if os.path.isfile(f)
  ]
  assert files
  for f in files:  # truncate every array file of the latest step
    with open(f, "r+b") as fh:
      fh.truncate(max(os.path.getsize(f) // 3, 0))
  proc = run(command(data_root, workdir))
  assert "damaged" in proc.stderr or "cannot restore" in proc.stderr, proc.stderr[-3000:]
  kept = glob.glob(os.path.join(workdir, "checkpoints", f"damaged_step_{STEPS}_*"))
  assert len(kept) == 1  # nothing already saved is lost
  assert_identical(final_state(workdir, STEPS), reference)


def test_wrong_checkpoint_for_the_config_is_named(data_root, reference_dir, tmp_path):
  """In this process (the CLI prints the error as its one `error:` line, exit 1)."""
  workdir = str(tmp_path / "other_model")
  # The latest checkpoint of a finished run (one candidate to try and refuse).
  shutil.copytree(
      os.path.join(reference_dir, "checkpoints", str(STEPS)),
      os.path.join(workdir, "checkpoints", str(STEPS)),
  )
  saved = steps_on_disk(workdir)
  config = train_fixtures.tiny_config(data_root, steps=STEPS + 2, num_classes=3)
  with pytest.raises(errors.CheckpointError, match="no checkpoint could be restored") as e:
    loop.run(config, workdir)
  # ... and names the config keys that differ from the checkpoint's.
  assert "model.num_classes: 4 in the checkpoint, 3 now" in str(e.value), str(e.value)
  assert isinstance(e.value, errors.USER_ERRORS)  # printed as one line, no traceback
  assert steps_on_disk(workdir) == saved  # nothing already saved is lost
  shutil.rmtree(workdir)


# The driver runs the real CLI; from the save of FAIL_AT on, the kernel refuses file
# writes past 64 kB (RLIMIT_FSIZE, with SIGXFSZ ignored: the write fails with EFBIG
# as a full disk fails it with ENOSPC), inside orbax/tensorstore's own writes.
DISK_FULL_DRIVER = """
import resource, signal, sys
from mtaclip_jax.runtime import checkpoint
from mtaclip_jax.cli import main
fail_at = int(sys.argv.pop(1))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
real_save = checkpoint.Checkpointer.save
def save(self, step, *args, **kwargs):
  if step == fail_at:
    self.wait()  # the save before completes with the disk still writable
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))
  return real_save(self, step, *args, **kwargs)
checkpoint.Checkpointer.save = save
sys.argv[0] = "mtaclip_jax.main"
main.cli()
"""


def test_disk_full_mid_run_stops_clearly_then_resumes_bit_exact(
    data_root, reference, reference_dir, tmp_path
):
  workdir = str(tmp_path / "full")
  cmd = command(data_root, workdir)
  full = subprocess.run(
      [sys.executable, "-c", DISK_FULL_DRIVER, "6"] + cmd[3:],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )
  errors = [l for l in full.stderr.splitlines() if l.startswith("error: ")]
  assert full.returncode == 1 and len(errors) == 1, full.stderr[-3000:]
  # orbax's background-thread tracebacks and the closed event loop's (4000+ lines
  # before console.install) are kept off the console; their one-line logs stay.
  assert "Traceback" not in full.stderr, full.stderr[:3000]
  assert len(full.stderr.splitlines()) < 60, full.stderr[:3000]
  assert (
      "cannot write checkpoint step 6 to " + os.path.join(workdir, "checkpoints") in errors[0]
      and "step 4, is intact" in errors[0]
  ), errors[0]
  assert "run the same command again" in errors[0]
  assert steps_on_disk(workdir) == [2, 4]  # complete ones kept, step 6 left half-written
  assert glob.glob(os.path.join(workdir, "checkpoints", "6.orbax-checkpoint-tmp*"))

  resumed = run(cmd)  # space freed: the same command again
  assert "at step 4" in resumed.stderr
  assert not glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*"))
  assert_identical(final_state(workdir, STEPS), reference)
  assert eval_results(workdir, EVAL_STEP) == eval_results(reference_dir, EVAL_STEP)


def test_metrics_write_on_a_full_disk_is_named(tmp_path):
  """/dev/full fails every write with ENOSPC, as a full disk does."""
  os.symlink("/dev/full", tmp_path / "metrics.jsonl")
  writer = metric_writer.MetricWriter(str(tmp_path))
  with pytest.raises(errors.WorkdirError, match="metrics.jsonl at step 3") as e:
    writer.write(3, {"loss": 1.0})
  assert e.value.__cause__.errno == errno.ENOSPC
  assert "run the same command again" in str(e.value)


def test_enospc_from_a_save_names_the_folder_and_the_intact_step(tmp_path, monkeypatch):
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, max_to_keep=3)
  config = ml_collections.ConfigDict({"seed": 0})
  ckpt.save(1, {"w": np.arange(4.0)}, None, config)
  ckpt.wait()

  def full(*args, **kwargs):  # tensorstore's messages can carry a traceback
    raise OSError(
        errno.ENOSPC,
        "No space left on device\nTraceback (most recent call "
        'last):\n  File "serialization.py", line 166',
    )

  monkeypatch.setattr(ckpt.manager, "save", full)
  with pytest.raises(errors.CheckpointSaveError) as e, ckpt.abandon_on_save_error():
    ckpt.save(2, {"w": np.arange(4.0)}, None, config)
  message = str(e.value)
  assert f"step 2 to {tmp_path}/checkpoints" in message and "No space left" in message
  assert "\n" not in message and "Traceback" not in message
  assert "step 1, is intact" in message and steps_on_disk(str(tmp_path)) == [1]

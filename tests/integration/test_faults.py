"""Faults of a real training run (subprocesses): kill -9 at random moments and during
evaluation, SIGTERM, a damaged latest checkpoint, the disk filling up mid-run. Each
ends bit-identical to an uninterrupted run."""

import errno
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mtaclip_jax import errors
from mtaclip_jax.runtime import checkpoint
from mtaclip_jax.train import metric_writer
from tests import train_fixtures

ROOT = train_fixtures.ROOT
STEPS = 12
EVAL_STEP = 10  # every run evaluates at this step, so kills can land mid-evaluation
pytestmark = pytest.mark.slow


def command(data_root, workdir, steps=STEPS, every=2):
  return [
      sys.executable,
      "-m",
      "mtaclip_jax.main",
      "--config",
      f"tests/configs/tiny.py:{data_root}",
      "--workdir",
      str(workdir),
      f"--config.train.steps={steps}",
      f"--config.optim.total_steps={STEPS}",
      f"--config.train.checkpoint_every={every}",
      "--config.train.max_to_keep=3",
      f"--config.eval.every_steps={EVAL_STEP}",
  ]


def run(cmd, timeout=600):
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def steps_on_disk(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def kill9_when(cmd, ready, delay=0.0, timeout=300):
  """Starts `cmd`, waits until `ready(stderr so far)` holds, sleeps `delay` seconds and
  kills it with SIGKILL. Returns True if the kill landed (the run had not ended)."""
  with tempfile.TemporaryFile("w+") as err:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, text=True)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
      err.seek(0)
      if ready(err.read()):
        time.sleep(delay)
        break
      time.sleep(0.02)
    if proc.poll() is not None:
      return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def evaluating(stderr):
  return "eval whole" in stderr  # the evaluation progress bar has started


def final_state(workdir, step):
  mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state",))
  state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  mgr.close()

  def host(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)

  return dict(jax.tree_util.tree_leaves_with_path(jax.tree.map(host, state["state"])))


def assert_identical(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=jax.tree_util.keystr(k))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  return train_fixtures.make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference_dir(data_root, tmp_path_factory):
  """An uninterrupted run (evaluated at EVAL_STEP)."""
  workdir = tmp_path_factory.mktemp("reference")
  run(command(data_root, workdir))
  return str(workdir)


@pytest.fixture(scope="module")
def reference(reference_dir):
  return final_state(reference_dir, STEPS)


def eval_results(workdir, step):
  with open(os.path.join(workdir, "eval", f"step_{step}_whole_class.json")) as f:
    r = json.load(f)
  return {k: r[k] for k in ("mIoU", "mAcc", "aAcc", "IoU", "Acc", "confusion_matrix", "num_images")}


def test_three_kill9_then_resume_is_bit_exact(data_root, reference, reference_dir, tmp_path):
  workdir = str(tmp_path / "killed")
  rng = random.Random(0)
  kills = 0
  for i in range(3):
    seen = steps_on_disk(workdir)
    # Kills 1 and 2 at a random moment after a new complete checkpoint: mid-step,
    # mid-save or mid-start of the next save. Both land before step 10's evaluation can
    # finish, so run 3 evaluates step 10 (reached, or redone after resuming there):
    # kill 3 lands during that evaluation.
    new_checkpoint = lambda _, seen=seen: bool(steps_on_disk(workdir)) and (
        not seen or steps_on_disk(workdir)[-1] > seen[-1]
    )
    kills += kill9_when(
        command(data_root, workdir),
        evaluating if i == 2 else new_checkpoint,
        delay=0.0 if i == 2 else rng.uniform(0.0, 0.8),
    )
    if steps_on_disk(workdir) and steps_on_disk(workdir)[-1] == STEPS:
      break
  assert kills == 3, f"only {kills} kills landed before the run finished"
  assert steps_on_disk(workdir)[-1] < STEPS
  assert not os.path.exists(os.path.join(workdir, "eval", f"step_{EVAL_STEP}_whole_class.json"))
  run(command(data_root, workdir))  # the same command again
  assert_identical(final_state(workdir, STEPS), reference)
  assert eval_results(workdir, EVAL_STEP) == eval_results(reference_dir, EVAL_STEP)


def test_sigterm_saves_and_exits_0_then_resumes(data_root, tmp_path):
  workdir = str(tmp_path / "preempted")
  proc = subprocess.Popen(
      command(data_root, workdir, steps=10_000, every=10_000),
      cwd=ROOT,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
  )
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  saved = steps_on_disk(workdir)
  assert len(saved) == 1 and 3 <= saved[0] < 10_000, saved
  resumed = run(command(data_root, workdir, steps=saved[0] + 2, every=10_000))
  assert "resumed from" in resumed.stderr and f"at step {saved[0]}" in resumed.stderr
  assert steps_on_disk(workdir)[-1] == saved[0] + 2


def test_damaged_latest_checkpoint_falls_back_and_is_kept(data_root, reference, tmp_path):
  workdir = str(tmp_path / "damaged")
  run(command(data_root, workdir))
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


def test_wrong_checkpoint_for_the_config_is_named(data_root, tmp_path):
  workdir = str(tmp_path / "other_model")
  run(command(data_root, workdir, steps=2))
  cmd = command(data_root, workdir, steps=4) + [
      "--config.model.num_classes=3",
      "--config.data.num_classes=3",
  ]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 1, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert errors and "no checkpoint could be restored" in errors[0], proc.stderr[-3000:]
  # ... and names the config keys that differ from the checkpoint's.
  assert "model.num_classes: 4 in the checkpoint, 3 now" in errors[0], errors[0]
  assert steps_on_disk(workdir) == [2]  # nothing already saved is lost
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


def test_kill9_during_mode_eval_then_rerun(data_root, reference, reference_dir):
  cmd = command(data_root, reference_dir) + ["--mode=eval", f"--config.eval.step={EVAL_STEP}"]
  before = eval_results(reference_dir, EVAL_STEP)  # the in-training evaluation
  assert kill9_when(cmd, evaluating)
  assert eval_results(reference_dir, EVAL_STEP) == before  # not half-overwritten
  assert_identical(final_state(reference_dir, STEPS), reference)  # nothing damaged
  run(cmd)
  assert eval_results(reference_dir, EVAL_STEP) == before


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

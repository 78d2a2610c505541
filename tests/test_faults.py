"""Faults of a real training run (subprocesses): kill -9 at random moments, SIGTERM,
a damaged latest checkpoint. Each ends bit-identical to an uninterrupted run."""

import glob
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import train_fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
pytestmark = pytest.mark.slow


def command(data_root, workdir, steps=STEPS, every=2):
  return [sys.executable, "-m", "mtaclip_jax.main",
          "--config", f"tests/configs/tiny.py:{data_root}", "--workdir", str(workdir),
          f"--config.train.steps={steps}", f"--config.optim.total_steps={STEPS}",
          f"--config.train.checkpoint_every={every}", "--config.train.max_to_keep=3"]


def run(cmd, timeout=600):
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def steps_on_disk(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


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
def reference(data_root, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  run(command(data_root, workdir))
  return final_state(str(workdir), STEPS)


def test_three_kill9_then_resume_is_bit_exact(data_root, reference, tmp_path):
  workdir = str(tmp_path / "killed")
  rng = random.Random(0)
  kills = 0
  for _ in range(3):
    seen = steps_on_disk(workdir)
    proc = subprocess.Popen(command(data_root, workdir), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # Wait for a new complete checkpoint, then kill at a random moment after it:
    # mid-step, mid-save or mid-start of the next save.
    while proc.poll() is None and time.time() < deadline:
      now = steps_on_disk(workdir)
      if now and (not seen or now[-1] > seen[-1]):
        time.sleep(rng.uniform(0.0, 0.8))
        break
      time.sleep(0.05)
    if proc.poll() is None:
      os.kill(proc.pid, signal.SIGKILL)
      proc.wait()
      kills += 1
    if steps_on_disk(workdir) and steps_on_disk(workdir)[-1] == STEPS:
      break
  assert kills == 3, f"only {kills} kills landed before the run finished"
  assert steps_on_disk(workdir)[-1] < STEPS
  run(command(data_root, workdir))  # the same command again
  assert_identical(final_state(workdir, STEPS), reference)


def test_sigterm_saves_and_exits_0_then_resumes(data_root, tmp_path):
  workdir = str(tmp_path / "preempted")
  proc = subprocess.Popen(command(data_root, workdir, steps=10_000, every=10_000),
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
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
  assert f"resumed from" in resumed.stderr and f"at step {saved[0]}" in resumed.stderr
  assert steps_on_disk(workdir)[-1] == saved[0] + 2


def test_damaged_latest_checkpoint_falls_back_and_is_kept(data_root, reference, tmp_path):
  workdir = str(tmp_path / "damaged")
  run(command(data_root, workdir))
  files = [f for f in glob.glob(os.path.join(workdir, "checkpoints", str(STEPS), "state",
                                             "**"), recursive=True) if os.path.isfile(f)]
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
  cmd = command(data_root, workdir, steps=4) + ["--config.model.num_classes=3",
                                               "--config.data.num_classes=3"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 1, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert errors and "no checkpoint could be restored" in errors[0], proc.stderr[-3000:]
  assert steps_on_disk(workdir) == [2]  # nothing already saved is lost
  shutil.rmtree(workdir)

"""What the fault tests share: the tiny model's training command, run helpers and the
comparison of final states (tests/integration/test_faults_*.py)."""

import json
import os
import signal
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from tests import cli_process
from tests import train_fixtures

ROOT = train_fixtures.ROOT
STEPS = 12
EVAL_STEP = 10  # every run evaluates at this step, so kills can land mid-evaluation


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
  """Runs the command line `cmd` (`[python, "-m", module, ...]`) in a process of its
  own forked from one that imported the CLI (tests/cli_process.py)."""
  module, args = cli_process.module_args(cmd)
  proc = cli_process.run(module, *args, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def steps_on_disk(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def kill9_when(cmd, ready, delay=0.0, timeout=300):
  """Starts the command line `cmd` (as `run`), waits until `ready(stderr so far)` holds,
  sleeps `delay` seconds and kills it with SIGKILL. Returns True if the kill landed
  (the run had not ended).
  """
  module, args = cli_process.module_args(cmd)
  proc = cli_process.start(module, *args)
  try:
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
      if ready(proc.stderr()):
        time.sleep(delay)
        break
      time.sleep(0.02)
    if proc.poll() is not None:
      return False
    proc.signal(signal.SIGKILL)
    proc.wait()
    return True
  finally:
    proc.close()


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


def eval_results(workdir, step):
  with open(os.path.join(workdir, "eval", f"step_{step}_whole_class.json")) as f:
    r = json.load(f)
  return {k: r[k] for k in ("mIoU", "mAcc", "aAcc", "IoU", "Acc", "confusion_matrix", "num_images")}


def data_root():
  """The generated dataset of the fault tests, made once per session."""
  base = train_fixtures.shared("faults_data", train_fixtures.make_dataset)
  return os.path.join(base, "ADEChallengeData2016")


def reference_dir():
  """An uninterrupted run (evaluated at EVAL_STEP), made once per session: tests copy
  it before they change anything in it."""
  root = data_root()
  return train_fixtures.shared("faults_reference", lambda d: run(command(root, d)))

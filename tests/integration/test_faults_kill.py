"""Faults of a real training run (subprocesses): kill -9 at random moments and during
evaluation, SIGTERM. Each ends bit-identical to an uninterrupted run (faults.py)."""

import os
import random
import shutil
import signal
import time

import pytest

from tests import cli_process
from tests.integration.faults import EVAL_STEP
from tests.integration.faults import STEPS
from tests.integration.faults import assert_identical
from tests.integration.faults import command
from tests.integration.faults import eval_results
from tests.integration.faults import evaluating
from tests.integration.faults import final_state
from tests.integration.faults import kill9_when
from tests.integration.faults import run
from tests.integration.faults import steps_on_disk

pytestmark = pytest.mark.slow


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


def test_sigterm_saves_and_exits_0_then_resumes(data_root, reference, tmp_path):
  """Preempted between checkpoints: SIGTERM saves the step reached and exits 0; the run
  continued to STEPS (more steps than the stopped run asked for) ends bit-identical to
  the uninterrupted one."""
  workdir = str(tmp_path / "preempted")
  module, args = cli_process.module_args(command(data_root, workdir, steps=10_000, every=10_000))
  proc = cli_process.start(module, *args)
  try:
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
      if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3:
        break
      time.sleep(0.05)
    proc.signal(signal.SIGTERM)
    returncode = proc.wait(timeout=300)
    assert returncode == 0, proc.stderr()[-3000:]
  finally:
    proc.close()
  saved = steps_on_disk(workdir)
  assert len(saved) == 1 and 3 <= saved[0] < STEPS, saved
  resumed = run(command(data_root, workdir))
  assert "resumed from" in resumed.stderr and f"at step {saved[0]}" in resumed.stderr
  assert steps_on_disk(workdir)[-1] == STEPS
  assert_identical(final_state(workdir, STEPS), reference)


def test_kill9_during_mode_eval_then_rerun(data_root, reference, reference_dir, tmp_path):
  workdir = str(tmp_path / "evaluated")
  shutil.copytree(reference_dir, workdir)
  cmd = command(data_root, workdir) + ["--mode=eval", f"--config.eval.step={EVAL_STEP}"]
  before = eval_results(workdir, EVAL_STEP)  # the in-training evaluation
  assert kill9_when(cmd, evaluating)
  assert eval_results(workdir, EVAL_STEP) == before  # not half-overwritten
  assert_identical(final_state(workdir, STEPS), reference)  # nothing damaged
  run(cmd)
  assert eval_results(workdir, EVAL_STEP) == before

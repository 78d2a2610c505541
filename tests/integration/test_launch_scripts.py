"""The launch scripts' own work, with a stand-in interpreter that prints what it was
given (the real runs on CPU are in test_multihost.py): arguments arrive unchanged
(quoting, spaces, parentheses), relative paths stay relative to where the script is
run, the interpreter is chosen the same way by all, the process variables are
derived from SLURM's, and a failing process's status is the launcher's."""

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from tests import train_fixtures

LAUNCH = os.path.join(train_fixtures.ROOT, "launch")
TRICKY = ["--config.data.crop_size=(64, 64)", "--config.x='a b'", 'say "hi"', "$HOME", ""]

# Prints its arguments, working folder and the variables the scripts set, as one JSON
# line written in two pieces (as `print` does unbuffered), so a launcher that passes the
# processes' writes through as they come mixes up their lines; exits with
# FAKE_EXIT_<JAX_PROCESS_ID or process id> if that is set.
FAKE_PYTHON = """#!{python}
import json, os, sys, time
args = sys.argv[1:]
pid = os.environ.get("JAX_PROCESS_ID") or next(
    (a.split("=")[1] for a in args if a.startswith("--process_id=")), "0")
keys = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "XLA_FLAGS",
        "PYTHONPATH")
line = json.dumps({{"args": args, "cwd": os.getcwd(),
                   "env": {{k: os.environ.get(k) for k in keys}}}})
sys.stdout.write(line[:40]); sys.stdout.flush(); time.sleep(0.05)
sys.stdout.write(line[40:] + "\\n"); sys.stdout.flush()
sys.exit(int(os.environ.get("FAKE_EXIT_" + pid, "0")))
"""

FAKE_SRUN = """#!/usr/bin/env bash
while [[ $1 == -* ]]; do shift; done
# One task after the other: their JSON lines never interleave on the shared stdout.
for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i "$@"; done
"""

# A large allocation's host list: a reader that stops after the first line would leave
# scontrol writing into a closed pipe (SIGPIPE, status 141 under pipefail).
FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1 $2" in
  "show hostnames") printf 'node7\\nnode8\\n'; seq -f 'node%g' 9 50000 ;;
  "show job") echo "   Command=$FAKE_SBATCH_PATH" ;;
esac
"""

FAKE_GCLOUD = """#!/usr/bin/env bash
while [ $# -gt 0 ]; do
  case "$1" in --command) cmd=$2; shift 2 ;; *) shift ;; esac
done
exec bash -c "$cmd"
"""


def _write(path, text):
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
  return path


@pytest.fixture
def env(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _write(bin_dir / "srun", FAKE_SRUN)
  _write(bin_dir / "scontrol", FAKE_SCONTROL)
  _write(bin_dir / "gcloud", FAKE_GCLOUD)
  python = _write(tmp_path / "fake_python", FAKE_PYTHON.format(python=sys.executable))
  e = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_"))}
  return dict(
      e,
      PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
      PYTHON=str(python),
      FAKE_SBATCH_PATH=os.path.join(LAUNCH, "gpu_slurm.sbatch"),
  )


def _run(cmd, env, cwd, code=0):
  proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
  assert proc.returncode == code, proc.stdout + proc.stderr
  lines = [
      l.split("] ", 1)[1] if l.startswith("[process ") else l for l in proc.stdout.splitlines()
  ]
  return proc, [json.loads(l) for l in lines if l.startswith("{")]


def test_single_node_passes_arguments_unchanged_from_where_it_is_run(env, tmp_path):
  _, (run,) = _run([f"{LAUNCH}/gpu_single_node.sh", "cfg.py", "work dir"], env, tmp_path)
  assert run["args"] == ["-m", "mtaclip_jax.main", "--config", "cfg.py", "--workdir", "work dir"]
  assert run["cwd"] == str(tmp_path)
  assert run["env"]["PYTHONPATH"].split(os.pathsep)[0] == train_fixtures.ROOT


def test_single_node_keeps_every_override(env, tmp_path):
  _, (run,) = _run([f"{LAUNCH}/gpu_single_node.sh", "cfg.py", "w"] + TRICKY, env, tmp_path)
  assert run["args"][6:] == TRICKY


def test_tpu_pod_workers_get_the_arguments_as_typed(env, tmp_path):
  """The remote command line is built with printf %q; the fake gcloud runs it here."""
  cmd = [f"{LAUNCH}/tpu_pod.sh", "tpu", "zone", "my cfg.py", "w"] + TRICKY
  _, (run,) = _run(cmd, env, tmp_path)
  assert run["args"] == ["-m", "mtaclip_jax.main", "--config", "my cfg.py", "--workdir", "w"] + (
      TRICKY
  )
  assert run["cwd"] == str(tmp_path)  # REMOTE_DIR: where it was run
  _, (run,) = _run(cmd, dict(env, REMOTE_DIR="/"), tmp_path)
  assert run["cwd"] == "/"


def test_slurm_derives_the_process_variables(env, tmp_path):
  slurm = dict(env, SLURM_JOB_ID="42", SLURM_NTASKS="2", SLURM_JOB_NODELIST="node[7-8]")
  cmd = ["bash", f"{LAUNCH}/gpu_slurm.sbatch", "cfg.py", "w"] + TRICKY
  _, runs = _run(cmd, slurm, tmp_path)
  runs = sorted(runs, key=lambda r: r["env"]["JAX_PROCESS_ID"])
  assert [r["env"]["JAX_PROCESS_ID"] for r in runs] == ["0", "1"]
  for r in runs:
    assert r["env"]["JAX_COORDINATOR_ADDRESS"] == "node7:12355"
    assert r["env"]["JAX_NUM_PROCESSES"] == "2"
    assert r["args"][6:] == TRICKY and r["cwd"] == str(tmp_path)
  _, runs = _run(cmd, dict(slurm, MTACLIP_PORT="999"), tmp_path)
  assert runs[0]["env"]["JAX_COORDINATOR_ADDRESS"] == "node7:999"


def test_multinode_without_slurm_needs_the_three_variables(env, tmp_path):
  proc, _ = _run([f"{LAUNCH}/gpu_multinode.sh", "cfg.py", "w"], env, tmp_path, code=2)
  assert "JAX_COORDINATOR_ADDRESS is not set" in proc.stderr
  plain = dict(env, JAX_COORDINATOR_ADDRESS="h:1", JAX_NUM_PROCESSES="4", JAX_PROCESS_ID="3")
  _, (run,) = _run([f"{LAUNCH}/gpu_multinode.sh", "cfg.py", "w"], plain, tmp_path)
  assert run["env"]["JAX_PROCESS_ID"] == "3"


def test_local_multiprocess_starts_n_and_returns_the_first_failure(env, tmp_path):
  cmd = [f"{LAUNCH}/local_multiprocess.sh", "3", "cfg.py", "w", "--config.k=(1, 2)"]
  _, runs = _run(cmd, dict(env, DEVICES_PER_PROCESS="2", MTACLIP_PORT="4321"), tmp_path)
  assert len(runs) == 3  # processes 1 and 2 with their lines prefixed "[process I] "
  ids = sorted(a for r in runs for a in r["args"] if a.startswith("--process_id="))
  assert ids == [f"--process_id={i}" for i in range(3)]
  for r in runs:
    assert "--coordinator_address=localhost:4321" in r["args"]
    assert "--num_processes=3" in r["args"] and r["args"][-1] == "--config.k=(1, 2)"
    assert "--xla_force_host_platform_device_count=2" in r["env"]["XLA_FLAGS"]
  proc, _ = _run(cmd, dict(env, FAKE_EXIT_1="3", GRACE="1", MTACLIP_PORT="1"), tmp_path, code=3)
  assert "launch: process 1 exited with status 3" in proc.stderr
  proc, _ = _run(cmd[:2], env, tmp_path, code=2)
  assert "usage:" in proc.stderr


@pytest.mark.parametrize(
    "script", ["gpu_single_node.sh", "gpu_multinode.sh", "tpu_pod.sh", "local_multiprocess.sh"]
)
def test_usage(script, env, tmp_path):
  proc, _ = _run([f"{LAUNCH}/{script}"], env, tmp_path, code=2)
  assert proc.stderr.startswith("usage:")


def test_interpreter_choice(tmp_path):
  """$PYTHON, else the checkout's .venv/bin/python, else python3 (launch/common.sh)."""
  checkout = tmp_path / "checkout"
  (checkout / "launch").mkdir(parents=True)
  shutil.copy(os.path.join(LAUNCH, "common.sh"), checkout / "launch" / "common.sh")
  ask = ["bash", "-c", f"source {checkout}/launch/common.sh && mtaclip_python"]
  env = {k: v for k, v in os.environ.items() if k != "PYTHON"}

  def choice(**extra):
    return subprocess.run(
        ask, env=dict(env, **extra), capture_output=True, text=True, check=True
    ).stdout.strip()

  assert os.path.basename(choice()) == "python3"
  venv = checkout / ".venv" / "bin"
  venv.mkdir(parents=True)
  _write(venv / "python", "#!/bin/sh\n")
  assert choice() == str(venv / "python")
  assert choice(PYTHON="/opt/py") == "/opt/py"

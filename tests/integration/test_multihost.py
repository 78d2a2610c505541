"""Several processes on one machine, as several hosts run (jax.distributed over gloo,
started by the launch scripts with SLURM and TPU tools faked): the same training on
any topology, resume on any topology, one evaluation split over processes, SIGTERM
to one process, start-up errors and a killed process.

One uninterrupted run (1 process x 8 CPU devices with FSDP, launch/tpu_pod.sh) is the
reference. Then, on the tiny model with the global batch of 8:
- 2 processes x 2 devices train from scratch until process 1 alone gets SIGTERM:
  both save the same step k and exit 0 (launch/local_multiprocess.sh);
- 1 process x 4 devices resumes that to the end (launch/gpu_single_node.sh);
- 2 processes x 2 devices with FSDP resume its step k + 1 to the end and evaluate,
  each image once (launch/gpu_slurm.sbatch -> srun -> launch/gpu_multinode.sh), and
  again with `--mode eval` (launch/local_multiprocess.sh), equal to one process's
  evaluation;
- 1 device without FSDP resumes the reference's step 4 to the end (in this process);
each checkpoint equal to the reference's of the same step within TOLERANCE.

TOLERANCE: the same batches reach the model bit for bit (tests/unit/data/
test_global_order.py), but the gradient's cross-device sum adds the per-device
partial sums in an order that depends on the topology (inside one process or over
gloo between processes; 8, 4, 2 or 1 devices), so fp32 results differ in the last
bits (about 1e-7 relative per step) and Adam carries that forward. With eps = 1e-3
(as tests/multidevice_train_check.py; the recipe's 1e-8 amplifies the rounding noise
of parameters whose exact gradient is zero) and uniformly sampled loss points (the
default importance sampling takes a top-k of near-tied uncertainties, which rounding
can tip: docs/SCALING.md) 8 steps stay within 2e-5 of each parameter's largest
magnitude; the losses within 1e-5 relative.
"""

import glob
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import portpicker
import pytest

from mtaclip_jax.evaluation import evaluate
from mtaclip_jax.train import loop
from mtaclip_jax.train import pretrained
from mtaclip_jax.train import train_state
from tests import train_fixtures

ROOT = train_fixtures.ROOT
STEPS = 8
BATCH = 8
TOLERANCE = 2e-5
TIMEOUT = 900  # seconds for any one command (compiling the step cold on 2 cores)
HEARTBEAT_SLACK = 20  # seconds beyond --heartbeat_timeout for a killed peer to be noticed
pytestmark = pytest.mark.slow

FAKE_SRUN = r"""#!/usr/bin/env bash
# srun for one machine: SLURM_NTASKS copies of the command, SLURM_PROCID 0..N-1.
while [[ $1 == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
case "$1 $2" in
  "show hostnames") echo localhost ;;
  "show job") echo "   Command=$FAKE_SBATCH_PATH" ;;
esac
"""

FAKE_GCLOUD = r"""#!/usr/bin/env bash
# gcloud compute tpus tpu-vm ssh ... --worker=all --command CMD, for a one-worker slice.
while [ $# -gt 0 ]; do
  case "$1" in
    --command) cmd=$2; shift 2 ;;
    --command=*) cmd=${1#--command=}; shift ;;
    *) shift ;;
  esac
done
exec bash -c "$cmd"
"""


def _tool(folder, name, text):
  path = os.path.join(folder, name)
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """The environment of every command: fake srun/scontrol/gcloud first on PATH, this
  interpreter, and the test session's XLA flags and compilation cache."""
  bin_dir = str(tmp_path_factory.mktemp("bin"))
  _tool(bin_dir, "srun", FAKE_SRUN)
  _tool(bin_dir, "scontrol", FAKE_SCONTROL)
  _tool(bin_dir, "gcloud", FAKE_GCLOUD)
  e = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ["PATH"], PYTHON=sys.executable)
  e.pop("JAX_COORDINATOR_ADDRESS", None)
  e["FAKE_SBATCH_PATH"] = os.path.join(ROOT, "launch", "gpu_slurm.sbatch")
  return e


def _devices(env, n):
  flags = env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
  return dict(env, XLA_FLAGS=flags.strip())


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  # 3 validation images: 2 processes evaluate 2 and 1.
  return train_fixtures.make_dataset(tmp_path_factory.mktemp("data"), train=8, val=3)


def overrides(steps=STEPS, every=1, eval_at_end=False):
  return [
      f"--config.data.batch_size={BATCH}",
      f"--config.train.steps={steps}",
      f"--config.optim.total_steps={STEPS}",
      f"--config.train.checkpoint_every={every}",
      "--config.train.max_to_keep=20",
      "--config.optim.eps=0.001",
      "--config.loss.importance_sample_ratio=0.0",
      f"--config.eval.at_end={eval_at_end}",
  ]


FSDP = ["--config.mesh.fsdp=True", "--config.mesh.fsdp_min_size=1024"]


def config_arg(data_root):
  return f"{os.path.join(ROOT, 'tests', 'configs', 'tiny.py')}:{data_root}"


def run(cmd, env, cwd, timeout=TIMEOUT):
  proc = subprocess.run(
      cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
  )
  assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
  return proc


def steps_on_disk(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def state_at(workdir, step):
  """{path: numpy array} of the train state saved at `step`, read onto this process's
  one device whatever mesh saved it."""
  config = train_fixtures.tiny_config("unused", batch=BATCH)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one),
      train_fixtures.abstract_state(config),
  )
  mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state",))
  try:
    restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  finally:
    mgr.close()

  def host(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)

  leaves = jax.tree_util.tree_leaves_with_path(jax.tree.map(host, restored["state"]))
  return {jax.tree_util.keystr(k): v for k, v in leaves}


def assert_close(workdir, reference, step):
  got, want = state_at(workdir, step), state_at(reference, step)
  assert got.keys() == want.keys()
  worst = 0.0
  for k, w in want.items():
    g = got[k]
    if w.dtype.kind in "iub":  # step counters, RNG key data: equal
      np.testing.assert_array_equal(g, w, err_msg=k)
      continue
    scale = max(float(np.max(np.abs(w))), 1e-2)
    worst = max(worst, float(np.max(np.abs(g - w))) / scale)
  assert worst <= TOLERANCE, f"step {step}: parameters differ by {worst:.3g} relative"
  return worst


def losses(workdir):
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      try:
        r = json.loads(line)
      except json.JSONDecodeError:  # a line still being written
        continue
      if "train/loss" in r:
        out[r["step"]] = r["train/loss"]
  return out


def assert_losses_close(workdir, reference):
  got, want = losses(workdir), losses(reference)
  assert got and set(got) <= set(want), (got, want)
  for s, v in got.items():
    assert abs(v - want[s]) <= 1e-5 * abs(want[s]), (s, v, want[s])


@pytest.fixture(scope="module")
def reference(data_root, env, tmp_path_factory):
  """1 process x 8 devices with FSDP, uninterrupted, a checkpoint every step
  (launch/tpu_pod.sh through a fake gcloud: a one-worker slice)."""
  cwd = str(tmp_path_factory.mktemp("reference"))
  cmd = [os.path.join(ROOT, "launch", "tpu_pod.sh"), "tpu", "zone", config_arg(data_root), "ref"]
  run(cmd + overrides() + FSDP, _devices(env, 8), cwd)
  return os.path.join(cwd, "ref")


def _child(parent_pid, marker):
  """The pid of `parent_pid`'s child process whose command line contains `marker`."""
  for stat_file in glob.glob("/proc/[0-9]*/stat"):
    try:
      with open(stat_file) as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
      if ppid != parent_pid:
        continue
      with open(stat_file[: -len("stat")] + "cmdline", "rb") as f:
        if marker.encode() in f.read():
          return int(stat_file.split("/")[2])
    except (OSError, ValueError, IndexError):
      continue
  return None


@pytest.fixture(scope="module")
def stopped(data_root, env, tmp_path_factory):
  """2 processes x 2 devices from scratch; SIGTERM to process 1 alone after step 2.
  Returns (workdir, the step both saved)."""
  workdir = str(tmp_path_factory.mktemp("two") / "run")
  cmd = [os.path.join(ROOT, "launch", "local_multiprocess.sh"), "2", config_arg(data_root)]
  cmd += [workdir] + overrides(every=1000)
  launcher = subprocess.Popen(
      cmd,
      cwd=ROOT,
      env=dict(env, DEVICES_PER_PROCESS="2", MTACLIP_PORT=str(portpicker.pick_unused_port())),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )
  try:
    deadline = time.time() + TIMEOUT
    metrics = os.path.join(workdir, "metrics.jsonl")
    while time.time() < deadline and launcher.poll() is None:
      if os.path.exists(metrics) and len(losses(workdir)) >= 2:
        break
      time.sleep(0.05)
    process_1 = _child(launcher.pid, "--process_id=1")
    assert process_1 is not None, "process 1 not found"
    os.kill(process_1, signal.SIGTERM)
    out, _ = launcher.communicate(timeout=TIMEOUT)
  finally:
    if launcher.poll() is None:
      launcher.kill()
  assert launcher.returncode == 0, out[-6000:]
  saved = steps_on_disk(workdir)
  assert len(saved) == 1 and 2 <= saved[0] < STEPS - 1, (saved, out[-3000:])
  return workdir, saved[0]


def test_two_processes_train_like_one_and_stop_together_on_sigterm(stopped, reference):
  workdir, k = stopped
  assert_close(workdir, reference, k)
  assert_losses_close(workdir, reference)
  # Only process 0 wrote the metrics and TensorBoard files: each step once, one file.
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == sorted(set(steps)), steps
  assert len(glob.glob(os.path.join(workdir, "tb", "**", "events.*"), recursive=True)) == 1


@pytest.fixture(scope="module")
def resumed_on_one(stopped, data_root, env, tmp_path_factory):
  """The 2-process checkpoint resumed by 1 process x 4 devices to the end, from a
  relative workdir (launch/gpu_single_node.sh, an override with spaces)."""
  workdir, k = stopped
  cwd = str(tmp_path_factory.mktemp("one"))
  shutil.copytree(workdir, os.path.join(cwd, "run"))
  cmd = [os.path.join(ROOT, "launch", "gpu_single_node.sh"), config_arg(data_root), "run"]
  cmd += overrides() + ["--config.data.crop_size=(64, 64)"]
  proc = run(cmd, _devices(env, 4), cwd)
  assert f"at step {k}" in proc.stderr, proc.stderr[-3000:]
  return os.path.join(cwd, "run"), k


def test_resume_two_processes_on_one(resumed_on_one, reference):
  workdir, k = resumed_on_one
  assert steps_on_disk(workdir) == list(range(k, STEPS + 1))
  assert_close(workdir, reference, k + 1)
  assert_close(workdir, reference, STEPS)  # ends where the uninterrupted run ends
  assert_losses_close(workdir, reference)


@pytest.fixture(scope="module")
def resumed_on_two(resumed_on_one, data_root, env, tmp_path_factory):
  """The step k + 1 that 1 process saved, resumed by 2 processes x 2 devices with FSDP
  (parameters split over both processes) to the end, evaluated at the end
  (launch/gpu_slurm.sbatch -> srun -> launch/gpu_multinode.sh, SLURM faked)."""
  workdir, k = resumed_on_one
  step = k + 1
  cwd = str(tmp_path_factory.mktemp("slurm"))
  shutil.copytree(workdir, os.path.join(cwd, "run"))
  for later in range(step + 1, STEPS + 1):
    shutil.rmtree(os.path.join(cwd, "run", "checkpoints", str(later)))
  slurm = dict(
      _devices(env, 2),
      SLURM_JOB_ID="1",
      SLURM_NTASKS="2",
      SLURM_NNODES="2",
      SLURM_JOB_NODELIST="localhost",
      MTACLIP_PORT=str(portpicker.pick_unused_port()),
  )
  cmd = ["bash", os.path.join(ROOT, "launch", "gpu_slurm.sbatch"), config_arg(data_root), "run"]
  proc = run(cmd + overrides(every=1000, eval_at_end=True) + FSDP, slurm, cwd)
  assert f"at step {step}" in proc.stderr, proc.stderr[-3000:]
  return os.path.join(cwd, "run")


def eval_results(workdir):
  (path,) = glob.glob(os.path.join(workdir, "eval", f"step_{STEPS}_*.json"))
  with open(path) as f:
    return json.load(f)


def test_resume_one_process_on_two_and_evaluate_each_image_once(
    resumed_on_two, reference, data_root, env
):
  assert_close(resumed_on_two, reference, STEPS)
  trained = eval_results(resumed_on_two)  # by the 2 processes at the end of training
  assert trained["num_images"] == 3  # not 3 per process
  # `--mode eval` by 2 processes (launch/local_multiprocess.sh): the same result.
  cmd = [os.path.join(ROOT, "launch", "local_multiprocess.sh"), "2", config_arg(data_root)]
  cmd += [resumed_on_two, "--mode=eval"] + overrides() + FSDP
  run(cmd, dict(env, DEVICES_PER_PROCESS="2"), ROOT)
  again = eval_results(resumed_on_two)
  assert again["confusion_matrix"] == trained["confusion_matrix"]
  # The same checkpoint evaluated here by one process: the same totals exactly.
  config = train_fixtures.tiny_config(data_root, steps=STEPS, batch=BATCH)
  one = evaluate.run(config, resumed_on_two)
  np.testing.assert_array_equal(np.asarray(one["confusion_matrix"]), trained["confusion_matrix"])
  assert one["num_images"] == 3 and one["mIoU"] == pytest.approx(trained["mIoU"], abs=1e-9)


def test_eight_devices_fsdp_resumed_on_one_device_without(
    reference, data_root, tmp_path, monkeypatch
):
  """The reference's step 4 (8 devices, FSDP) resumed to the end by one device without
  FSDP (this process), reading the state straight from the checkpoint: nothing is
  initialised and no pretrained weights are read."""

  def not_on_resume(*args, **kwargs):
    raise AssertionError("a resumed run initialised the state")

  monkeypatch.setattr(train_state.TracedInit, "init", not_on_resume)
  monkeypatch.setattr(pretrained, "load_pretrained", not_on_resume)
  run_dir = os.path.join(str(tmp_path), "run")
  os.makedirs(os.path.join(run_dir, "checkpoints"))
  shutil.copytree(
      os.path.join(reference, "checkpoints", "4"), os.path.join(run_dir, "checkpoints", "4")
  )
  assert len(jax.devices()) == 1
  config = train_fixtures.tiny_config(data_root, steps=STEPS, batch=BATCH)
  config.optim.eps = 1e-3
  config.loss.importance_sample_ratio = 0.0
  config.train.update(checkpoint_every=1000, max_to_keep=20)
  loop.run(config, run_dir)
  assert steps_on_disk(run_dir) == [4, STEPS]
  assert_close(run_dir, reference, STEPS)


def _start(data_root, workdir, port, process_id, env, extra=()):
  cmd = [sys.executable, "-m", "mtaclip_jax.main", "--config", config_arg(data_root)]
  cmd += ["--workdir", workdir, f"--coordinator_address=localhost:{port}"]
  cmd += ["--num_processes=2", f"--process_id={process_id}"] + overrides() + list(extra)
  return subprocess.Popen(
      cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
  )


def test_a_failed_start_up_check_stops_every_process_with_its_error(data_root, env, tmp_path):
  """Process 1 alone has a missing dataset: both exit 1 with the same error line."""
  port, workdir = portpicker.pick_unused_port(), str(tmp_path / "run")
  procs = [
      _start(data_root, workdir, port, 0, _devices(env, 2)),
      _start(
          data_root, workdir, port, 1, _devices(env, 2), [f"--config.data.root={tmp_path}/none"]
      ),
  ]
  lines = []
  for p in procs:
    _, err = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 1, err[-3000:]
    errs = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(errs) == 1 and "Traceback" not in err, err[-3000:]
    lines.append(errs[0])
  assert lines[0] == lines[1], lines
  assert f"{tmp_path}/none" in lines[0] and "(on process 1 of 2)" in lines[0], lines[0]
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


def test_a_killed_process_stops_the_others(data_root, env, tmp_path):
  """kill -9 of one process: started directly, the other ends within the heartbeat
  timeout (jax's coordination service); under launch/local_multiprocess.sh, the
  launcher stops it at once and exits with the killed process's status."""
  port, workdir = portpicker.pick_unused_port(), str(tmp_path / "direct")
  extra = ["--heartbeat_timeout=5"]
  survivor = _start(data_root, workdir, port, 0, _devices(env, 2), extra)
  victim = _start(data_root, workdir, port, 1, _devices(env, 2), extra)
  seen = ""
  deadline = time.time() + TIMEOUT
  while "jax.distributed: 2 processes" not in seen and time.time() < deadline:
    seen += survivor.stderr.readline()
    assert survivor.poll() is None, seen[-3000:]
  victim.kill()
  killed_at = time.time()
  _, rest = survivor.communicate(timeout=TIMEOUT)
  elapsed = time.time() - killed_at
  assert survivor.returncode != 0
  # The heartbeat timeout, then the time the service takes to tell the survivor and
  # the survivor to abort (docs/SCALING.md).
  assert elapsed < 5 + HEARTBEAT_SLACK, f"{elapsed:.1f} s\n{rest[-3000:]}"
  print(f"the survivor ended {elapsed:.1f} s after the kill (heartbeat timeout 5 s)")
  assert "another task died" in rest, rest[-3000:]
  victim.wait()

  cmd = [os.path.join(ROOT, "launch", "local_multiprocess.sh"), "2", config_arg(data_root)]
  launcher = subprocess.Popen(
      cmd + [str(tmp_path / "launched")] + overrides(),
      cwd=ROOT,
      env=dict(env, DEVICES_PER_PROCESS="2", GRACE="1"),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
  )
  deadline = time.time() + TIMEOUT
  process_0 = process_1 = None
  while not (process_0 and process_1) and time.time() < deadline:
    process_0 = _child(launcher.pid, "--process_id=0")
    process_1 = _child(launcher.pid, "--process_id=1")
    time.sleep(0.1)
  time.sleep(3)  # into its start-up
  os.kill(process_1, signal.SIGKILL)
  killed_at = time.time()
  _, err = launcher.communicate(timeout=TIMEOUT)
  assert launcher.returncode == 128 + signal.SIGKILL, err[-3000:]
  assert "launch: process 1 exited with status 137; stopping the others" in err
  assert time.time() - killed_at < 30, err[-3000:]
  with pytest.raises(ProcessLookupError):  # process 0 is gone too
    os.kill(process_0, 0)

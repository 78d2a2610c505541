"""A paper config without converted weights stops at start-up with one line naming the
flags and the conversion command; `--config.init.allow_random=True` goes on."""

import subprocess
import sys

from tests import train_fixtures


def run_main(*args):
  proc = subprocess.run(
      [sys.executable, "-m", "mtaclip_jax.main", *args],
      capture_output=True,
      text=True,
      cwd=train_fixtures.ROOT,
      timeout=300,
      check=False,
  )
  return proc.returncode, proc.stderr.strip().splitlines()


def test_paper_config_without_weights_stops_with_the_command(tmp_path):
  workdir = tmp_path / "run"
  rc, err = run_main("--config", "configs/ade20k_r50.py", "--workdir", str(workdir))
  assert rc == 1, err
  line = err[-1]
  assert line.startswith("error: RN50 model without pretrained weights"), err
  for part in (
      "--config.init.clip=DIR",
      "python -m convert_weights --src RN50.pt --out DIR --allow-torchscript",
      "--config.init.allow_random=True",
  ):
    assert part in line, (part, line)
  assert not any("Traceback" in l for l in err), err
  assert not workdir.exists()  # stopped before anything was made


def test_allow_random_goes_on_to_the_next_check(tmp_path):
  rc, err = run_main(
      "--config",
      "configs/ade20k_r50.py",
      "--workdir",
      str(tmp_path / "run"),
      "--config.init.allow_random=True",
      "--config.data.root=/nonexistent/ADE",
  )
  assert rc == 1 and "/nonexistent/ADE" in err[-1], err
  assert not any("Traceback" in l for l in err), err

"""Mistakes on the command line give one line naming the key or file, exit code 2."""

import pytest

from tests import cli_process
from tests import train_fixtures

ROOT = train_fixtures.ROOT


def run_main(*args):
  proc = cli_process.run("mtaclip_jax.main", *args)
  return proc.returncode, proc.stderr.strip().splitlines()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config.eval.at_endx=1"], "unknown config key 'eval.at_endx'"),
        (["--config.optimm.lr=1"], "did you mean optim"),
        (["--config.optim.lr=abc"], "--config.optim.lr=abc"),
    ],
)
def test_bad_override(tmp_path, args, message):
  rc, err = run_main("--config", "configs/demo.py", "--workdir", str(tmp_path), *args)
  assert rc == 2
  assert err[-1].startswith("error:") and message in err[-1], err
  assert not any("Traceback" in line for line in err), err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config.model.backbone=RN49"], "config.model.backbone='RN49': expected one of"),
        (["--config.model.attention_impl=flash"], "config.model.attention_impl='flash': expected"),
    ],
)
def test_bad_model_value(tmp_path, args, message):
  """Known keys with values no model can be built from: one line, exit code 1 (as
  every error found after the flags parse)."""
  rc, err = run_main("--config", "configs/demo.py", "--workdir", str(tmp_path), *args)
  assert rc == 1
  assert err[-1].startswith("error:") and message in err[-1], err
  assert not any("Traceback" in line for line in err), err


@pytest.mark.parametrize(
    "spec,message",
    [
        ("configs/nope.py", "no such file"),
        ("configs/demo.py:K3", "unknown config variant 'K3'"),
    ],
)
def test_bad_config_file_or_variant(tmp_path, spec, message):
  rc, err = run_main("--config", spec, "--workdir", str(tmp_path))
  assert rc == 2 and message in err[-1], err
  assert not any("Traceback" in line for line in err), err


def test_missing_dataset_root_names_it(tmp_path):
  rc, err = run_main(
      "--config",
      "configs/demo.py",
      "--workdir",
      str(tmp_path),
      "--config.data.root=/nonexistent/ADE",
      "--config.data.generate.enabled=False",
  )
  assert rc == 1 and "/nonexistent/ADE" in err[-1], err
  assert not any("Traceback" in line for line in err), err

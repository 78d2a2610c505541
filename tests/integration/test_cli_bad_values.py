"""Bad values typed on the command line: exactly one `error:` line naming the key or
file, no traceback, nothing created, before any model is built (every key's value
is walked in-process by tests/unit/config/test_validate.py; these run the CLIs, each
in a process of its own: tests/cli_process.py)."""

import os

from tests import cli_process
from tests import train_fixtures

ROOT = train_fixtures.ROOT


def run(module, *args):
  proc = cli_process.run(module, *args)
  return proc.returncode, proc.stderr.strip().splitlines()


def assert_one_error(err, *names):
  errors = [line for line in err if line.startswith("error:")]
  assert len(errors) == 1, err
  assert all(n in errors[0] for n in names), err
  assert not any("Traceback" in line for line in err), err


def test_bad_values_of_main_are_one_line_and_create_nothing(tmp_path):
  workdir = tmp_path / "run"
  for args, names in [
      (["--config", "configs/demo.py", "--config.data.crop_size=64"], ["config.data.crop_size"]),
      (["--config", "configs/demo.py:K=0"], ["config.model.num_contexts=0"]),
      (["--config", "configs/demo.py", "--config.init.clip=/no/clip_rn50"], ["/no/clip_rn50"]),
      # More devices than there are: the mesh, before the workdir.
      (["--config", "configs/demo.py", "--config.mesh.data=1000"], ["config.mesh.data=1000"]),
  ]:
    rc, err = run("mtaclip_jax.main", *args, "--workdir", str(workdir))
    assert rc == 1, err
    assert_one_error(err, *names)
    assert not workdir.exists()


def test_eval_and_predict_of_a_mistyped_workdir_create_nothing(tmp_path):
  workdir, out = tmp_path / "typo", tmp_path / "out"
  rc, err = run(
      "mtaclip_jax.main", "--config", "configs/demo.py", "--workdir", str(workdir), "--mode=eval"
  )
  assert rc == 1
  assert_one_error(err, "no checkpoint", str(workdir))
  image = train_fixtures.make_dataset(tmp_path / "data", train=1, val=1)
  images = f"{image}/images/validation"
  rc, err = run(
      "mtaclip_jax.predict", "--workdir", str(workdir), "--images", images, "--out", str(out)
  )
  assert rc == 1
  assert_one_error(err, "no checkpoint", str(workdir))
  # A mistyped --classes file is refused, not taken as one class name.
  rc, err = run(
      "mtaclip_jax.predict",
      "--workdir",
      str(workdir),
      "--images",
      images,
      "--out",
      str(out),
      "--classes",
      "nmes.txt",
  )
  assert rc == 1
  assert_one_error(err, "--classes 'nmes.txt': no such file")
  rc, err = run("mtaclip_jax.export", "--workdir", str(workdir), "--out", str(tmp_path / "m"))
  assert rc == 1
  assert_one_error(err, "no checkpoint", str(workdir))
  # export's --classes, a mistyped file too: refused before the checkpoint is read.
  model = tmp_path / "m.jaxexport"
  rc, err = run(
      "mtaclip_jax.export", "--workdir", str(workdir), "--out", str(model), "--classes", "typo.txt"
  )
  assert rc == 1
  assert_one_error(err, "--classes 'typo.txt': no such file")
  # A missing --artifact.
  artifact = tmp_path / "nowhere.jaxexport"
  rc, err = run(
      "mtaclip_jax.predict", "--artifact", str(artifact), "--images", images, "--out", str(out)
  )
  assert rc == 1
  assert_one_error(err, f"--artifact '{artifact}': cannot open")
  assert not workdir.exists() and not out.exists()
  assert sorted(os.listdir(tmp_path)) == ["data"]


def test_data_check_of_a_bad_config_is_one_line():
  for args, names in [
      (["--config", "configs/nope.py"], ["--config 'configs/nope.py': ", "no such file"]),
      (
          ["--config", "configs/demo.py", "--config.data.rooot=/data"],
          ["unknown config key 'data.rooot'", "did you mean root?"],
      ),
      (
          ["--config", "configs/demo.py", "--config.data.crop_size=64"],
          ["config.data.crop_size=(64,)", "a pair"],
      ),
  ]:
    rc, err = run("mtaclip_jax.data.check", *args)
    assert rc == 2, err
    assert_one_error(err, *names)


def test_generate_and_summary(tmp_path):
  rc, err = run(
      "mtaclip_jax.data.generate",
      "--layout",
      "cityscapes",
      "--out",
      str(tmp_path / "d"),
      "--num-classes",
      "40",
  )
  assert rc == 2
  assert_one_error(err, "--num-classes 40: expected 1..19 for cityscapes")
  assert not (tmp_path / "d").exists()
  proc = cli_process.run("mtaclip_jax.summary", "--config", "configs/demo.py", "--params_only")
  assert proc.returncode == 0, proc.stderr
  assert "Unable to initialize backend" not in proc.stderr, proc.stderr
  assert proc.stdout.startswith("model: backbone=tiny"), proc.stdout

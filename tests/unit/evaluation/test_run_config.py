"""predict and export without --config take the config saved in the checkpoint; a
--config of another model is refused before anything is built, with the keys named."""

import shutil

import pytest

from mtaclip_jax import errors
from mtaclip_jax.evaluation import restore
from mtaclip_jax.serve import export
from tests import train_fixtures
from tests.golden import regenerate


@pytest.fixture
def workdir(tmp_path):
  shutil.copytree(regenerate.CHECKPOINT, tmp_path / "run" / "checkpoints")
  return str(tmp_path / "run")


def test_the_checkpoints_config_is_used_without_config(workdir):
  config = restore.run_config(None, workdir)
  assert config.model.num_classes == 4 and config.model.hidden_dim == 32
  step, model, variables, _ = restore.restore_variables(config, workdir)
  assert step == 1 and model.num_classes == 4
  assert variables["params"]["decoder"]


def test_a_config_of_another_model_is_refused_with_the_keys(workdir, tmp_path):
  config = train_fixtures.tiny_config(str(tmp_path), num_classes=3)
  with pytest.raises(errors.CheckpointError) as e:
    restore.run_config(config, workdir)
    restore.restore_variables(config, workdir)
  message = str(e.value)
  assert "saved with another model than --config" in message
  assert "model.num_classes: 4 in the checkpoint, 3 now" in message
  assert "omit --config" in message and "\n" not in message
  same = train_fixtures.tiny_config(str(tmp_path))
  same.model.deform_attn_impl = "gather"  # how it computes, not what it holds: accepted
  restore.check_matches_checkpoint(restore.run_config(same, workdir), workdir)


def test_export_names_a_missing_out_folder_before_restoring(workdir, tmp_path):
  with pytest.raises(FileNotFoundError, match="--out .*no folder"):
    export.export_checkpoint(None, workdir, str(tmp_path / "missing" / "m.jaxexport"))

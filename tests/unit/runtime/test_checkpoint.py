"""Checkpointer: a checkpoint saved under another config is refused with the keys that
differ named, nothing on disk is touched, and the checkpoint's own config restores it."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mtaclip_jax import errors
from mtaclip_jax.data import classes as data_classes
from mtaclip_jax.models import mtaclip
from mtaclip_jax.runtime import checkpoint
from mtaclip_jax.runtime import sharding
from mtaclip_jax.train import optim
from mtaclip_jax.train import train_state
from tests import train_fixtures


def config(num_classes, rules):
  return ml_collections.ConfigDict(
      dict(
          model=dict(num_classes=num_classes, hidden_dim=8),
          data=dict(num_classes=num_classes, root="/data"),
          optim=dict(lr=1e-4, lr_mult_rules=rules),
      )
  )


def test_layout_differences_names_only_keys_that_shape_the_state():
  old = checkpoint._config_json(config(4, [("^text_encoder/", 0.0)]))
  new = checkpoint._config_json(config(3, [("^text_encoder/", 0.0), ("^backbone/proj", 0.0)]))
  new["optim"]["lr"] = 1e-3  # changes no array: not named
  new["data"]["root"] = "/other"
  diffs = checkpoint.layout_differences(old, new)
  assert [d.split(":")[0] for d in diffs] == [
      "data.num_classes",
      "model.num_classes",
      "optim.lr_mult_rules",
  ]
  assert diffs[1] == "model.num_classes: 4 in the checkpoint, 3 now"
  assert checkpoint.layout_differences(old, old) == []
  new["model"]["extra"] = 1
  assert 'model.extra: "(unset)" in the checkpoint, 1 now' in checkpoint.layout_differences(
      old, new
  )


def test_restore_under_another_config_names_the_keys_and_keeps_the_checkpoint(tmp_path):
  saved_config = config(4, [("^text_encoder/", 0.0)])
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, max_to_keep=2, async_save=False)
  ckpt.save(1, {"head": jnp.zeros((4, 8))}, None, saved_config)
  ckpt.wait()
  ok_step, state, saved = ckpt.restore(
      {"head": jax.ShapeDtypeStruct((4, 8), jnp.float32)}, config=saved_config
  )
  assert ok_step == 1 and state["head"].shape == (4, 8)
  assert saved["model"]["num_classes"] == 4
  with pytest.raises(errors.CheckpointError) as err:
    ckpt.restore(
        {"head": jax.ShapeDtypeStruct((3, 8), jnp.float32)},
        config=config(3, [("^text_encoder/", 0.0)]),
    )
  message = str(err.value)
  assert message.startswith("no checkpoint could be restored")
  assert (
      "step 1 was saved with a different config: data.num_classes: 4 in the "
      "checkpoint, 3 now; model.num_classes: 4 in the checkpoint, 3 now" in message
  )
  assert "\n" not in message.split(" | ")[0]
  with pytest.raises(errors.CheckpointError) as err:  # without a config: no hint
    ckpt.restore({"head": jax.ShapeDtypeStruct((3, 8), jnp.float32)})
  assert "saved with a different config" not in str(err.value)
  ckpt.close()
  assert os.listdir(os.path.join(tmp_path, "checkpoints")) == ["1"]


@pytest.mark.slow
def test_checkpoint_from_before_the_heads_were_frozen_resumes_with_its_rules(tmp_path):
  """Checkpoints written before the backbone heads were frozen (commit d7c17d4) hold optimizer state for the backbone heads
  the default rules now freeze: the error names optim.lr_mult_rules; the checkpoint's
  own rules restore it, nothing lost."""
  root = train_fixtures.make_dataset(tmp_path / "data")
  new = train_fixtures.tiny_config(root)
  old = train_fixtures.tiny_config(root)
  old.optim.lr_mult_rules = [r for r in new.optim.lr_mult_rules if "attnpool" not in r[0]]
  assert len(old.optim.lr_mult_rules) == len(new.optim.lr_mult_rules) - 1
  saved = train_fixtures.init_state(old)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "run"), every=1, max_to_keep=2, async_save=False)
  ckpt.save(1, saved, None, old)
  ckpt.wait()
  with pytest.raises(errors.CheckpointError) as err:
    ckpt.restore(abstract_state(new), config=new)
  assert "optim.lr_mult_rules: " in str(err.value).split(" | ")[0]
  step, state, _ = ckpt.restore(abstract_state(old), config=old)
  ckpt.close()
  assert step == 1
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(
        jax.random.key_data(a) if _is_key(a) else a, jax.random.key_data(b) if _is_key(b) else b
    )


def _is_key(x):
  return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def abstract_state(config):
  """The config's train state as sharded ShapeDtypeStructs (as evaluate restores)."""
  model = mtaclip.build_model(config.model)
  tx = optim.make_optimizer(config.optim)
  tokens = data_classes.class_tokens(config.data, config.model.class_length)
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    abstract = train_state.abstract_state(model, tx, config, tokens, jax.random.key(0))
    shardings = train_state.state_shardings(abstract, config, mesh)
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )

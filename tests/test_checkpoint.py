"""Checkpointer: a checkpoint saved under another config is refused with the keys that
differ named, and nothing on disk is touched."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from mtaclip_jax import checkpoint


def config(num_classes, rules):
  return ml_collections.ConfigDict(dict(
      model=dict(num_classes=num_classes, hidden_dim=8),
      data=dict(num_classes=num_classes, root="/data"),
      optim=dict(lr=1e-4, lr_mult_rules=rules)))


def test_layout_differences_names_only_keys_that_shape_the_state():
  old = checkpoint._config_json(config(4, [("^text_encoder/", 0.0)]))
  new = checkpoint._config_json(config(3, [("^text_encoder/", 0.0), ("^backbone/proj", 0.0)]))
  new["optim"]["lr"] = 1e-3      # changes no array: not named
  new["data"]["root"] = "/other"
  diffs = checkpoint.layout_differences(old, new)
  assert [d.split(":")[0] for d in diffs] == ["data.num_classes", "model.num_classes",
                                              "optim.lr_mult_rules"]
  assert diffs[1] == "model.num_classes: 4 in the checkpoint, 3 now"
  assert checkpoint.layout_differences(old, old) == []
  new["model"]["extra"] = 1
  assert 'model.extra: "(unset)" in the checkpoint, 1 now' in \
      checkpoint.layout_differences(old, new)


def test_restore_under_another_config_names_the_keys_and_keeps_the_checkpoint(tmp_path):
  saved_config = config(4, [("^text_encoder/", 0.0)])
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, max_to_keep=2, async_save=False)
  ckpt.save(1, {"head": jnp.zeros((4, 8))}, None, saved_config)
  ckpt.wait()
  ok_step, state, saved = ckpt.restore({"head": jax.ShapeDtypeStruct((4, 8), jnp.float32)},
                                       config=saved_config)
  assert ok_step == 1 and state["head"].shape == (4, 8)
  assert saved["model"]["num_classes"] == 4
  with pytest.raises(checkpoint.CheckpointError) as err:
    ckpt.restore({"head": jax.ShapeDtypeStruct((3, 8), jnp.float32)},
                 config=config(3, [("^text_encoder/", 0.0)]))
  message = str(err.value)
  assert message.startswith("no checkpoint could be restored")
  assert "step 1 was saved with a different config: data.num_classes: 4 in the " \
         "checkpoint, 3 now; model.num_classes: 4 in the checkpoint, 3 now" in message
  assert "\n" not in message.split(" | ")[0]
  with pytest.raises(checkpoint.CheckpointError) as err:  # without a config: no hint
    ckpt.restore({"head": jax.ShapeDtypeStruct((3, 8), jnp.float32)})
  assert "saved with a different config" not in str(err.value)
  ckpt.close()
  assert os.listdir(os.path.join(tmp_path, "checkpoints")) == ["1"]

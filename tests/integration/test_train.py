"""Training: one real step, non-finite loss handling, bf16 compute, clear errors (resume:
test_faults_*.py)."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mtaclip_jax import errors
from mtaclip_jax.config import validate
from mtaclip_jax.data import pipeline
from mtaclip_jax.data import transforms
from mtaclip_jax.runtime import sharding
from mtaclip_jax.train import loop
from mtaclip_jax.train import optim
from tests import train_fixtures


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  return train_fixtures.make_dataset(tmp_path_factory.mktemp("data"))


@pytest.mark.slow
def test_one_real_step_updates_what_it_should(data_root):
  config = train_fixtures.tiny_config(data_root)
  config.loss.matcher = "host"  # the default: scipy through a callback in the step
  mesh, _, state, step_fn, tokens = train_fixtures.setup_training(config)
  before = jax.device_get(optim.flatten(state.params))
  stats_before = jax.device_get(optim.flatten(state.batch_stats))
  batch = sharding.global_batch(next(pipeline.make_train_iterator(config.data, 0)), mesh)
  tokens = jax.device_put(tokens, sharding.replicated(mesh))
  with jax.set_mesh(mesh), jax.transfer_guard("disallow"):
    state, metrics = step_fn(state, batch, tokens)
  metrics = jax.device_get(metrics)
  assert np.isfinite(metrics["loss"]) and metrics["finite"]
  for k in ("loss_ce", "loss_mask", "loss_dice", "loss_sim", "grad_norm", "lr"):
    assert k in metrics, k
  after = jax.device_get(optim.flatten(state.params))
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert not any(k.startswith("text_encoder/") for k in changed)
  assert any(k.startswith("backbone/") for k in changed)
  assert "contexts" in changed
  assert any(k.startswith("decoder/") for k in changed)
  assert any(k.startswith("pixel_decoder/") for k in changed)
  # Frozen batch norm: running statistics never move.
  stats_after = jax.device_get(optim.flatten(state.batch_stats))
  for k in stats_before:
    np.testing.assert_array_equal(stats_before[k], stats_after[k])
  assert int(state.step) == 1


@pytest.mark.slow
def test_nan_stops_with_the_step_named_and_skip_keeps_params(data_root, tmp_path, monkeypatch):
  config = train_fixtures.tiny_config(data_root, steps=3)
  # A NaN learning rate (a config with one is refused up front): the first update
  # makes every parameter NaN, so the loss of step 1 is NaN.
  monkeypatch.setattr(optim, "learning_rate_schedule", lambda c: lambda step: jnp.nan)
  with pytest.raises(errors.NonFiniteLossError, match=r"at step 1 .*on_nan=skip"):
    loop.run(config, str(tmp_path / "stop"))
  assert not os.path.exists(tmp_path / "stop" / "checkpoints" / "3")

  config.train.on_nan = "skip"
  mesh, _, state, step_fn, tokens = train_fixtures.setup_training(config)
  before = jax.device_get(optim.flatten(state.params))
  it = pipeline.make_train_iterator(config.data, 0)
  with jax.set_mesh(mesh):
    for _ in range(2):
      state, metrics = step_fn(state, sharding.global_batch(next(it), mesh), tokens)
  assert int(state.skipped) == 2 and int(state.step) == 2
  after = jax.device_get(optim.flatten(state.params))
  for k in before:
    np.testing.assert_array_equal(before[k], after[k])


def test_bad_workdir_and_batch_are_named(tmp_path, data_root):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(errors.WorkdirError, match="not writable"):
    validate.check_workdir(str(blocker / "sub"))
  config = train_fixtures.tiny_config(data_root, batch=3)
  mesh = sharding.make_mesh(config.mesh)
  if mesh.shape["data"] > 1:
    with pytest.raises(errors.ConfigError, match="batch_size=3"):
      validate.check_batch(config, mesh)
  config.model.num_classes = 7
  with pytest.raises(errors.ConfigError, match="num_classes"):
    validate.validate_config(config)


def test_mesh_not_matching_devices_is_named():
  n = len(jax.devices())
  with pytest.raises(errors.MeshConfigError, match="devices"):
    sharding.make_mesh(ml_collections.ConfigDict(dict(data=n + 1, model=1)))


@pytest.mark.slow
def test_bf16_compute_trains_with_fp32_params(data_root):
  config = train_fixtures.tiny_config(data_root, arg="bf16")
  assert config.model.dtype == "bfloat16"
  mesh, _, state, step_fn, tokens = train_fixtures.setup_training(config)
  it = pipeline.make_train_iterator(config.data, 0)
  losses = []
  with jax.set_mesh(mesh):
    for _ in range(3):
      state, metrics = step_fn(state, sharding.global_batch(next(it), mesh), tokens)
      losses.append(float(metrics["loss"]))
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))


def test_crop_larger_than_images_without_padding_is_named(data_root, tmp_path):
  """Start-up check from the image headers; a per-image check where they cannot be
  read up front (TFDS)."""
  config = train_fixtures.tiny_config(data_root)
  no_pad = [t for t in config.data.transforms if not t.startswith("pad")]
  validate.check_crop(config)  # with pad: fine
  config.data.transforms = [t.replace("(64, 64)", "(96, 96)") for t in no_pad]
  with pytest.raises(
      errors.ConfigError,
      match=r"random_crop\(size=\(96, 96\)\) has no " r"pad.*ADE_train_00000001.jpg \(64x80 HxW\)",
  ):
    loop.run(config, str(tmp_path))  # before anything is built
  config.data.transforms = no_pad  # 64x80 images, ratio 0.75: 48x60 < the 64 crop
  with pytest.raises(errors.ConfigError, match="48x60 after the resizes"):
    validate.check_crop(config)
  no_resize = [t for t in no_pad if not t.startswith("random_resize")]
  ops = transforms.parse(no_resize)
  example = {
      "image": np.zeros((48, 60, 3), np.uint8),
      "label": np.zeros((48, 60), np.uint8),
      "name": "ADE_train_7",
  }
  with pytest.raises(errors.CropConfigError, match="ADE_train_7: 48x60.*pad"):
    transforms.apply(ops, example, np.random.default_rng(0))
  padded = transforms.parse(no_resize + ["pad(size=(64, 64))"])
  assert transforms.apply(padded, example, np.random.default_rng(0))["image"].shape == (64, 64, 3)

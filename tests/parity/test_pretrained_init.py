"""Training starts from converted weights: config.init.clip and config.init.mask2former."""

import json
import shutil

import jax
import numpy as np
import pytest

import convert_weights
from mtaclip_jax import errors
from mtaclip_jax.train import optim
from mtaclip_jax.train import pretrained
from tests import clip_reference
from tests import train_fixtures


@pytest.fixture(scope="module")
def converted_tiny_clip(tmp_path_factory):
  import torch

  tmp = tmp_path_factory.mktemp("clip")
  src = tmp / "tiny_clip.pt"
  torch.save(clip_reference.reference_clip("tiny").state_dict(), src)
  out = tmp / "converted"
  convert_weights.save_converted(str(out), "tiny", convert_weights.convert_clip(str(src)), str(src))
  return str(out)


@pytest.mark.parity
def test_init_clip_loads_both_towers(converted_tiny_clip, tmp_path):
  config = train_fixtures.tiny_config(tmp_path)
  config.init.clip = converted_tiny_clip
  state = pretrained.load_pretrained(train_fixtures.init_state(config), config)
  _, towers = convert_weights.load_converted(converted_tiny_clip)
  params = optim.flatten(jax.device_get(state.params))
  stats = optim.flatten(jax.device_get(state.batch_stats))
  expect = {f"backbone/{k}": v for k, v in optim.flatten(towers["image"]["params"]).items()}
  expect.update(
      {f"text_encoder/{k}": v for k, v in optim.flatten(towers["text"]["params"]).items()}
  )
  for k, v in expect.items():
    np.testing.assert_array_equal(params[k], v, err_msg=k)
  for k, v in optim.flatten(towers["image"]["batch_stats"]).items():
    np.testing.assert_array_equal(stats[f"backbone/{k}"], v, err_msg=k)


def test_init_clip_of_another_arch_is_named(converted_tiny_clip, tmp_path):
  other = tmp_path / "other"
  shutil.copytree(converted_tiny_clip, other)
  meta = json.loads((other / "meta.json").read_text())
  meta["arch"] = "RN50"
  (other / "meta.json").write_text(json.dumps(meta))
  config = train_fixtures.tiny_config(tmp_path)
  config.init.clip = str(other)
  with pytest.raises(errors.ConfigError, match="holds RN50 weights"):
    pretrained.load_pretrained(train_fixtures.init_state(config), config)


def _hf_mask2former(path, config):
  import torch
  import transformers

  torch.manual_seed(0)
  m = config.model
  backbone = transformers.ResNetConfig(
      out_features=["stage1", "stage2", "stage3", "stage4"],
      depths=[1, 1, 1, 1],
      hidden_sizes=[64, 128, 256, 512],
      embedding_size=32,
  )
  cfg = transformers.Mask2FormerConfig(
      backbone_config=backbone,
      num_labels=m.num_classes,
      feature_size=m.hidden_dim,
      mask_feature_size=m.mask_dim,
      hidden_dim=m.hidden_dim,
      encoder_feedforward_dim=m.enc_ffn_dim,
      encoder_layers=m.enc_layers,
      decoder_layers=m.dec_layers + 1,
      num_attention_heads=m.dec_heads,
      dim_feedforward=m.dec_ffn_dim,
      num_queries=m.num_queries,
  )
  model = transformers.Mask2FormerForUniversalSegmentation(cfg)
  torch.save(model.state_dict(), path)


@pytest.mark.parity
@pytest.mark.slow
def test_init_mask2former_baseline_and_text_model(tmp_path):
  import torch

  from convert_weights.mask2former_hf import convert_mask2former_hf

  config = train_fixtures.tiny_config(tmp_path, arg="baseline")
  src = tmp_path / "m2f.pt"
  _hf_mask2former(src, config)
  converted = convert_mask2former_hf(torch.load(src, weights_only=True))
  expect = {
      f"{top}/{k}": v for top, tree in converted.items() for k, v in optim.flatten(tree).items()
  }
  config.init.mask2former = str(src)
  state = train_fixtures.init_state(config)
  params = optim.flatten(jax.device_get(pretrained.load_pretrained(state, config).params))
  assert {k for k in params if k.split("/")[0] in ("pixel_decoder", "decoder")} == set(expect)
  for k, v in expect.items():
    np.testing.assert_array_equal(params[k], v, err_msg=k)

  # The MTA-CLIP model takes every Mask2Former tensor; its text parts keep their init.
  text = train_fixtures.tiny_config(tmp_path)
  text.init.mask2former = str(src)
  state = train_fixtures.init_state(text)
  init = optim.flatten(jax.device_get(state.params))
  loaded = optim.flatten(jax.device_get(pretrained.load_pretrained(state, text).params))
  for k, v in expect.items():
    np.testing.assert_array_equal(loaded[k], v, err_msg=k)
  extra = [k for k in loaded if k.startswith("decoder/") and k not in expect]
  assert extra and all(np.array_equal(loaded[k], init[k]) for k in extra)

  wrong = train_fixtures.tiny_config(tmp_path, arg="baseline", num_classes=3)
  wrong.init.mask2former = str(src)
  with pytest.raises(errors.ConfigError, match="class_predictor|shape"):
    pretrained.load_pretrained(train_fixtures.init_state(wrong), wrong)

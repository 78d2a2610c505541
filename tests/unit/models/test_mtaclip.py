"""Full MTA-CLIP model: contract shapes, jit, parameter tree, gradient paths."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mtaclip_jax import errors
from mtaclip_jax.cli import summary
from mtaclip_jax.config import validate
from mtaclip_jax.models import mtaclip
from tests import train_fixtures


def _config(**kw):
  c = dict(
      backbone="tiny",
      text_encoder="tiny",
      backbone_norm="frozen_bn",
      num_classes=4,
      num_queries=8,
      hidden_dim=64,
      mask_dim=64,
      enc_layers=2,
      enc_ffn_dim=128,
      enc_heads=4,
      enc_points=2,
      num_feature_levels=3,
      dec_layers=3,
      dec_ffn_dim=128,
      dec_heads=4,
      text_queries=True,
      joint_self_attn=True,
      num_contexts=2,
      context_length=8,
      class_length=5,
      gamma_init=1e-4,
      deform_attn_impl="gather",
      dtype="float32",
  )
  c.update(kw)
  return ml_collections.ConfigDict(c)


def _tokens(n):
  t = np.zeros((n, 5), np.int32)
  t[:, 0] = 49406
  t[:, 1] = 320 + np.arange(n)
  t[:, 2] = 49407
  return jnp.asarray(t)


@pytest.fixture(scope="module")
def tiny():
  model = mtaclip.build_model(_config())
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 64, 3))
  tokens = _tokens(5)
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), images, tokens)
  return model, variables, images, tokens


@pytest.mark.slow
def test_tiny_forward_under_jit_and_gradients(tiny):
  model, variables, images, tokens = tiny
  params = variables["params"]
  assert set(params) == {"backbone", "text_encoder", "contexts", "pixel_decoder", "decoder"}
  assert params["contexts"].shape == (2, 8, 64)

  def loss(p):
    o = model.apply({**variables, "params": p}, images, tokens)
    sim = jnp.einsum("lbqd,lbkcd->", o["m_proj"], o["t_proj"])
    return o["logits"].sum() + o["masks"].mean() + sim, o

  # One compile for forward + backward (the forward is the jitted apply's).
  grads, out = jax.jit(jax.grad(loss, has_aux=True))(params)
  assert out["logits"].shape == (3, 2, 8, 5)
  assert out["masks"].shape == (3, 2, 8, 16, 16)
  assert out["m_proj"].shape == (3, 2, 8, 64)
  assert out["t_proj"].shape == (3, 2, 2, 5, 64)
  assert all(v.dtype == jnp.float32 for v in out.values())
  assert all(np.isfinite(np.asarray(v)).all() for v in out.values())
  # Contexts learn through the text encoder (frozen by the optimizer, not here).
  assert np.abs(np.asarray(grads["contexts"])).max() > 0
  assert np.abs(np.asarray(grads["text_encoder"]["ln_final"]["scale"])).max() > 0
  assert (
      np.abs(
          np.asarray(
              grads["pixel_decoder"]["encoder"]["layers_0"]["self_attn"]["value_proj"]["kernel"]
          )
      ).max()
      > 0
  )


def test_cached_text_embeddings_give_the_same_outputs(tiny):
  # Inference encodes the prompts once (encode_classes) and passes them in.
  model, variables, images, tokens = tiny
  # Jitted: one program each (op by op, every operation would compile on its own).
  want = jax.jit(model.apply)(variables, images, tokens)
  t0 = jax.jit(lambda v, t: mtaclip.encode_classes(model, v, t))(variables, tokens)
  assert t0.shape == (2, 5, 64) and t0.dtype == jnp.float32
  got = jax.jit(lambda v, i, e: model.apply(v, i, None, text_embeddings=e))(variables, images, t0)
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), atol=1e-6, err_msg=k)
  with pytest.raises(ValueError, match=r"text_embeddings must be \[K, C\+1, D\]"):
    jax.eval_shape(lambda: model.apply(variables, images, None, text_embeddings=t0[:, :4]))
  baseline = mtaclip.build_model(_config(text_queries=False))
  assert mtaclip.encode_classes(baseline, variables, tokens) is None


@pytest.mark.slow
def test_tiny_bfloat16_and_baseline(tiny):
  _, variables, images, tokens = tiny
  model = mtaclip.build_model(_config(dtype="bfloat16"))
  out = jax.jit(model.apply)(variables, images, tokens)  # fp32 params, bf16 compute
  assert out["logits"].dtype == jnp.float32 and out["masks"].dtype == jnp.float32
  assert all(np.isfinite(np.asarray(v)).all() for v in out.values())
  base = mtaclip.build_model(_config(text_queries=False))
  out, shapes = jax.eval_shape(base.init_with_output, jax.random.PRNGKey(0), images)
  assert set(shapes["params"]) == {"backbone", "pixel_decoder", "decoder"}
  assert out["logits"].shape == (4, 2, 8, 5)  # the query init + 3 layers
  assert set(out) == {"logits", "masks", "mask_embed", "mask_features"}


@pytest.mark.parametrize(
    "dataset,num_classes,backbone,queries",
    [("ade20k", 150, "RN50", 553), ("cityscapes", 19, "RN50", 160)],
)
def test_paper_shapes(dataset, num_classes, backbone, queries):
  cfg = _config(
      backbone=backbone,
      text_encoder=backbone,
      num_classes=num_classes,
      num_queries=100,
      hidden_dim=256,
      mask_dim=256,
      enc_layers=6,
      enc_ffn_dim=1024,
      enc_heads=8,
      enc_points=4,
      dec_layers=9,
      dec_ffn_dim=2048,
      dec_heads=8,
      num_contexts=3,
  )
  model = mtaclip.build_model(cfg)
  images = jax.ShapeDtypeStruct((2, 512, 512, 3), jnp.float32)
  out, variables = jax.eval_shape(
      model.init_with_output,
      jax.random.PRNGKey(0),
      images,
      jax.ShapeDtypeStruct((num_classes + 1, 5), jnp.int32),
  )
  dec = variables["params"]["decoder"]
  assert dec["queries_features"].shape[0] + dec["text_pos_embed"].shape[0] == queries
  assert out["logits"].shape == (9, 2, 100, num_classes + 1)
  assert out["masks"].shape == (9, 2, 100, 128, 128)
  assert out["m_proj"].shape == (9, 2, 100, 1024)
  assert out["t_proj"].shape == (9, 2, 3, num_classes + 1, 1024)


def test_config_errors():
  """The model's keys are checked by config/validate.py (one line naming the key)
  before any entry point builds it; the model itself checks its inputs."""
  for key, value, message in [
      ("dtype", "float16", "config.model.dtype"),
      ("backbone", "RN49", "config.model.backbone"),
      ("attention_impl", "flash", "config.model.attention_impl"),
      ("attention_impl", "cudnn", "attention_impl='cudnn' needs config.model.dtype"),
  ]:
    config = train_fixtures.load_config("demo")
    config.model[key] = value
    with pytest.raises(errors.ConfigError, match=message):
      validate.validate_config(config)
  config = train_fixtures.load_config("demo")
  config.model.update(attention_impl="cudnn", dtype="bfloat16")
  with pytest.raises(errors.ConfigError, match="attention_impl='cudnn' needs an NVIDIA GPU"):
    validate.validate_config(config)
  model = mtaclip.build_model(_config())
  with pytest.raises(ValueError, match="class_tokens"):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.ones((1, 64, 64, 3)), _tokens(3))


def test_summary_param_table():
  config = ml_collections.ConfigDict(
      dict(
          model=_config(),
          optim=dict(lr_mult_rules=[[r"^text_encoder/", 0.0], [r"^backbone/", 0.1]]),
      )
  )
  rows, _ = summary.param_table(config, mtaclip.build_model(config.model))
  rows = {name: (t, f) for name, t, f in rows}
  assert set(rows) == {"backbone", "text_encoder", "contexts", "pixel_decoder", "decoder"}
  assert rows["text_encoder"][0] == 0 and rows["text_encoder"][1] > 0
  assert rows["contexts"] == (2 * 8 * 64, 0)
  assert rows["backbone"][1] == 0 and rows["decoder"][1] == 0

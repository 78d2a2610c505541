"""MiT (SegFormer encoder) vs transformers' SegformerModel, fp32, through the conversion.

The reference is a random-init SegformerModel with MiT-B4's widths, heads and reduction
ratios but depths (1, 1, 2, 1), every parameter randomised (LayerNorm affines and biases
included). Tolerance (relative, max|ours - ref| / max|ref|): <= 1e-5 at every block
output and every stage output, at a non-square 64x96 input. The full-depth B4 is checked
by shapes and parameter count only (jax.eval_shape vs a meta-device torch model).
"""

import os

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import SegformerConfig
from transformers import SegformerForSemanticSegmentation
from transformers import SegformerModel
from transformers import ViTConfig
from transformers import ViTModel

from convert_weights.clip_sources import CheckpointError
from convert_weights.segformer_hf import convert_segformer
from mtaclip_jax.models.backbones import mit

TOL = 1e-5
DEPTHS = (1, 1, 2, 1)
FIELDS = dict(mit.MIT_ARCHS["MiT-B4"], depths=DEPTHS)


def _hf_config(fields):
  return SegformerConfig(
      depths=list(fields["depths"]),
      hidden_sizes=list(fields["hidden_sizes"]),
      num_attention_heads=list(fields["num_attention_heads"]),
      sr_ratios=list(fields["sr_ratios"]),
  )


def rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def reference():
  torch.manual_seed(0)
  model = SegformerModel(_hf_config(FIELDS)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        base = 1.0 if name.endswith("weight") else 0.0  # LayerNorm scale
        p.copy_(base + 0.2 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) * p[0].numel() ** -0.5)
  return model


@pytest.fixture(scope="module")
def params(reference):
  return convert_segformer(reference.state_dict(), FIELDS)


def _torch_forward(model, images):
  """Stage outputs (NHWC) and every block output ([B, N, C]) in forward order."""
  blocks = []
  hooks = [
      blk.register_forward_hook(lambda m, i, o: blocks.append(o.numpy()))
      for stage in model.stages
      for blk in stage.blocks
  ]
  try:
    with torch.no_grad():
      out = model(torch.from_numpy(images.transpose(0, 3, 1, 2)), output_hidden_states=True)
  finally:
    for h in hooks:
      h.remove()
  return [h.numpy().transpose(0, 2, 3, 1) for h in out.hidden_states], blocks


def _jax_forward(params, images, fields=FIELDS):
  model = mit.build(dict(fields))
  out, inter = jax.jit(
      lambda p, x: model.apply(
          {"params": p},
          x,
          mutable=["intermediates"],
          capture_intermediates=lambda m, _: isinstance(m, mit.SegformerLayer),
      )
  )(params, images)
  stages = inter["intermediates"]["stages"]
  blocks = [
      stages[str(i)]["blocks"][str(j)]["__call__"][0]
      for i, depth in enumerate(fields["depths"])
      for j in range(depth)
  ]
  return [out[f"res{i}"] for i in range(2, 6)], blocks


@pytest.fixture(scope="module")
def images():
  return np.random.RandomState(1).randn(2, 64, 96, 3).astype(np.float32)


@pytest.fixture(scope="module")
def fp32_outputs(params, images):
  return _jax_forward(params, images)


@pytest.mark.parity
@pytest.mark.slow
def test_stage_and_block_parity(reference, images, fp32_outputs):
  ref_stages, ref_blocks = _torch_forward(reference, images)
  stages, blocks = fp32_outputs
  assert len(blocks) == len(ref_blocks) == sum(DEPTHS)
  block_errs = [rel_err(b, r) for b, r in zip(blocks, ref_blocks)]
  stage_errs = []
  for i, (s, r) in enumerate(zip(stages, ref_stages)):
    stride = 2 ** (i + 2)
    assert s.shape == (2, 64 // stride, 96 // stride, FIELDS["hidden_sizes"][i])
    stage_errs.append(rel_err(s, r))
  print(
      f"\nMiT parity: blocks {['%.2e' % e for e in block_errs]}, "
      f"stages {['%.2e' % e for e in stage_errs]}"
  )
  assert max(block_errs) <= TOL and max(stage_errs) <= TOL


@pytest.mark.parity
def test_hub_checkpoint_file_converts_identically(reference, params, tmp_path):
  """save_pretrained writes the hub's older names (`segformer.encoder.block...`) plus a
  decode head; the file converts to the same arrays as the live state dict."""
  seg = SegformerForSemanticSegmentation(_hf_config(FIELDS))
  seg.segformer.load_state_dict(reference.state_dict())
  seg.save_pretrained(tmp_path)
  path = os.path.join(tmp_path, "model.safetensors")
  from safetensors.numpy import load_file

  keys = list(load_file(path))
  assert any(k.startswith("segformer.encoder.block.") for k in keys)
  assert any(k.startswith("decode_head.") for k in keys)
  converted = traverse_util.flatten_dict(convert_segformer(path, FIELDS))
  expected = traverse_util.flatten_dict(params)
  assert converted.keys() == expected.keys()
  for k in expected:
    np.testing.assert_array_equal(converted[k], expected[k], err_msg="/".join(k))


def _nvlabs_state(state):
  """The original NVlabs SegFormer names (mix_transformer.py), keys and values packed
  into `attn.kv`, as transformers' convert_segformer_original_to_pytorch.py reads them."""
  block = {
      "layernorm_before": "norm1",
      "layernorm_after": "norm2",
      "attention.q_proj": "attn.q",
      "attention.o_proj": "attn.proj",
      "mlp.fc1": "mlp.fc1",
      "mlp.fc2": "mlp.fc2",
      "mlp.dwconv.dwconv": "mlp.dwconv.dwconv",
      "attention.sequence_reduction.sequence_reduction": "attn.sr",
      "attention.sequence_reduction.layer_norm": "attn.norm",
  }
  out = {}
  for key, value in state.items():
    parts = key.split(".")
    stage, leaf = int(parts[1]) + 1, parts[-1]
    if parts[2] == "patch_embeddings":
      sub = {"proj": "proj", "layer_norm": "norm"}[parts[3]]
      out[f"patch_embed{stage}.{sub}.{leaf}"] = value
    elif parts[2] == "layer_norm":
      out[f"norm{stage}.{leaf}"] = value
    elif parts[4:6] == ["attention", "k_proj"]:
      v = state[key.replace("k_proj", "v_proj")]
      out[f"block{stage}.{parts[3]}.attn.kv.{leaf}"] = np.concatenate([value, v])
    elif parts[4:6] != ["attention", "v_proj"]:
      out[f"block{stage}.{parts[3]}.{block['.'.join(parts[4:-1])]}.{leaf}"] = value
  return out


def test_nvlabs_checkpoint_converts_identically(reference, params):
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  nvlabs = _nvlabs_state(state)
  assert "block3.1.attn.kv.weight" in nvlabs and "norm4.bias" in nvlabs
  mmseg = {"backbone." + k: v for k, v in nvlabs.items()}
  mmseg["decode_head.conv_seg.weight"] = np.zeros((150, 768, 1, 1), np.float32)
  for source in (dict(nvlabs, **{"head.weight": np.zeros((1000, 512), np.float32)}), mmseg):
    converted = traverse_util.flatten_dict(convert_segformer(source, FIELDS))
    expected = traverse_util.flatten_dict(params)
    assert converted.keys() == expected.keys()
    for k in expected:
      np.testing.assert_array_equal(converted[k], expected[k], err_msg="/".join(k))


def test_b4_full_depth_shapes_and_param_count():
  model = mit.build("MiT-B4")
  out, variables = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x), jnp.zeros((1, 96, 128, 3))
  )
  assert {k: v.shape for k, v in out.items()} == {
      "res2": (1, 24, 32, 64),
      "res3": (1, 12, 16, 128),
      "res4": (1, 6, 8, 320),
      "res5": (1, 3, 4, 512),
  }
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
  with torch.device("meta"):
    ref = SegformerModel(_hf_config(mit.MIT_ARCHS["MiT-B4"]))
  assert len(ref.stages[2].blocks) == 27
  assert ours == sum(p.numel() for p in ref.parameters()) == 60_842_688
  assert {x.dtype for x in jax.tree.leaves(variables["params"])} == {np.dtype(np.float32)}


@pytest.mark.slow
def test_bfloat16_compute(params, images, fp32_outputs):
  model = mit.build(dict(FIELDS), dtype=jnp.bfloat16)
  bf16 = jax.jit(model.apply)({"params": params}, images)
  for i, ref in enumerate(fp32_outputs[0]):
    out = bf16[f"res{i + 2}"]
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, ref) < 5e-2


def test_image_size_must_be_multiple_of_32():
  model = mit.build(dict(FIELDS))
  with pytest.raises(ValueError, match="64x80 is not a multiple of 32"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 80, 3)))


@pytest.mark.slow
def test_drop_path_drops_whole_samples():
  """train=True: each sample's branch is either dropped or scaled by 1/keep."""
  layer = mit.SegformerLayer(hidden_size=8, num_heads=2, sr_ratio=2, mlp_ratio=2, drop_path=0.5)
  x = jnp.asarray(np.random.RandomState(3).randn(16, 16, 8), jnp.float32)
  variables = jax.jit(layer.init, static_argnums=(2, 3))(jax.random.key(0), x, 4, 4)

  @jax.jit
  def run(variables, x, rng):
    train, inter = layer.apply(
        variables,
        x,
        4,
        4,
        train=True,
        rngs={"dropout": rng},
        capture_intermediates=True,
        mutable=["intermediates"],
    )
    no_rate = layer.clone(drop_path=0.0)
    return (
        train,
        inter["intermediates"],
        layer.apply(variables, x, 4, 4),
        no_rate.apply(variables, x, 4, 4, train=True),
        no_rate.apply(variables, x, 4, 4),
    )

  y, inter, eval_out, train_no_rate, eval_no_rate = run(variables, x, jax.random.key(1))
  attn = inter["attention"]["__call__"][0]
  mlp = inter["mlp"]["__call__"][0]
  combos = set()
  for i in range(x.shape[0]):
    fits = [
        (a, b)
        for a in (0, 1)
        for b in (0, 1)
        if np.allclose(y[i], x[i] + 2 * a * attn[i] + 2 * b * mlp[i], atol=1e-5)
    ]
    assert len(fits) >= 1, f"sample {i} is not x + {{0, 2}} * each branch"
    combos.add(fits[0])
  assert len(combos) > 1
  np.testing.assert_array_equal(train_no_rate, eval_no_rate)
  assert not np.allclose(eval_out, y)
  with pytest.raises(ValueError, match="needs a 'dropout' rng"):
    layer.apply(variables, x, 4, 4, train=True)


def _zeros_state(model):
  return {k: np.zeros(tuple(v.shape), np.float32) for k, v in model.state_dict().items()}


def test_b0_checkpoint_for_b4_names_the_mismatch():
  with torch.device("meta"):
    b0 = SegformerModel(SegformerConfig())  # the config defaults are MiT-B0
  with pytest.raises(CheckpointError) as e:
    convert_segformer(_zeros_state(b0), "MiT-B4")
  msg = str(e.value)
  assert "'MiT-B4'" in msg and "its shapes match 'MiT-B0'" in msg
  assert "stages.0.patch_embeddings.proj.weight: (7, 7, 3, 32)" in msg
  assert "expected (7, 7, 3, 64)" in msg and "missing parameters" in msg


def test_other_architecture_is_rejected():
  with torch.device("meta"):
    vit = ViTModel(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=16,
        )
    )
  with pytest.raises(CheckpointError, match=r"unknown keys: \['embeddings.cls_token'"):
    convert_segformer(_zeros_state(vit), FIELDS)


def test_truncated_and_misshaped_state_dicts(reference):
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  truncated = {k: v for k, v in state.items() if not k.startswith("stages.3.layer_norm")}
  with pytest.raises(CheckpointError, match=r"2 missing parameters: \['stages/3/layer_norm"):
    convert_segformer(truncated, FIELDS)
  key = "stages.2.blocks.1.mlp.fc1.weight"
  bad = dict(state, **{key: state[key].T})
  with pytest.raises(CheckpointError, match=rf"{key}: \(1280, 320\) .*expected \(320, 1280\)"):
    convert_segformer(bad, FIELDS)


def test_truncated_file(reference, tmp_path):
  from safetensors.torch import save_file

  path = os.path.join(tmp_path, "mit.safetensors")
  save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(CheckpointError, match="mit.safetensors"):
    convert_segformer(path, FIELDS)

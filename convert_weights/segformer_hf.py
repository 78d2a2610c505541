"""transformers SegFormer state dict -> params of `mit.MixVisionTransformer`.

Accepts `SegformerModel` state dicts and those of the models that wrap it
(`SegformerForSemanticSegmentation`, `SegformerForImageClassification`: keys under
`segformer.`; their `decode_head.` / `classifier.` keys are ignored), in either naming:
the current one (`stages.N.blocks.M.attention.q_proj`, what the pinned transformers'
`state_dict()` gives) or the older one the model hub's files hold
(`encoder.block.N.M.attention.self.query`), renamed here as transformers renames it on
load. Also the original NVlabs SegFormer names (`mit_b4.pth`: `patch_embed1.proj`,
`block1.0.attn.q` / packed `attn.kv`, `norm1`; mmseg segmentor checkpoints add a
`backbone.` prefix), renamed as transformers' convert_segformer_original_to_pytorch.py
does (`kv` split into key = first half, value = second half). Key rewriting: dots become
nesting, a leaf `weight` becomes `kernel` (conv OIHW -> HWIO, linear transposed) or
`scale` (LayerNorm).
"""

import functools
import logging
import re
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np

from convert_weights import keymap
from convert_weights.clip_sources import read_state_dict
from mtaclip_jax.models.backbones import mit

log = logging.getLogger(__name__)

_IGNORED_PREFIXES = ("decode_head.", "classifier.", "head.")
# Hub (transformers 4.x) names -> current names, in order (transformers'
# conversion_mapping for "SegformerModel").
_OLD_NAMES = [
    (r"^encoder\.patch_embeddings\.(\d+)\.", r"stages.\1.patch_embeddings."),
    (r"^encoder\.block\.(\d+)\.", r"stages.\1.blocks."),
    (r"^encoder\.layer_norm\.(\d+)\.", r"stages.\1.layer_norm."),
    (r"\.attention\.self\.query\.", ".attention.q_proj."),
    (r"\.attention\.self\.key\.", ".attention.k_proj."),
    (r"\.attention\.self\.value\.", ".attention.v_proj."),
    (r"\.attention\.self\.sr\.", ".attention.sequence_reduction.sequence_reduction."),
    (r"\.attention\.self\.layer_norm\.", ".attention.sequence_reduction.layer_norm."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.mlp\.dense1\.", ".mlp.fc1."),
    (r"\.mlp\.dense2\.", ".mlp.fc2."),
    (r"\.layer_norm_1\.", ".layernorm_before."),
    (r"\.layer_norm_2\.", ".layernorm_after."),
]


# NVlabs names (1-based stage numbers) -> current names.
_NVLABS_STAGE = re.compile(r"^(patch_embed|norm|block)([1-4])\.(.+)$")
_NVLABS_BLOCK = [
    ("norm1.", "layernorm_before."),
    ("norm2.", "layernorm_after."),
    ("attn.q.", "attention.q_proj."),
    ("attn.proj.", "attention.o_proj."),
    ("attn.sr.", "attention.sequence_reduction.sequence_reduction."),
    ("attn.norm.", "attention.sequence_reduction.layer_norm."),
    ("mlp.", "mlp."),
]


def _nvlabs_names(key: str, value) -> Dict[str, Any]:
  """One NVlabs key -> {current key: value}; `attn.kv` becomes k_proj and v_proj."""
  m = _NVLABS_STAGE.match(key)
  if m is None:
    return {key: value}
  kind, stage, rest = m.group(1), int(m.group(2)) - 1, m.group(3)
  if kind == "patch_embed":
    if rest.startswith("norm."):
      rest = "layer_norm." + rest[len("norm.") :]
    return {f"stages.{stage}.patch_embeddings.{rest}": value}
  if kind == "norm":
    return {f"stages.{stage}.layer_norm.{rest}": value}
  block, _, rest = rest.partition(".")
  base = f"stages.{stage}.blocks.{block}."
  if rest.startswith("attn.kv."):
    leaf = rest[len("attn.kv.") :]
    half = np.shape(value)[0] // 2
    return {
        f"{base}attention.k_proj.{leaf}": value[:half],
        f"{base}attention.v_proj.{leaf}": value[half:],
    }
  for old, new in _NVLABS_BLOCK:
    if rest.startswith(old):
      return {base + new + rest[len(old) :]: value}
  return {key: value}


def _current_names(key: str, value) -> Dict[str, Any]:
  if key.startswith("encoder."):
    for pattern, repl in _OLD_NAMES:
      key = re.sub(pattern, repl, key)
    return {key: value}
  return _nvlabs_names(key, value)


def segformer_keys(state: Mapping[str, Any]) -> Dict[str, Any]:
  """Encoder keys in the current naming; `segformer.` / `backbone.` prefixes
  stripped, heads dropped."""
  out = {}
  for key, value in state.items():
    for prefix in ("segformer.", "backbone."):
      if key.startswith(prefix):
        key = key[len(prefix) :]
    if key.startswith(_IGNORED_PREFIXES):
      continue
    out.update(_current_names(key, value))
  return out


def expected_shapes(fields: Mapping) -> Dict[tuple, tuple]:
  """Flat {flax param path: shape} of a MixVisionTransformer, without compute."""
  return dict(
      _expected_shapes(
          tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in fields.items()))
      )
  )


@functools.lru_cache(maxsize=8)
def _expected_shapes(fields: tuple):
  return tuple(keymap.expected_shapes(mit.MixVisionTransformer(**dict(fields))).items())


def infer_arch(state: Mapping[str, Any]) -> Optional[str]:
  """The MIT_ARCHS name whose depths and widths match current-named keys, or None."""
  depths, widths = [], []
  for i in range(4):
    proj = state.get(f"stages.{i}.patch_embeddings.proj.weight")
    if proj is None:
      return None
    widths.append(int(np.shape(proj)[0]))
    depths.append(len({k.split(".")[3] for k in state if k.startswith(f"stages.{i}.blocks.")}))
  for name, fields in mit.MIT_ARCHS.items():
    if tuple(fields["depths"]) == tuple(depths) and tuple(fields["hidden_sizes"]) == tuple(widths):
      return name
  return None


def convert_segformer(src, arch: Union[str, Mapping] = "MiT-B4") -> Dict:
  """SegFormer checkpoint (path or loaded state dict of torch tensors / numpy arrays)
  -> float32 numpy params tree of `mit.build(arch)` (the `params` collection).
  `arch`: a name in `mit.MIT_ARCHS` or a dict of MixVisionTransformer fields."""
  fields = mit.arch_config(arch)
  state = segformer_keys(read_state_dict(src))
  found = infer_arch(state)
  hints = []
  if found is not None and mit.MIT_ARCHS[found] != fields:
    hints.append(f"its shapes match {found!r}: pass arch={found!r}")
  what = repr(arch) if isinstance(arch, str) else f"with fields {fields}"
  params = keymap.to_params(
      state, expected_shapes(fields), f"checkpoint does not match MiT arch {what}:", hints=hints
  )
  log.info("converted SegFormer encoder: %d tensors", len(state))
  return params

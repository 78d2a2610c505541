"""transformers Mask2Former state dict -> mtaclip_jax pixel_decoder + decoder params.

Accepts the state dict of `Mask2FormerForUniversalSegmentation` (keys under
`model.` plus `class_predictor.`) or of `Mask2FormerModel`; values may be numpy
arrays or torch tensors. Backbone and loss buffers are ignored. The result is
`{"pixel_decoder": ..., "decoder": ...}` matching `PixelDecoder` and
`MaskTextDecoder(text_queries=False)`; the text-query parameters of MTA-CLIP
have no Mask2Former counterpart and keep their initialisation.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

PIXEL = "pixel_level_module.decoder."
TRANSFORMER = "transformer_module."

# (regex on the key after the module prefix, target path template)
_PIXEL_RULES = [
    (r"level_embed", "level_embed"),
    (r"input_projections\.(\d+)\.0\.(weight|bias)", "input_projections_{0}/conv/{1}"),
    (r"input_projections\.(\d+)\.1\.(weight|bias)", "input_projections_{0}/norm/{1}"),
    (r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", "encoder/layers_{0}/{1}/{2}"),
    (r"(adapter_\d+|layer_\d+)\.0\.(weight|bias)", "{0}/conv/{1}"),
    (r"(adapter_\d+|layer_\d+)\.1\.(weight|bias)", "{0}/norm/{1}"),
    (r"mask_projection\.(weight|bias)", "mask_projection/{0}"),
]
_DECODER_RULES = [
    (r"queries_embedder\.weight", "queries_embedder"),
    (r"queries_features\.weight", "queries_features"),
    (r"level_embed\.weight", "level_embed"),
    (r"decoder\.layernorm\.(weight|bias)", "layernorm/{0}"),
    (
        r"decoder\.mask_predictor\.mask_embedder\.(\d+)\.0\.(weight|bias)",
        "mask_predictor/layers_{0}/{1}",
    ),
    (
        r"decoder\.layers\.(\d+)\.cross_attn\.in_proj_(weight|bias)",
        "layers_{0}/cross_attn/in_proj/{1}",
    ),
    (r"decoder\.layers\.(\d+)\.(.+)\.(weight|bias)", "layers_{0}/{1}/{2}"),
]


def _to_numpy(v: Any) -> np.ndarray:
  if hasattr(v, "detach"):
    v = v.detach().cpu().float().numpy()
  return np.asarray(v, np.float32)


def _leaf(path: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
  """torch layout -> flax layout; the last path element names the torch param."""
  *parent, kind = path.split("/")
  parent = "/".join(parent)
  is_norm = re.search(r"(norm|layernorm)$", parent) is not None
  if kind == "bias":
    return [(f"{parent}/bias", value)]
  if kind != "weight":
    return [(path, value)]  # a raw parameter (embeddings, level_embed)
  if is_norm:
    return [(f"{parent}/scale", value)]
  if value.ndim == 4:  # conv [out, in, kh, kw] -> [kh, kw, in, out]
    return [(f"{parent}/kernel", value.transpose(2, 3, 1, 0))]
  if value.ndim == 2:
    return [(f"{parent}/kernel", value.T)]
  raise ValueError(f"mask2former_hf: cannot place weight {path} with shape {value.shape}")


def _rewrite(key: str, rules) -> str | None:
  for pattern, template in rules:
    m = re.fullmatch(pattern, key)
    if m:
      return template.format(*(g.replace(".", "/") for g in m.groups()))
  return None


def _set(tree: dict, path: str, value: np.ndarray) -> None:
  *parents, last = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  if last in tree:
    raise ValueError(f"mask2former_hf: two keys map to {path}")
  tree[last] = value


def convert_mask2former_hf(state_dict: Mapping[str, Any]) -> dict[str, dict]:
  """Returns {"pixel_decoder": params, "decoder": params} (numpy float32)."""
  out: dict[str, dict] = {"pixel_decoder": {}, "decoder": {}}
  seen_pixel = seen_transformer = False
  for key, value in state_dict.items():
    k = key[len("model.") :] if key.startswith("model.") else key
    if k.startswith(PIXEL):
      seen_pixel = True
      target, rules, root = k[len(PIXEL) :], _PIXEL_RULES, "pixel_decoder"
    elif k.startswith(TRANSFORMER):
      seen_transformer = True
      target, rules, root = k[len(TRANSFORMER) :], _DECODER_RULES, "decoder"
      if target.startswith("input_projections."):
        raise ValueError(
            f"mask2former_hf: {key}: decoder input projections (hidden_dim != "
            "feature_size or enforce_input_projection) are not supported"
        )
    elif k.startswith("class_predictor."):
      target, rules, root = (
          k,
          [(r"class_predictor\.(weight|bias)", "class_predictor/{0}")],
          "decoder",
      )
    else:
      continue  # backbone, criterion buffers
    path = _rewrite(target, rules)
    if path is None:
      raise ValueError(f"mask2former_hf: unexpected key {key!r}")
    arr = _to_numpy(value)
    if path.endswith("in_proj/weight") or path.endswith("in_proj/bias"):
      layer = path.split("/in_proj/")[0]
      kind = path.rsplit("/", 1)[1]
      for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(arr, 3, axis=0)):
        for p, v in _leaf(f"{layer}/{name}/{kind}", part):
          _set(out[root], p, v)
      continue
    for p, v in _leaf(path, arr):
      _set(out[root], p, v)
  if not (seen_pixel and seen_transformer):
    raise ValueError(
        "mask2former_hf: state dict holds no Mask2Former pixel decoder / "
        "transformer module keys (expected 'model.pixel_level_module.decoder.*' "
        "and 'model.transformer_module.*')"
    )
  return out


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_params(converted: Mapping[str, Any], expected: Mapping[str, Any], what: str) -> None:
  """Raise if `converted` lacks, adds or reshapes a leaf of `expected` (e.g. the
  `jax.eval_shape` of the module's init)."""
  got, want = _flat(converted), _flat(expected)
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  wrong = sorted(k for k in set(got) & set(want) if tuple(np.shape(got[k])) != tuple(want[k].shape))
  if missing or extra or wrong:
    raise ValueError(
        f"mask2former_hf: converted {what} params do not fit the model: "
        f"missing {missing[:10]}, unexpected {extra[:10]}, "
        f"wrong shape {[(k, np.shape(got[k]), want[k].shape) for k in wrong[:10]]}"
    )

"""Reading CLIP checkpoints into a flat {OpenAI key: float32 numpy array} dict.

Formats: OpenAI TorchScript archives (only with allow_torchscript=True: loading one runs
code stored in the archive), plain state dicts (.pt/.pth/.bin, `torch.load(
weights_only=True)`, never a plain unpickle), open_clip checkpoints (`{"state_dict":
...}`, `module.` prefixes), `.safetensors` (read with safetensors.numpy, no torch),
and transformers `CLIPModel` state dicts (renamed onto OpenAI names here).
"""

import os
import re
from typing import Any, Dict, Mapping
import zipfile

import numpy as np


class CheckpointError(ValueError):
  """A checkpoint cannot be read or does not match the expected parameters."""


def _to_numpy(value) -> np.ndarray:
  if isinstance(value, np.ndarray):
    arr = value
  elif hasattr(value, "detach"):  # torch.Tensor
    t = value.detach().cpu()
    if t.is_floating_point():
      t = t.float()
    arr = t.numpy()
  else:
    arr = np.asarray(value)
  if np.issubdtype(arr.dtype, np.floating):
    arr = arr.astype(np.float32)
  return arr


def _is_torchscript(path: str) -> bool:
  try:
    with zipfile.ZipFile(path) as zf:
      names = zf.namelist()
  except (zipfile.BadZipFile, OSError):
    return False
  return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _load_safetensors_bf16(path: str) -> Dict[str, np.ndarray]:
  """safetensors.numpy cannot represent bfloat16; read such files directly (format:
  u64 header length, JSON header of dtype/shape/offsets, raw little-endian data)."""
  import json
  import struct

  import ml_dtypes

  dtypes = {
      "BF16": ml_dtypes.bfloat16,
      "F16": np.float16,
      "F32": np.float32,
      "F64": np.float64,
      "I64": np.int64,
      "I32": np.int32,
      "I16": np.int16,
      "I8": np.int8,
      "U8": np.uint8,
      "BOOL": np.bool_,
  }
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
    data = f.read()
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in dtypes:
      raise CheckpointError(f"{path!r}: tensor {name!r} has unsupported dtype " f"{info['dtype']}")
    start, end = info["data_offsets"]
    if end > len(data):
      raise CheckpointError(
          f"could not read safetensors file {path!r} (truncated): "
          f"tensor {name!r} ends past the end of the file"
      )
    out[name] = (
        np.frombuffer(data[start:end], dtype=dtypes[info["dtype"]])
        .reshape(info["shape"])
        .astype(np.float32 if info["dtype"] == "BF16" else None)
    )
  return out


def load_file(path: str, allow_torchscript: bool = False) -> Dict[str, Any]:
  """Raw state dict of a checkpoint file (values: tensors or numpy arrays)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file as load_safetensors

    try:
      return dict(load_safetensors(path))
    except TypeError as e:
      if "bfloat16" not in str(e):
        raise
      return _load_safetensors_bf16(path)
    except Exception as e:  # safetensors raises its own error types
      raise CheckpointError(
          f"could not read safetensors file {path!r} (truncated or " f"corrupt?): {e}"
      ) from e
  import torch

  if _is_torchscript(path):
    if not allow_torchscript:
      raise CheckpointError(
          f"{path!r} is a TorchScript archive (like OpenAI's released CLIP .pt "
          f"files); loading it executes code stored in the archive. If you trust "
          f"the file, pass allow_torchscript=True (CLI: --allow-torchscript)."
      )
    try:
      return dict(torch.jit.load(path, map_location="cpu").state_dict())
    except Exception as e:
      raise CheckpointError(f"could not load TorchScript archive {path!r}: {e}") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    msg = str(e)
    if "weights_only" in msg or "Unsupported global" in msg or "GLOBAL" in msg:
      raise CheckpointError(
          f"refusing to load {path!r}: it is not a plain tensor state dict and "
          f"unpickling it would run arbitrary code (torch.load weights_only=True "
          f"failed: {msg.splitlines()[0]})"
      ) from e
    raise CheckpointError(
        f"could not read checkpoint {path!r} (truncated or corrupt?): "
        f"{msg.splitlines()[0] if msg else type(e).__name__}"
    ) from e
  if not isinstance(obj, Mapping):
    raise CheckpointError(
        f"{path!r} holds a {type(obj).__name__}, expected a state "
        f"dict (mapping of parameter names to tensors)"
    )
  return dict(obj)


def unwrap(state: Mapping[str, Any]) -> Dict[str, Any]:
  """open_clip / training wrappers: {"state_dict": sd} and `module.` prefixes."""
  for key in ("state_dict", "model"):
    if key in state and isinstance(state[key], Mapping):
      state = state[key]
      break
  state = dict(state)
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module.") :]: v for k, v in state.items()}
  return state


_HF_LAYER = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)$")
_HF_BLOCK = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_HF_SIMPLE = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
}
_HF_PREFIX = {
    "vision_model.pre_layrnorm.": "visual.ln_pre.",
    "vision_model.post_layernorm.": "visual.ln_post.",
    "text_model.final_layer_norm.": "ln_final.",
}
_HF_SKIP = (
    "vision_model.embeddings.position_ids",
    "text_model.embeddings.position_ids",
    "logit_scale",
)


def is_hf(state: Mapping[str, Any]) -> bool:
  return any(k.startswith(("vision_model.", "text_model.")) for k in state)


def hf_to_openai(state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """transformers CLIPModel names -> OpenAI names; unknown keys pass through unchanged
  (so that the converter reports them); q/k/v projections are packed into in_proj."""
  out, qkv = {}, {}
  for key, value in state.items():
    if key in _HF_SKIP:
      continue
    if key in _HF_SIMPLE:
      out[_HF_SIMPLE[key]] = value
      continue
    if key in ("visual_projection.weight", "text_projection.weight"):
      out["visual.proj" if key.startswith("visual") else "text_projection"] = value.T
      continue
    prefix = next((p for p in _HF_PREFIX if key.startswith(p)), None)
    if prefix:
      out[_HF_PREFIX[prefix] + key[len(prefix) :]] = value
      continue
    m = _HF_LAYER.match(key)
    if m:
      tower, idx, rest = m.groups()
      base = ("visual." if tower == "vision_model" else "") + f"transformer.resblocks.{idx}."
      qm = re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", rest)
      if qm:
        qkv.setdefault((base, qm.group(2)), {})[qm.group(1)] = value
        continue
      sub = next((s for s in _HF_BLOCK if rest.startswith(s + ".")), None)
      if sub:
        out[base + _HF_BLOCK[sub] + rest[len(sub) :]] = value
        continue
    out[key] = value
  for (base, kind), parts in qkv.items():
    if set(parts) != {"q", "k", "v"}:
      # Report the incomplete projection under its HF names.
      for p, v in parts.items():
        out[f"{base}attn.{p}_proj.{kind}(incomplete q/k/v)"] = v
      continue
    out[f"{base}attn.in_proj_{kind}"] = np.concatenate([parts["q"], parts["k"], parts["v"]])
  return out


def read_state_dict(src, allow_torchscript: bool = False) -> Dict[str, np.ndarray]:
  """src: a path or an already-loaded state dict -> OpenAI-named float32 numpy dict."""
  state = (
      load_file(os.fspath(src), allow_torchscript) if isinstance(src, (str, os.PathLike)) else src
  )
  if not isinstance(state, Mapping):
    raise CheckpointError(f"expected a path or a state dict, got {type(state).__name__}")
  state = {k: _to_numpy(v) for k, v in unwrap(state).items()}
  return hf_to_openai(state) if is_hf(state) else state

"""OpenAI-named CLIP state dict -> flax variables of `clip.ImageEncoder` / `clip.TextEncoder`.

Key rewriting: `visual.` keys go to the image tower, the rest to the text tower; dots
become nesting; a leaf `weight` becomes `kernel` (conv OIHW -> HWIO, linear transposed),
`scale` (norms) or `embedding`; BN running stats go to `batch_stats` as `mean`/`var`.
Every other name (`positional_embedding`, `in_proj_weight`, `proj`...) is kept.
"""

import logging
from typing import Dict, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from convert_weights.clip_sources import CheckpointError
from convert_weights.clip_sources import read_state_dict
from mtaclip_jax.models import clip

log = logging.getLogger(__name__)

_SKIP = ("logit_scale", "input_resolution", "context_length", "vocab_size")
_SHOW = 8  # keys listed per kind of problem


def infer_arch(state: Mapping[str, np.ndarray]) -> clip.CLIPArch:
  """The registered arch whose shapes match an OpenAI-named state dict."""

  def shape(key):
    if key not in state:
      raise CheckpointError(
          f"cannot infer the CLIP arch: key {key!r} is missing "
          f"(pass arch=... / --arch to convert anyway)"
      )
    return state[key].shape

  keys = list(state)
  if "visual.proj" in state:
    vision = dict(
        vision_layers=sum(
            k.startswith("visual.transformer.resblocks.") and k.endswith(".attn.in_proj_weight")
            for k in keys
        ),
        vision_width=shape("visual.conv1.weight")[0],
        vision_patch_size=shape("visual.conv1.weight")[-1],
        image_resolution=shape("visual.conv1.weight")[-1]
        * round((shape("visual.positional_embedding")[0] - 1) ** 0.5),
    )
  else:
    vision = dict(
        vision_layers=tuple(
            len({k.split(".")[2] for k in keys if k.startswith(f"visual.layer{b}.")})
            for b in range(1, 5)
        ),
        vision_width=shape("visual.layer1.0.conv1.weight")[0],
        vision_patch_size=None,
        image_resolution=32 * round((shape("visual.attnpool.positional_embedding")[0] - 1) ** 0.5),
    )
  found = dict(
      vision,
      embed_dim=shape("text_projection")[1],
      context_length=shape("positional_embedding")[0],
      vocab_size=shape("token_embedding.weight")[0],
      transformer_width=shape("ln_final.weight")[0],
      transformer_layers=len(
          {k.split(".")[2] for k in keys if k.startswith("transformer.resblocks.")}
      ),
  )
  for arch in clip.ARCHS.values():
    if all(getattr(arch, f) == v for f, v in found.items()):
      return arch
  raise CheckpointError(
      f"no registered CLIP arch matches the checkpoint's shapes {found}; "
      f"known archs: {sorted(clip.ARCHS)}"
  )


def expected_variables(arch: clip.CLIPArch) -> Dict[str, Dict]:
  """Shapes (jax.ShapeDtypeStruct trees) of both towers' variables, without compute."""
  rng = jax.random.key(0)
  res = arch.image_resolution
  image = jax.eval_shape(clip.ImageEncoder(arch).init, rng, jnp.zeros((1, res, res, 3)))
  text = jax.eval_shape(
      clip.TextEncoder(arch).init, rng, jnp.zeros((1, arch.context_length), jnp.int32)
  )
  return {
      "image": jax.tree.map(lambda s: s.shape, dict(image)),
      "text": jax.tree.map(lambda s: s.shape, dict(text)),
  }


def _get(tree, path):
  for p in path:
    if not isinstance(tree, Mapping) or p not in tree:
      return None
    tree = tree[p]
  return tree


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _flatten(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def _target(expected, tower, key) -> Optional[Tuple[str, Tuple[str, ...]]]:
  """(collection, flax path) for an OpenAI key, or None if the tower has no such leaf."""
  parts = key.split(".")
  module, leaf = tuple(parts[:-1]), parts[-1]
  params = _get(expected[tower].get("params", {}), module)
  stats = _get(expected[tower].get("batch_stats", {}), module)
  if leaf == "running_mean" and isinstance(stats, Mapping) and "mean" in stats:
    return "batch_stats", module + ("mean",)
  if leaf == "running_var" and isinstance(stats, Mapping) and "var" in stats:
    return "batch_stats", module + ("var",)
  if not isinstance(params, Mapping):
    return None
  if leaf == "weight":
    leaf = next((n for n in ("kernel", "scale", "embedding") if n in params), None)
    if leaf is None:
      return None
  if leaf in params and not isinstance(params[leaf], Mapping):
    return "params", module + (leaf,)
  return None


def torch_to_flax_layout(value: np.ndarray, path) -> np.ndarray:
  """A torch tensor in the layout of the flax param at `path` (conv OIHW -> HWIO,
  linear weight transposed; everything else as is)."""
  if path[-1] == "kernel":
    if value.ndim == 4:
      return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if value.ndim == 2:
      return value.T
  return value


# ViT FPN adapters are new modules, initialised by the model, not by CLIP weights.
_NEW_MODULES = set(clip.vit.ADAPTERS)


def convert_state_dict(
    state: Mapping[str, np.ndarray], arch: Union[None, str, clip.CLIPArch] = None
):
  """OpenAI-named numpy state dict -> (arch, {"image": variables, "text": variables})."""
  arch = infer_arch(state) if arch is None else clip.get_arch(arch)
  expected = expected_variables(arch)
  out = {"image": {}, "text": {}}
  unknown, misshaped, misshaped_paths = [], [], set()
  for key, value in state.items():
    if key in _SKIP or key.endswith("num_batches_tracked"):
      continue
    tower, rest = ("image", key[len("visual.") :]) if key.startswith("visual.") else ("text", key)
    target = _target(expected, tower, rest)
    if target is None:
      unknown.append(key)
      continue
    collection, path = target
    value = torch_to_flax_layout(np.asarray(value), path)
    want = _get(expected[tower][collection], path)
    if tuple(value.shape) != tuple(want):
      misshaped.append(
          f"{key}: {tuple(value.shape)} (as {'/'.join(path)}), " f"expected {tuple(want)}"
      )
      misshaped_paths.add((tower, collection, path))
      continue
    _set(out[tower].setdefault(collection, {}), path, value.astype(np.float32))
  missing = []
  for tower in ("image", "text"):
    for collection, tree in expected[tower].items():
      for path, _ in _flatten(tree):
        if (path[0] in _NEW_MODULES and tower == "image") or (
            tower,
            collection,
            path,
        ) in misshaped_paths:
          continue
        if _get(out[tower].get(collection, {}), path) is None:
          missing.append(f"{tower}:{collection}/{'/'.join(path)}")
  if unknown or missing or misshaped:
    lines = [f"checkpoint does not match CLIP arch {arch.name!r}:"]
    for title, items in (
        ("unknown keys", unknown),
        ("missing parameters", missing),
        ("mis-shaped keys", misshaped),
    ):
      if items:
        more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
        lines.append(f"  {len(items)} {title}: {items[:_SHOW]}{more}")
    raise CheckpointError("\n".join(lines))
  log.info(
      "converted CLIP %s: %d image and %d text tensors",
      arch.name,
      sum(1 for c in out["image"].values() for _ in _flatten(c)),
      sum(1 for c in out["text"].values() for _ in _flatten(c)),
  )
  return arch, out


def convert_clip(
    src, arch: Union[None, str, clip.CLIPArch] = None, allow_torchscript: bool = False
) -> Dict[str, Dict]:
  """CLIP checkpoint (path or loaded state dict, any supported format) ->
  {"image": {"params", "batch_stats"(ResNets)}, "text": {"params"}} of numpy arrays.
  The arch is inferred from the shapes when None. ViT FPN adapters are not included
  (they are new modules): overlay the result on initialised variables with
  `merge_into`."""
  state = read_state_dict(src, allow_torchscript=allow_torchscript)
  return convert_state_dict(state, arch)[1]


def merge_into(variables: Mapping, converted: Mapping) -> Dict:
  """Copy of `variables` (e.g. a tower's init variables) with every leaf of `converted`
  replacing its counterpart; a converted leaf absent from `variables` or of another
  shape is an error."""
  merged = jax.tree.map(lambda x: x, dict(variables))
  problems = []
  for path, value in _flatten(converted):
    old = _get(merged, path)
    if old is None or isinstance(old, Mapping):
      problems.append(f"{'/'.join(path)}: not in the target variables")
    elif tuple(old.shape) != tuple(value.shape):
      problems.append(f"{'/'.join(path)}: {tuple(value.shape)} vs target " f"{tuple(old.shape)}")
    else:
      _set(merged, path, jnp.asarray(value, dtype=old.dtype))
  if problems:
    raise CheckpointError(
        f"converted weights do not fit the model: {len(problems)} "
        f"problems, first: {problems[:_SHOW]}"
    )
  return merged

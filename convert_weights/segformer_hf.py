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

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from convert_weights.clip_sources import CheckpointError, read_state_dict
from mtaclip_jax.models import mit

log = logging.getLogger(__name__)

_SHOW = 8  # keys listed per kind of problem
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
_NVLABS_BLOCK = [("norm1.", "layernorm_before."), ("norm2.", "layernorm_after."),
                 ("attn.q.", "attention.q_proj."), ("attn.proj.", "attention.o_proj."),
                 ("attn.sr.", "attention.sequence_reduction.sequence_reduction."),
                 ("attn.norm.", "attention.sequence_reduction.layer_norm."),
                 ("mlp.", "mlp.")]


def _nvlabs_names(key: str, value) -> Dict[str, Any]:
    """One NVlabs key -> {current key: value}; `attn.kv` becomes k_proj and v_proj."""
    m = _NVLABS_STAGE.match(key)
    if m is None:
        return {key: value}
    kind, stage, rest = m.group(1), int(m.group(2)) - 1, m.group(3)
    if kind == "patch_embed":
        if rest.startswith("norm."):
            rest = "layer_norm." + rest[len("norm."):]
        return {f"stages.{stage}.patch_embeddings.{rest}": value}
    if kind == "norm":
        return {f"stages.{stage}.layer_norm.{rest}": value}
    block, _, rest = rest.partition(".")
    base = f"stages.{stage}.blocks.{block}."
    if rest.startswith("attn.kv."):
        leaf = rest[len("attn.kv."):]
        half = np.shape(value)[0] // 2
        return {f"{base}attention.k_proj.{leaf}": value[:half],
                f"{base}attention.v_proj.{leaf}": value[half:]}
    for old, new in _NVLABS_BLOCK:
        if rest.startswith(old):
            return {base + new + rest[len(old):]: value}
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
                key = key[len(prefix):]
        if key.startswith(_IGNORED_PREFIXES):
            continue
        out.update(_current_names(key, value))
    return out


def expected_shapes(fields: Mapping) -> Dict[tuple, tuple]:
    """Flat {flax param path: shape} of a MixVisionTransformer, without compute."""
    return dict(_expected_shapes(tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                              for k, v in fields.items()))))


@functools.lru_cache(maxsize=8)
def _expected_shapes(fields: tuple):
    model = mit.MixVisionTransformer(**dict(fields))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    return tuple((k, v.shape) for k, v in traverse_util.flatten_dict(shapes["params"]).items())


def infer_arch(state: Mapping[str, Any]) -> Optional[str]:
    """The MIT_ARCHS name whose depths and widths match current-named keys, or None."""
    depths, widths = [], []
    for i in range(4):
        proj = state.get(f"stages.{i}.patch_embeddings.proj.weight")
        if proj is None:
            return None
        widths.append(int(np.shape(proj)[0]))
        depths.append(len({k.split(".")[3] for k in state
                           if k.startswith(f"stages.{i}.blocks.")}))
    for name, fields in mit.MIT_ARCHS.items():
        if tuple(fields["depths"]) == tuple(depths) and \
                tuple(fields["hidden_sizes"]) == tuple(widths):
            return name
    return None


def _target(expected, key: str):
    """Flax path of a current-named key, or None if the model has no such leaf."""
    *module, leaf = key.split(".")
    if leaf == "weight":
        for name in ("kernel", "scale"):
            if tuple(module) + (name,) in expected:
                return tuple(module) + (name,)
        return None
    path = tuple(module) + (leaf,)
    return path if path in expected else None


def _rewrite(value: np.ndarray, path) -> np.ndarray:
    if path[-1] == "kernel":
        if value.ndim == 4:
            return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO (depthwise: [3, 3, 1, C])
        if value.ndim == 2:
            return value.T
    return value


def _describe(arch) -> str:
    return repr(arch) if isinstance(arch, str) else f"with fields {dict(arch)}"


def convert_segformer(src, arch: Union[str, Mapping] = "MiT-B4") -> Dict:
    """SegFormer checkpoint (path or loaded state dict of torch tensors / numpy arrays)
    -> float32 numpy params tree of `mit.build(arch)` (the `params` collection).
    `arch`: a name in `mit.MIT_ARCHS` or a dict of MixVisionTransformer fields."""
    fields = mit.arch_config(arch)
    state = segformer_keys(read_state_dict(src))
    expected = expected_shapes(fields)
    out, unknown, misshaped, misshaped_paths = {}, [], [], set()
    for key, value in state.items():
        path = _target(expected, key)
        if path is None:
            unknown.append(key)
            continue
        value = _rewrite(np.asarray(value, np.float32), path)
        if tuple(value.shape) != tuple(expected[path]):
            misshaped.append(f"{key}: {tuple(value.shape)} (as {'/'.join(path)}), "
                             f"expected {tuple(expected[path])}")
            misshaped_paths.add(path)
            continue
        out[path] = value
    missing = ["/".join(p) for p in expected if p not in out and p not in misshaped_paths]
    if unknown or missing or misshaped:
        lines = [f"checkpoint does not match MiT arch {_describe(arch)}:"]
        found = infer_arch(state)
        if found is not None:
            lines.append(f"  its shapes match {found!r}: pass arch={found!r}")
        for title, items in (("unknown keys", unknown), ("missing parameters", missing),
                             ("mis-shaped keys", misshaped)):
            if items:
                more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
                lines.append(f"  {len(items)} {title}: {items[:_SHOW]}{more}")
        raise CheckpointError("\n".join(lines))
    log.info("converted SegFormer encoder: %d tensors", len(out))
    return traverse_util.unflatten_dict(out)

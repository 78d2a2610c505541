"""Serialised inference with `jax.export`: a file runnable with jax alone.

  python -m mtaclip_jax.export --config configs/demo.py --workdir DIR \
      --out model.jaxexport [--size 512] [--classes "a,b,c"] [--platforms cpu,cuda]

The artifact maps normalised images float32 [b, S, S, 3] (b symbolic) to per-class
scores float32 [b, S, S, C] (the head of config.eval.head, or the similarity head
over `--classes`); the variables and the class prompts' text embeddings (the text
tower runs once, at export) are baked in as constants. A JSON sidecar `<out>.json`
holds the class names, palette, size and the normalisation mean/std, and the
test_scale and slide stride of the config, used by `predict --artifact --mode slide`.
Loading (`load`) needs only jax and numpy:

  exp = jax.export.deserialize(open("model.jaxexport", "rb").read())
  scores = exp.call(images)
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtaclip_jax.data import classes as data_classes
from mtaclip_jax.data import transforms
from mtaclip_jax.evaluation import inference
from mtaclip_jax.evaluation import restore
from mtaclip_jax.serve import outputs
from mtaclip_jax.serve import vocabulary


def export_fn(predict_fn, size: int, platforms: Sequence[str] | None = None):
  """`jax.export.Exported` of `predict_fn` on [b, size, size, 3] float32, b symbolic."""
  (b,) = jax.export.symbolic_shape("b")
  spec = jax.ShapeDtypeStruct((b, size, size, 3), np.float32)
  return jax.export.export(jax.jit(predict_fn), platforms=platforms)(spec)


def export_checkpoint(
    config,
    workdir: str,
    out: str,
    size: int = 512,
    classes: Sequence[str] | None = None,
    platforms: Sequence[str] | None = None,
) -> dict:
  """Writes `out` and `out + ".json"`; returns the sidecar dict. `config` None: the
  one saved in the checkpoint."""
  folder = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(folder):  # before the model is restored and traced
    raise FileNotFoundError(f"--out {out!r}: no folder {folder}")
  config = restore.run_config(config, workdir)
  step, model, variables, tokens = restore.restore_variables(config, workdir)
  # jax.export cannot serialise custom calls: the portable gather, whatever the config.
  model = model.clone(deform_attn_impl="gather")
  # Plain host arrays: they become constants of the exported module.
  variables = jax.tree.map(np.asarray, variables)
  tau = float(config.loss.get("tau", 1.0))
  if classes:
    tokens, columns = vocabulary.open_vocab_tokens(config, classes)
    names = list(classes)
    palette = outputs.cycle_palette(data_classes.full_palette(config.data), len(names))
    head = "similarity"
    cols = np.asarray(columns, np.int32)

    def fn(images):
      out = inference.apply_model(model, variables, images, class_tokens, t0)
      return inference.similarity_scores(
          out["m_proj"][-1],
          jnp.take(out["t_proj"][-1], cols, axis=2),
          _resize_masks(out["masks"][-1], images),
          tau,
      )

  else:
    head = config.eval.get("head", "class")
    names = data_classes.class_names(config.data)
    palette = data_classes.palette(config.data)

    def fn(images):
      out = inference.apply_model(model, variables, images, class_tokens, t0)
      masks = _resize_masks(out["masks"][-1], images)
      if head == "similarity":
        return inference.similarity_scores(out["m_proj"][-1], out["t_proj"][-1], masks, tau)
      return inference.semantic_scores(out["logits"][-1], masks)

  # The text tower runs here, once; its output is a constant of the artifact.
  class_tokens = jnp.asarray(np.asarray(tokens), jnp.int32)
  t0 = inference.text_embeddings(model, variables, class_tokens)
  exported = export_fn(fn, size, platforms)
  with open(out, "wb") as f:
    f.write(exported.serialize())
  crop = tuple(config.eval.get("crop_size", None) or ())
  stride = (
      list(config.eval.stride)
      if crop == (size, size) and config.eval.get("stride")
      else default_stride(size)
  )
  meta = {
      "class_names": names,
      "palette": [list(map(int, p)) for p in palette],
      "size": [size, size],
      "test_scale": list(config.eval.test_scale),
      "stride": stride,
      "mean": list(transforms.MEAN),
      "std": list(transforms.STD),
      "head": head,
      "step": int(step),
      "platforms": list(exported.platforms),
      "input": "float32 [b, H, W, 3], (rgb - mean) / std, zero padding",
      "output": "float32 [b, H, W, C] class scores",
  }
  with open(out + ".json", "w") as f:
    json.dump(meta, f, indent=1)
  return meta


def default_stride(size: int) -> list[int]:
  """Slide stride for S x S windows when the config's crop differs: 2/3 of S (mmseg's
  512 / 341)."""
  return [2 * size // 3] * 2


def _resize_masks(masks, images):
  b, q = masks.shape[:2]
  return jax.image.resize(masks, (b, q) + images.shape[1:3], "bilinear")


def load(path: str):
  """(call(images) -> scores, sidecar dict) of an artifact; needs only jax."""
  try:
    with open(path, "rb") as f:
      exported = jax.export.deserialize(bytearray(f.read()))
  except OSError as e:
    raise FileNotFoundError(f"--artifact {path!r}: cannot open ({e})") from e
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path}: not a jax.export artifact ({type(e).__name__}: {e})") from e
  try:
    with open(path + ".json") as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}.json: missing or unreadable sidecar of the artifact " f"({e})") from e
  return exported.call, meta

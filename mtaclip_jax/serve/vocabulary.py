"""Open vocabulary: class names given at prediction or export time, encoded with the
trained contexts and the frozen text tower, scored by the similarity head S(m', t')."""

from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp

from mtaclip_jax.evaluation import inference
from mtaclip_jax.models.clip import tokenizer


def parse_classes(spec: str) -> list[str]:
  """`"a,b,c"` or a .txt file (one name per line, or comma-separated). A spec that
  looks like a file (one word ending in .txt, or with a "/") must be one: a mistyped
  path is refused instead of becoming one class name."""
  text = spec
  looks_like_path = "," not in spec and (spec.lower().endswith(".txt") or os.sep in spec)
  if looks_like_path and not os.path.isfile(spec):
    raise FileNotFoundError(
        f"--classes {spec!r}: no such file; give a .txt file of class names (one per "
        "line) or the names themselves, comma-separated ('wall,sky,person')"
    )
  if os.path.isfile(spec):
    with open(spec) as f:
      text = f.read().replace("\n", ",")
  names = [n.strip() for n in text.split(",") if n.strip()]
  if not names:
    raise ValueError(f"--classes {spec!r}: no class names")
  return names


def open_vocab_tokens(config, names: Sequence[str]):
  """(class_tokens [C+1, L], columns of the named classes + "none" in them)."""
  if not (config.model.get("text_queries", True) and config.model.get("similarity_heads", True)):
    raise ValueError(
        "--classes needs a model with text queries and the similarity heads "
        "(config.model.text_queries=True, config.model.similarity_heads=True); this "
        "one scores the classes it was trained on only"
    )
  c = int(config.model.num_classes)
  if len(names) > c:
    raise ValueError(
        f"--classes: {len(names)} names, but this model has "
        f"{c} class slots (config.model.num_classes)"
    )
  none = config.data.none_class_name
  padded = list(names) + [none] * (c - len(names)) + [none]
  tokens = tokenizer.tokenize_class_names(padded, config.model.class_length)
  return tokens, list(range(len(names))) + [c]


def make_open_vocab_fn(model, variables, tokens, columns: Sequence[int], tau: float):
  """predict_fn(images) -> scores [B, H, W, len(columns) - 1] from S(m', t')."""
  cols = jnp.asarray(columns, jnp.int32)

  @jax.jit
  def apply(variables, tokens, t0, images):
    out = inference.apply_model(model, variables, images, tokens, t0)
    if "m_proj" not in out:
      raise ValueError(
          "--classes needs a model with text queries and the similarity heads "
          "(config.model.text_queries=True, config.model.similarity_heads=True)"
      )
    masks = out["masks"][-1]
    b, q = masks.shape[:2]
    masks = jax.image.resize(masks, (b, q) + images.shape[1:3], "bilinear")
    t_proj = jnp.take(out["t_proj"][-1], cols, axis=2)
    return inference.similarity_scores(out["m_proj"][-1], t_proj, masks, tau)

  tokens = jnp.asarray(tokens, jnp.int32)
  t0 = inference.text_embeddings(model, variables, tokens)
  return lambda images: apply(variables, tokens, t0, jnp.asarray(images, jnp.float32))

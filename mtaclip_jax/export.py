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
import sys
from typing import Sequence

import numpy as np

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def export_fn(predict_fn, size: int, platforms: Sequence[str] | None = None):
  """`jax.export.Exported` of `predict_fn` on [b, size, size, 3] float32, b symbolic."""
  import jax  # pylint: disable=g-import-not-at-top
  (b,) = jax.export.symbolic_shape("b")
  spec = jax.ShapeDtypeStruct((b, size, size, 3), np.float32)
  return jax.export.export(jax.jit(predict_fn), platforms=platforms)(spec)


def export_checkpoint(config, workdir: str, out: str, size: int = 512,
                      classes: Sequence[str] | None = None,
                      platforms: Sequence[str] | None = None) -> dict:
  """Writes `out` and `out + ".json"`; returns the sidecar dict."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mtaclip_jax import evaluate, inference, predict  # pylint: disable=g-import-not-at-top
  from mtaclip_jax.data import classes as data_classes  # pylint: disable=g-import-not-at-top
  step, model, variables, tokens = evaluate.restore_variables(config, workdir)
  # jax.export cannot serialise custom calls: the portable gather, whatever the config.
  model = model.clone(deform_attn_impl="gather")
  # Plain host arrays: they become constants of the exported module.
  variables = jax.tree.map(np.asarray, variables)
  tau = float(config.loss.get("tau", 1.0))
  if classes:
    tokens, columns = predict.open_vocab_tokens(config, classes)
    names = list(classes)
    palette = predict.cycle_palette(data_classes.DATASETS[config.data.name][1], len(names))
    head = "similarity"
    cols = np.asarray(columns, np.int32)

    def fn(images):
      out = inference.apply_model(model, variables, images, class_tokens, t0)
      return inference.similarity_scores(
          out["m_proj"][-1], jnp.take(out["t_proj"][-1], cols, axis=2),
          _resize_masks(out["masks"][-1], images), tau)
  else:
    head = config.eval.get("head", "class")
    names = data_classes.class_names(config.data)
    palette = data_classes.palette(config.data)

    def fn(images):
      out = inference.apply_model(model, variables, images, class_tokens, t0)
      masks = _resize_masks(out["masks"][-1], images)
      if head == "similarity":
        return inference.similarity_scores(out["m_proj"][-1], out["t_proj"][-1], masks,
                                           tau)
      return inference.semantic_scores(out["logits"][-1], masks)

  # The text tower runs here, once; its output is a constant of the artifact.
  class_tokens = jnp.asarray(np.asarray(tokens), jnp.int32)
  t0 = inference.text_embeddings(model, variables, class_tokens)
  exported = export_fn(fn, size, platforms)
  with open(out, "wb") as f:
    f.write(exported.serialize())
  crop = tuple(config.eval.get("crop_size", None) or ())
  stride = (list(config.eval.stride) if crop == (size, size) and config.eval.get("stride")
            else default_stride(size))
  meta = {"class_names": names, "palette": [list(map(int, p)) for p in palette],
          "size": [size, size], "test_scale": list(config.eval.test_scale),
          "stride": stride, "mean": list(MEAN), "std": list(STD), "head": head,
          "step": int(step), "platforms": list(exported.platforms),
          "input": "float32 [b, H, W, 3], (rgb - mean) / std, zero padding",
          "output": "float32 [b, H, W, C] class scores"}
  with open(out + ".json", "w") as f:
    json.dump(meta, f, indent=1)
  return meta


def default_stride(size: int) -> list[int]:
  """Slide stride for S x S windows when the config's crop differs: 2/3 of S (mmseg's
  512 / 341)."""
  return [2 * size // 3] * 2


def _resize_masks(masks, images):
  import jax  # pylint: disable=g-import-not-at-top
  b, q = masks.shape[:2]
  return jax.image.resize(masks, (b, q) + images.shape[1:3], "bilinear")


def load(path: str):
  """(call(images) -> scores, sidecar dict) of an artifact; needs only jax."""
  import jax  # pylint: disable=g-import-not-at-top
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
    raise ValueError(f"{path}.json: missing or unreadable sidecar of the artifact "
                     f"({e})") from e
  return exported.call, meta


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax is chatty at INFO
  from mtaclip_jax import predict  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  classes = predict.parse_classes(f.classes) if f.classes else None
  meta = export_checkpoint(f.config, f.workdir, f.out, f.size, classes, f.platforms)
  print(f"wrote {f.out} and {f.out}.json (step {meta['step']}, head {meta['head']}, "
        f"{len(meta['class_names'])} classes, {f.size}x{f.size}, "
        f"platforms {meta['platforms']})")


def cli():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from mtaclip_jax import config_cli  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Config the model was trained with.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Workdir of the checkpoint (latest step).")
  flags.DEFINE_string("out", None, "Artifact path (a .json sidecar is written next to it).")
  flags.DEFINE_integer("size", 512, "Square input size S of the artifact.")
  flags.DEFINE_string("classes", None, "Open vocabulary names ('a,b,c' or a .txt file).")
  flags.DEFINE_list("platforms", None, "jax.export platforms, e.g. cpu,cuda (default: "
                    "the current backend).")
  flags.mark_flags_as_required(["config", "workdir", "out"])
  config_cli.run_app(main, also_user_errors=(ValueError,))


if __name__ == "__main__":
  cli()

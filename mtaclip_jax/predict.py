"""Segment images with a trained checkpoint or an exported artifact.

  python -m mtaclip_jax.predict --config configs/demo.py --workdir DIR \
      --images a.jpg photos/ 'more/*.png' --out OUT [--mode whole|slide] \
      [--classes "wall,sky,person" | --classes names.txt] [--batch 8]
  python -m mtaclip_jax.predict --artifact model.jaxexport --images ... --out OUT \
      [--mode whole|slide]

Per image NAME it writes NAME_label.png (palette PNG, pixel value = class index),
NAME_overlay.png (image blended with the class colours, legend of the classes
present on the right) and NAME.json (per-class pixel fractions, summing to 1).

The config comes from `--config` (as in main.py, with the same overrides); the
checkpoint's own saved config is not read back, so pass the config it was trained
with. `--classes` switches to open vocabulary: the names (at most
config.model.num_classes; fewer are padded with the "none" name, and the padded
slots are left out of the softmax) plus config.data.none_class_name are encoded with
the trained contexts and the frozen text encoder, fed to the decoder as text
queries, and every mask query is classified by the mask-text similarity S(m', t')
(head "similarity") instead of the fixed class head.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from typing import Callable, Sequence

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


# ------------------------------------------------------------------ inputs


def expand_images(specs: Sequence[str]) -> list[str]:
  """Files, folders (their images, sorted) and glob patterns -> list of paths."""
  paths = []
  for spec in specs:
    if os.path.isdir(spec):
      paths += sorted(os.path.join(spec, f) for f in os.listdir(spec)
                      if f.lower().endswith(IMAGE_EXTENSIONS))
    elif os.path.exists(spec):
      paths.append(spec)
    else:
      matches = sorted(glob.glob(spec))
      if not matches:
        raise FileNotFoundError(f"--images {spec!r}: no such file, folder or matching glob")
      paths += [m for m in matches if not os.path.isdir(m)]
  return paths


def parse_classes(spec: str) -> list[str]:
  """`"a,b,c"` or a .txt file (one name per line, or comma-separated)."""
  text = spec
  if os.path.isfile(spec):
    with open(spec) as f:
      text = f.read().replace("\n", ",")
  names = [n.strip() for n in text.split(",") if n.strip()]
  if not names:
    raise ValueError(f"--classes {spec!r}: no class names")
  return names


def read_image(path: str) -> np.ndarray:
  """uint8 [H, W, 3]; raises ValueError naming the file if it cannot be decoded."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"), np.uint8)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


# ------------------------------------------------------------------ outputs


def cycle_palette(palette: Sequence[Sequence[int]], n: int) -> list[tuple[int, int, int]]:
  return [tuple(int(v) for v in palette[i % len(palette)]) for i in range(n)]


def class_fractions(label: np.ndarray, names: Sequence[str]) -> dict[str, float]:
  counts = np.bincount(label.ravel(), minlength=len(names))[:len(names)]
  return {n: float(c) / label.size for n, c in zip(names, counts)}


def overlay(image: np.ndarray, label: np.ndarray, names: Sequence[str],
            palette: Sequence[Sequence[int]], alpha: float = 0.5):
  """PIL image: `image` blended with the class colours, and a legend panel of the
  classes present to its right (the image keeps its size in the left part)."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  colours = np.asarray(palette, np.float32)[label]
  blend = np.clip((1 - alpha) * image + alpha * colours, 0, 255).astype(np.uint8)
  present = [c for c in np.unique(label) if c < len(names)]
  row, swatch = 14, 10
  width = 12 + swatch + 6 * max(len(names[c]) for c in present) if present else 0
  h, w = label.shape
  canvas = Image.new("RGB", (w + width, max(h, row * len(present) + 4)), (255, 255, 255))
  canvas.paste(Image.fromarray(blend), (0, 0))
  draw = ImageDraw.Draw(canvas)
  for i, c in enumerate(present):
    y = 2 + i * row
    draw.rectangle([w + 4, y + 1, w + 4 + swatch, y + 1 + swatch],
                   fill=tuple(palette[c]), outline=(0, 0, 0))
    draw.text((w + 8 + swatch, y), names[c], fill=(0, 0, 0))
  return canvas


def write_outputs(out_dir: str, name: str, image: np.ndarray, label: np.ndarray,
                  names: Sequence[str], palette: Sequence[Sequence[int]],
                  source: str) -> dict:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  png = Image.fromarray(label.astype(np.uint8))  # "L"; putpalette makes it "P"
  flat = [v for rgb in palette for v in rgb]
  png.putpalette(flat + [0] * (768 - len(flat)))
  png.save(os.path.join(out_dir, f"{name}_label.png"))
  overlay(image, label, names, palette).save(os.path.join(out_dir, f"{name}_overlay.png"))
  info = {"image": source, "height": int(label.shape[0]), "width": int(label.shape[1]),
          "classes": list(names), "fractions": class_fractions(label, names)}
  with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
    json.dump(info, f, indent=1)
  return info


def output_names(paths: Sequence[str]) -> list[str]:
  """File stems, made unique with a numeric suffix."""
  seen, names = {}, []
  for p in paths:
    stem = os.path.splitext(os.path.basename(p))[0]
    k = seen.get(stem, 0)
    seen[stem] = k + 1
    names.append(stem if k == 0 else f"{stem}_{k}")
  return names


# ---------------------------------------------------------- predict functions


def open_vocab_tokens(config, names: Sequence[str]):
  """(class_tokens [C+1, L], columns of the named classes + "none" in them)."""
  from mtaclip_jax.models import tokenizer  # pylint: disable=g-import-not-at-top
  c = int(config.model.num_classes)
  if len(names) > c:
    raise ValueError(f"--classes: {len(names)} names, but this model has "
                     f"{c} class slots (config.model.num_classes)")
  none = config.data.none_class_name
  padded = list(names) + [none] * (c - len(names)) + [none]
  tokens = tokenizer.tokenize_class_names(padded, config.model.class_length)
  return tokens, list(range(len(names))) + [c]


def make_open_vocab_fn(model, variables, tokens, columns: Sequence[int], tau: float):
  """predict_fn(images) -> scores [B, H, W, len(columns) - 1] from S(m', t')."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mtaclip_jax import inference  # pylint: disable=g-import-not-at-top
  cols = jnp.asarray(columns, jnp.int32)

  @jax.jit
  def apply(variables, tokens, t0, images):
    out = inference.apply_model(model, variables, images, tokens, t0)
    if "m_proj" not in out:
      raise ValueError("--classes needs a model with text queries "
                       "(config.model.text_queries=True)")
    masks = out["masks"][-1]
    b, q = masks.shape[:2]
    masks = jax.image.resize(masks, (b, q) + images.shape[1:3], "bilinear")
    t_proj = jnp.take(out["t_proj"][-1], cols, axis=2)
    return inference.similarity_scores(out["m_proj"][-1], t_proj, masks, tau)

  tokens = jnp.asarray(tokens, jnp.int32)
  t0 = inference.text_embeddings(model, variables, tokens)
  return lambda images: apply(variables, tokens, t0, jnp.asarray(images, jnp.float32))


def checkpoint_predictor(config, workdir: str, classes: Sequence[str] | None = None,
                         head: str | None = None):
  """(predict_fn, class names, palette, step) for the latest checkpoint of workdir.

  head: "class" or "similarity" (default config.eval.head, or "class"); with
  `classes` always the similarity head over those names.
  """
  # pylint: disable=g-import-not-at-top
  from mtaclip_jax import evaluate, inference
  from mtaclip_jax.data import classes as data_classes
  step, model, variables, tokens = evaluate.restore_variables(config, workdir)
  tau = float(config.loss.get("tau", 1.0))
  palette = data_classes.palette(config.data)
  if classes:
    tokens, columns = open_vocab_tokens(config, classes)
    fn = make_open_vocab_fn(model, variables, tokens, columns, tau)
    return fn, list(classes), cycle_palette(_full_palette(config), len(classes)), step
  head = head or config.eval.get("head", "class")
  fn = inference.make_predict_fn(model, variables, tokens, head=head, tau=tau)
  return fn, data_classes.class_names(config.data), palette, step


def _full_palette(config):
  from mtaclip_jax.data import classes as data_classes  # pylint: disable=g-import-not-at-top
  return data_classes.DATASETS[config.data.name][1]


def artifact_predictor(path: str, mode: str | None = None):
  """(predict_fn, names, palette, settings) of an exported artifact (export.py).

  The artifact takes S x S inputs (any batch). mode "whole" (default) resizes each
  image to fit S x S and pads it; "slide" resizes by the test_scale recorded at export
  and runs S x S windows at the recorded stride.
  """
  from mtaclip_jax import export, inference  # pylint: disable=g-import-not-at-top
  call, meta = export.load(path)
  size = tuple(meta["size"])
  mode = mode or "whole"
  if mode == "whole":
    settings = inference.Settings(mode="whole", test_scale=size, pad_size=size)
  elif mode == "slide":
    if "test_scale" not in meta:
      raise ValueError(f"{path}.json has no test_scale (exported by an older version): "
                       "--mode slide needs it; export the checkpoint again, or use "
                       "--mode whole")
    stride = tuple(meta.get("stride") or export.default_stride(size[0]))
    settings = inference.Settings(mode="slide", test_scale=tuple(meta["test_scale"]),
                                  crop_size=size, stride=stride)
  else:
    raise ValueError(f"--mode {mode!r} with --artifact: expected 'whole' or 'slide'")
  return call, meta["class_names"], [tuple(p) for p in meta["palette"]], settings


# ------------------------------------------------------------------ the loop


def _bucket(n: int, batch: int) -> int:
  """Batch shape for n images: the next power of two, at most `batch` (a few
  compiles instead of one per group size)."""
  return min(batch, 1 << max(n - 1, 0).bit_length())


def _whole_input(image: np.ndarray, settings):
  """(normalised padded input [H, W, 3], (h, w) of the resized image inside it), as
  `inference.resized_scores` prepares a whole-image pass."""
  from mtaclip_jax import inference  # pylint: disable=g-import-not-at-top
  size = inference.rescale_size(image.shape[0], image.shape[1], settings.test_scale)
  resized = inference.resize_image(image, size)
  padded = inference.padded_size(size, settings)
  return inference.pad_image(inference.normalise(resized), padded), size


def _segment_batch(predict_fn: Callable, items: list, settings, batch: int) -> list:
  """Labels of same-shape whole-image inputs [(image, input, size, ...)] in one call."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mtaclip_jax import inference  # pylint: disable=g-import-not-at-top
  x = np.zeros((_bucket(len(items), batch),) + items[0][1].shape, np.float32)
  for i, item in enumerate(items):
    x[i] = item[1]
  scores = jnp.asarray(predict_fn(x), jnp.float32)
  if scores.shape[1:3] != x.shape[1:3]:  # stride-4 scores: to the input size
    scores = jax.image.resize(scores, x.shape[:3] + scores.shape[-1:], "bilinear")
  labels = []
  for i, (image, _, size, *_) in enumerate(items):
    h, w = image.shape[:2]
    out = inference.resize_region(scores[i], np.asarray(size, np.int32),
                                  np.asarray((h, w), np.int32),
                                  inference.round_up((h, w), settings.out_multiple))
    labels.append(np.asarray(jnp.argmax(out, axis=-1)[:h, :w], np.int32))
  return labels


def _image_settings(image: np.ndarray, settings, batch: int):
  """Slide mode: `settings` with this image's windows run `batch` at a time (fewer if
  it has fewer windows). Other modes: unchanged."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from mtaclip_jax import inference  # pylint: disable=g-import-not-at-top
  if settings.mode != "slide":
    return settings
  size = inference.rescale_size(image.shape[0], image.shape[1], settings.test_scale)
  n = len(inference.slide_windows(size[0], size[1], settings.crop_size, settings.stride))
  return dataclasses.replace(settings, slide_batch=_bucket(n, batch))


def predict_images(predict_fn: Callable, settings, paths: Sequence[str], out_dir: str,
                   names: Sequence[str], palette, progress: bool = True,
                   batch: int = 8) -> list[str]:
  """Segments every image and writes its outputs; returns the failure messages
  (unreadable images and per-image errors), one per failed image.

  Whole-image inference runs up to `batch` images of the same resized shape per
  call; slide inference runs up to `batch` windows of one image per call; ms_flip
  one image at a time. The labels do not depend on `batch`.
  """
  import tqdm  # pylint: disable=g-import-not-at-top
  from mtaclip_jax import inference  # pylint: disable=g-import-not-at-top
  if batch < 1:
    raise ValueError(f"--batch {batch}: expected a positive number of images")
  os.makedirs(out_dir, exist_ok=True)
  failures = []
  bar = tqdm.tqdm(total=len(paths), desc="predict", unit="img", disable=not progress,
                  file=sys.stderr)

  def fail(message):
    failures.append(message)
    tqdm.tqdm.write(f"error: {message}", file=sys.stderr)
    bar.update(1)

  def done(image, label, path, name):
    write_outputs(out_dir, name, image, label, names, palette, path)
    bar.update(1)

  def flush(group):
    try:
      labels = _segment_batch(predict_fn, group, settings, batch)
    except ValueError as e:
      for item in group:
        fail(f"{item[3]}: {e}")
      return
    for (image, _, _, path, name), label in zip(group, labels):
      done(image, label, path, name)

  pending = {}  # whole mode: input shape -> [(image, input, size, path, name)]
  for path, name in zip(paths, output_names(paths)):
    try:
      image = read_image(path)
      if settings.mode == "whole":
        inp, size = _whole_input(image, settings)
      else:
        label = inference.segment(predict_fn, image,
                                  _image_settings(image, settings, batch))
    except ValueError as e:
      fail(str(e))
      continue
    if settings.mode != "whole":
      done(image, label, path, name)
      continue
    group = pending.setdefault(inp.shape, [])
    group.append((image, inp, size, path, name))
    if len(group) == batch:
      flush(pending.pop(inp.shape))
  for group in pending.values():
    flush(group)
  bar.close()
  return failures


def run(config, workdir: str | None, images: Sequence[str], out_dir: str,
        mode: str | None = None, classes: str | None = None,
        artifact: str | None = None, progress: bool = True, batch: int = 8) -> list[str]:
  """The CLI without flags; returns the failure messages."""
  from mtaclip_jax import inference  # pylint: disable=g-import-not-at-top
  paths = expand_images(images)
  if not paths:
    raise FileNotFoundError(f"--images {list(images)}: no images found")
  if artifact:
    if classes:
      raise ValueError("--classes cannot be used with --artifact (the class names are "
                       "baked into the export; pass --classes to export instead)")
    fn, names, palette, settings = artifact_predictor(artifact, mode)
  else:
    if config is None or workdir is None:
      raise ValueError("pass --config and --workdir (or --artifact)")
    names_arg = parse_classes(classes) if classes else None
    fn, names, palette, _ = checkpoint_predictor(config, workdir, names_arg)
    eval_config = config.eval.to_dict()
    if mode:
      eval_config["mode"] = mode
    settings = inference.Settings.from_config(eval_config)
  return predict_images(fn, settings, paths, out_dir, names, palette, progress, batch)


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax is chatty at INFO
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  from mtaclip_jax import xla_cpu  # pylint: disable=g-import-not-at-top
  xla_cpu.keep_freed_memory_on_cpu()
  f = flags.FLAGS
  failures = run(f.config if f.artifact is None else None, f.workdir, f.images, f.out,
                 f.mode, f.classes, f.artifact, batch=f.batch)
  if failures:
    print(f"{len(failures)} image(s) failed:\n  " + "\n  ".join(failures),
          file=sys.stderr)
    sys.exit(1)


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Config file the model was trained "
                                  "with (configs/*.py[:arg]).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Workdir of the checkpoint (latest step).")
  flags.DEFINE_string("artifact", None, "An export.py artifact instead of a checkpoint.")
  flags.DEFINE_list("images", None, "Image files, folders or glob patterns.")
  flags.DEFINE_string("out", None, "Output folder.")
  flags.DEFINE_enum("mode", None, ["whole", "slide"], "Inference mode (default: "
                    "config.eval.mode; with --artifact: whole = resize to the artifact's "
                    "size, slide = windows of that size).")
  flags.DEFINE_integer("batch", 8, "Images per forward pass (whole mode: images of the "
                       "same resized shape; slide mode: windows of one image).")
  flags.DEFINE_string("classes", None, "Open vocabulary: 'a,b,c' or a .txt file.")
  flags.mark_flags_as_required(["images", "out"])


def cli():
  from mtaclip_jax import config_cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  config_cli.run_app(main, config_cli.list_flag_words("--images"),
                     also_user_errors=(ValueError, OSError))


if __name__ == "__main__":
  cli()

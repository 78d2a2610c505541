"""Segment images with a trained checkpoint or an exported artifact.

  python -m mtaclip_jax.predict --config configs/demo.py --workdir DIR \
      --images a.jpg photos/ 'more/*.png' --out OUT [--mode whole|slide] \
      [--classes "wall,sky,person" | --classes names.txt] [--batch 8]
  python -m mtaclip_jax.predict --artifact model.jaxexport --images ... --out OUT \
      [--mode whole|slide]

Per image NAME it writes NAME_label.png (palette PNG, pixel value = class index),
NAME_overlay.png (image blended with the class colours, legend of the classes
present on the right) and NAME.json (per-class pixel fractions, summing to 1).

The config is the one saved in the checkpoint, or `--config` (as in `python -m
mtaclip_jax.main`, with the same overrides; refused if it disagrees with the
checkpoint on a key that shapes the model). `--classes` switches to open vocabulary: the names (at most
config.model.num_classes; fewer are padded with the "none" name, and the padded
slots are left out of the softmax) plus config.data.none_class_name are encoded with
the trained contexts and the frozen text encoder, fed to the decoder as text
queries, and every mask query is classified by the mask-text similarity S(m', t')
(head "similarity") instead of the fixed class head.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from mtaclip_jax.data import classes as data_classes
from mtaclip_jax.data import image_decode
from mtaclip_jax.evaluation import inference
from mtaclip_jax.evaluation import restore
from mtaclip_jax.serve import export
from mtaclip_jax.serve import image_io
from mtaclip_jax.serve import outputs
from mtaclip_jax.serve import vocabulary


def checkpoint_predictor(
    config, workdir: str, classes: Sequence[str] | None = None, head: str | None = None
):
  """(predict_fn, class names, palette, step) for the latest checkpoint of workdir.

  head: "class" or "similarity" (default config.eval.head, or "class"); with
  `classes` always the similarity head over those names.
  """
  step, model, variables, tokens = restore.restore_variables(config, workdir)
  tau = float(config.loss.get("tau", 1.0))
  palette = data_classes.palette(config.data)
  if classes:
    tokens, columns = vocabulary.open_vocab_tokens(config, classes)
    fn = vocabulary.make_open_vocab_fn(model, variables, tokens, columns, tau)
    return fn, list(classes), outputs.cycle_palette(_full_palette(config), len(classes)), step
  head = head or config.eval.get("head", "class")
  fn = inference.make_predict_fn(model, variables, tokens, head=head, tau=tau)
  return fn, data_classes.class_names(config.data), palette, step


def _full_palette(config):
  return data_classes.full_palette(config.data)


def artifact_predictor(path: str, mode: str | None = None):
  """(predict_fn, names, palette, settings) of an exported artifact (serve/export.py).

  The artifact takes S x S inputs (any batch). mode "whole" (default) resizes each
  image to fit S x S and pads it; "slide" resizes by the test_scale recorded at export
  and runs S x S windows at the recorded stride.
  """
  call, meta = export.load(path)
  size = tuple(meta["size"])
  mode = mode or "whole"
  if mode == "whole":
    settings = inference.Settings(mode="whole", test_scale=size, pad_size=size)
  elif mode == "slide":
    if "test_scale" not in meta:
      raise ValueError(
          f"{path}.json has no test_scale (exported by an older version): "
          "--mode slide needs it; export the checkpoint again, or use "
          "--mode whole"
      )
    stride = tuple(meta.get("stride") or export.default_stride(size[0]))
    settings = inference.Settings(
        mode="slide", test_scale=tuple(meta["test_scale"]), crop_size=size, stride=stride
    )
  else:
    raise ValueError(f"--mode {mode!r} with --artifact: expected 'whole' or 'slide'")
  return call, meta["class_names"], [tuple(p) for p in meta["palette"]], settings


# ------------------------------------------------------------------ the loop


# Whole mode holds at most this many times `batch` decoded images waiting for a
# batch of their shape.
_MAX_PENDING = 4


def _bucket(n: int, batch: int) -> int:
  """Batch shape for n images: the next power of two, at most `batch` (a few
  compiles instead of one per group size)."""
  return min(batch, 1 << max(n - 1, 0).bit_length())


def _whole_input(image: np.ndarray, settings):
  """(normalised padded input [H, W, 3], (h, w) of the resized image inside it), as
  `inference.resized_scores` prepares a whole-image pass."""
  size = inference.rescale_size(image.shape[0], image.shape[1], settings.test_scale)
  resized = inference.resize_image(image, size)
  padded = inference.padded_size(size, settings)
  return inference.pad_image(inference.normalise(resized), padded), size


def _segment_batch(predict_fn: Callable, items: list, settings, batch: int) -> list:
  """Labels of same-shape whole-image inputs [(image, input, size, ...)] in one call."""
  x = np.zeros((_bucket(len(items), batch),) + items[0][1].shape, np.float32)
  for i, item in enumerate(items):
    x[i] = item[1]
  scores = jnp.asarray(predict_fn(x), jnp.float32)
  if scores.shape[1:3] != x.shape[1:3]:  # stride-4 scores: to the input size
    scores = jax.image.resize(scores, x.shape[:3] + scores.shape[-1:], "bilinear")
  return [
      inference.pass_labels([(scores[i], size, False)], image.shape[:2], settings)
      for i, (image, _, size, *_) in enumerate(items)
  ]


def _image_settings(image: np.ndarray, settings, batch: int):
  """Slide mode: `settings` with this image's windows run `batch` at a time (fewer if
  it has fewer windows). Other modes: unchanged."""
  if settings.mode != "slide":
    return settings
  size = inference.rescale_size(image.shape[0], image.shape[1], settings.test_scale)
  n = len(inference.slide_windows(size[0], size[1], settings.crop_size, settings.stride))
  return dataclasses.replace(settings, slide_batch=_bucket(n, batch))


class _Stop(Exception):
  """--fail-fast: the first image failed."""


def failure_message(path: str, error: BaseException, what: str) -> str:
  """One line naming the file, the stage (`what`) and the reason."""
  text = " ".join(str(error).split()) or type(error).__name__
  if text.startswith(path + ": "):
    text = text[len(path) + 2 :]
  if not isinstance(error, (ValueError, OSError)):
    text = f"{type(error).__name__}: {text}"
  return f"{path}: {what}: {text}" if what else f"{path}: {text}"


def predict_images(
    predict_fn: Callable,
    settings,
    paths: Sequence[str],
    out_dir: str,
    names: Sequence[str],
    palette,
    progress: bool = True,
    batch: int = 8,
    fail_fast: bool = False,
) -> list[str]:
  """Segments every image and writes its outputs; returns the failure messages, one
  line per failed image naming the file and the reason.

  Any failure of one image (reading or decoding it, its size, inference, writing its
  outputs) is reported and the others go on; with `fail_fast` the run stops at the
  first. Images are decoded by `data.image_decode` with their EXIF orientation
  applied. Whole-image inference runs up to `batch` images of the same resized
  shape per call (a failed call is retried one image at a time, so one image cannot
  fail the others); slide inference runs up to `batch` windows of one image per
  call; ms_flip one image at a time. The labels do not depend on `batch`.
  """
  if batch < 1:
    raise ValueError(f"--batch {batch}: expected a positive number of images")
  os.makedirs(out_dir, exist_ok=True)
  failures = []
  bar = tqdm.tqdm(
      total=len(paths), desc="predict", unit="img", disable=not progress, file=sys.stderr
  )

  finished = []  # images written or failed
  stopping = []  # fail_fast: set at the first failure

  def fail(path, error, what=""):
    failures.append(failure_message(path, error, what))
    tqdm.tqdm.write(f"error: {failures[-1]}", file=sys.stderr)
    finished.append(path)
    bar.update(1)
    if fail_fast and not stopping:
      stopping.append(path)
      raise _Stop

  def done(image, label, path, name):
    try:
      outputs.write_outputs(out_dir, name, image, label, names, palette, path)
    except Exception as e:  # pylint: disable=broad-except
      outputs.remove_outputs(out_dir, name)  # no partial outputs
      fail(path, e, "cannot write its outputs")
      return
    finished.append(path)
    bar.update(1)

  def flush(group):
    try:
      labels = _segment_batch(predict_fn, group, settings, batch)
    except Exception as e:  # pylint: disable=broad-except
      if len(group) == 1:
        h, w = group[0][0].shape[:2]
        fail(group[0][3], e, f"inference failed ({w}x{h} WxH)")
        return
      labels = None  # each alone: one image cannot fail the others
    stop = None
    for i, item in enumerate(group):
      try:  # a fail-fast stop finishes the group first: it was read before the stop
        if labels is None:
          flush([item])
        else:
          done(item[0], labels[i], item[3], item[4])
      except _Stop as e:
        stop = e
    if stop is not None:
      raise stop

  pending = {}  # whole mode: input shape -> [(image, input, size, path, name)]

  def flush_pending():
    while pending:
      flush(pending.pop(next(iter(pending))))

  try:
    for path, name in zip(paths, image_io.output_names(paths)):
      try:
        image = image_decode.read_rgb(path, apply_orientation=True)
      except Exception as e:  # pylint: disable=broad-except
        fail(path, e)
        continue
      try:
        if settings.mode == "whole":
          inp, size = _whole_input(image, settings)
        else:
          label = inference.segment(predict_fn, image, _image_settings(image, settings, batch))
      except Exception as e:  # pylint: disable=broad-except
        fail(path, e, f"inference failed ({image.shape[1]}x{image.shape[0]} WxH)")
        continue
      if settings.mode != "whole":
        done(image, label, path, name)
        continue
      group = pending.setdefault(inp.shape, [])
      group.append((image, inp, size, path, name))
      if len(group) == batch:
        flush(pending.pop(inp.shape))
      elif sum(len(g) for g in pending.values()) > _MAX_PENDING * batch:
        # Many shapes, few images each: the oldest group goes now, so the decoded
        # images held stay bounded.
        flush(pending.pop(next(iter(pending))))
    flush_pending()
  except _Stop:
    flush_pending()  # the images before the failure that wait for a batch
    tqdm.tqdm.write(
        f"stopped at the first failure (--fail-fast): {len(paths) - len(finished)} "
        "image(s) not processed",
        file=sys.stderr,
    )
  finally:
    bar.close()
  return failures


def run(
    config,
    workdir: str | None,
    images: Sequence[str],
    out_dir: str,
    mode: str | None = None,
    classes: str | None = None,
    artifact: str | None = None,
    progress: bool = True,
    batch: int = 8,
    fail_fast: bool = False,
) -> list[str]:
  """The CLI without flags; returns the failure messages."""
  paths = image_io.expand_images(images)
  if not paths:
    raise FileNotFoundError(f"--images {list(images)}: no images found")
  if artifact:
    if classes:
      raise ValueError(
          "--classes cannot be used with --artifact (the class names are "
          "baked into the export; pass --classes to export instead)"
      )
    fn, names, palette, settings = artifact_predictor(artifact, mode)
  else:
    if workdir is None:
      raise ValueError("pass --workdir (a training run's folder) or --artifact")
    names_arg = vocabulary.parse_classes(classes) if classes else None
    config = restore.run_config(config, workdir)
    fn, names, palette, _ = checkpoint_predictor(config, workdir, names_arg)
    eval_config = config.eval.to_dict()
    if mode:
      eval_config["mode"] = mode
    settings = inference.Settings.from_config(eval_config)
  return predict_images(fn, settings, paths, out_dir, names, palette, progress, batch, fail_fast)

"""Evaluation of semantic segmentation: mIoU over a dataset, whole / slide / MS+flip.

`evaluate(predict_fn, dataset, config.eval, num_classes, class_names)` runs
`inference.predict_scores` on every image (one at a time, any size), accumulates
the confusion matrix on device and returns mmseg's metrics (percent);
`write_results` stores them per checkpoint step, mode and head as JSON
(workdir/eval/step_N_MODE_HEAD.json) and TensorBoard scalars (eval/MODE/HEAD/mIoU, ...). `predict_fn` comes from `inference.make_predict_fn`.

With several processes each image is evaluated by exactly one of them (image i by
process i % process_count, on its first local device, with no collective per image)
and the confusion matrices and image counts are summed once at the end: the totals
are those of one process (docs/SCALING.md).
"""

from __future__ import annotations

import functools
import time
from typing import Iterable, Sequence

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import tqdm

from mtaclip_jax.config import validate
from mtaclip_jax.data import classes
from mtaclip_jax.data import pipeline
from mtaclip_jax.evaluation import inference
from mtaclip_jax.evaluation import metrics
from mtaclip_jax.evaluation import report
from mtaclip_jax.evaluation import restore
from mtaclip_jax.runtime import distributed

# Flush the int32 device confusion matrix to the host before it could overflow.
_FLUSH_PIXELS = 2**30


@functools.partial(jax.jit, static_argnames="num_classes", donate_argnums=0)
def _update_from_scores(cm, scores, label, num_classes):
  return metrics.update(cm, jnp.argmax(scores, axis=-1), label, num_classes)


def sum_over_processes(cm: np.ndarray, num_images: int) -> tuple[np.ndarray, int]:
  """Sums confusion matrices and image counts of all processes (multi-host eval,
  each process evaluating its shard). Counts travel as two int32 halves of 30 bits,
  since jax without x64 would truncate int64."""
  if jax.process_count() == 1:
    return cm, num_images
  # The processes finish their shares at different times; the gather below is their
  # first collective of this kind (distributed.py).
  distributed.barrier("evaluation done")
  cm = np.asarray(cm, np.int64)
  parts = np.stack([cm & (2**30 - 1), cm >> 30]).astype(np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(parts), np.int64)
  counts = np.asarray(multihost_utils.process_allgather(np.int32(num_images)))
  return (gathered[:, 0] + (gathered[:, 1] << 30)).sum(axis=0), int(counts.sum())


def this_process_share(dataset: Iterable[dict], max_images: int = 0) -> Iterable[dict]:
  """The images of `dataset` this process evaluates: i % process_count ==
  process_index among the first `max_images` (0: all); all of them with one process."""
  count, index = jax.process_count(), jax.process_index()
  if count == 1:
    return dataset
  if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
    n = min(len(dataset), max_images) if max_images else len(dataset)
    return (dataset[i] for i in range(index, n, count))
  return (
      x for i, x in enumerate(dataset) if i % count == index and (not max_images or i < max_images)
  )


def local_copy(tree):
  """The arrays of `tree` (global arrays: sharded, replicated, over any processes)
  whole on this process's first device, so that it can run the model alone. Arrays
  split over processes are gathered first (every process calls this together)."""
  leaves, treedef = jax.tree.flatten(tree)
  spread = [
      i
      for i, x in enumerate(leaves)
      if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated)
  ]
  if spread:
    distributed.barrier("gather variables")
    whole = jax.sharding.NamedSharding(
        leaves[spread[0]].sharding.mesh, jax.sharding.PartitionSpec()
    )
    gathered = jax.jit(lambda xs: xs, out_shardings=whole)([leaves[i] for i in spread])
    for i, x in zip(spread, gathered):
      leaves[i] = x
  leaves = [
      x.addressable_data(0) if isinstance(x, jax.Array) and not x.is_fully_addressable else x
      for x in leaves
  ]
  return treedef.unflatten(jax.device_put(leaves, jax.local_devices()[0]))


def _settings(eval_config) -> inference.Settings:
  if isinstance(eval_config, inference.Settings):
    return eval_config
  return inference.Settings.from_config(eval_config)


def evaluate(
    predict_fn: inference.PredictFn,
    dataset: Iterable[dict],
    eval_config,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    progress: bool = True,
    max_images: int | None = None,
) -> dict:
  """mIoU of `predict_fn` on `dataset`.

  Args:
    predict_fn: normalised images [1, H, W, 3] -> scores [1, h, w, C], on this
      process's devices alone (`local_copy` of the variables).
    dataset: iterable of {"image": uint8 [H, W, 3], "label": int [H, W] (255 =
      ignore), "name": str} (CONTRACT.md), the whole set: with several processes
      each evaluates its share (`this_process_share`) and the confusion matrices
      and image counts are summed over processes.
    eval_config: `config.eval` (mode, test_scale, crop_size, stride, scales, flip,
      optional pad_size, pad_multiple, out_multiple, ms_mode, tta_softmax,
      max_images) or an `inference.Settings`.
    num_classes: C.
    class_names: C names for the per-class results.
    progress: show a tqdm bar.
    max_images: stop after this many images (None: config.eval.max_images, 0 = all).

  Returns:
    {"mIoU", "mAcc", "aAcc" (percent), "per_class": {name: {"IoU", "Acc"}},
     "IoU", "Acc" (lists, class order), "confusion_matrix" (int64 [C, C]), "mode",
     "num_images", "seconds"}.
  """
  settings = _settings(eval_config)
  if max_images is None:
    get = getattr(eval_config, "get", None)
    max_images = int(get("max_images", 0) or 0) if get else 0
  total = len(dataset) if hasattr(dataset, "__len__") else None
  if max_images and total is not None:
    total = min(total, max_images)
  elif max_images:
    total = max_images

  if jax.process_count() > 1:
    dataset = this_process_share(dataset, max_images)
    max_images = 0
    if total is not None:  # this process's share
      total = len(range(jax.process_index(), total, jax.process_count()))
  cm_host = np.zeros((num_classes, num_classes), np.int64)
  cm = metrics.new_confusion_matrix(num_classes)
  pending = 0
  num_images = 0
  in_flight = None
  start = time.perf_counter()
  bar = tqdm.tqdm(total=total, desc=f"eval {settings.mode}", disable=not progress, unit="img")
  for example in dataset:
    if max_images and num_images >= max_images:
      break
    image = np.asarray(example["image"])
    label = np.asarray(example["label"])
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
      raise ValueError(
          f"{example.get('name', num_images)}: expected a uint8 [H, W, 3] "
          f"image, got {image.dtype} {image.shape}"
      )
    if label.shape != image.shape[:2]:
      raise ValueError(
          f"{example.get('name', num_images)}: label shape {label.shape} "
          f"does not match image shape {image.shape}"
      )
    scores = inference.predict_scores(predict_fn, image, settings)
    if scores.shape[-1] != num_classes:
      raise ValueError(
          f"predict_fn returns {scores.shape[-1]} class scores, expected "
          f"num_classes = {num_classes} (config.model.num_classes)"
      )
    padded = np.full(scores.shape[:2], metrics.IGNORE_INDEX, np.int32)
    padded[: label.shape[0], : label.shape[1]] = label
    if pending + padded.size >= _FLUSH_PIXELS:
      cm_host += np.asarray(cm, np.int64)
      cm, pending = metrics.new_confusion_matrix(num_classes), 0
    cm = _update_from_scores(cm, scores, padded, num_classes)
    # Dispatch is asynchronous: let the host prepare the next image while this one
    # runs, but no further ahead, or queued images would pile up in device memory.
    if in_flight is not None:
      in_flight.block_until_ready()
    in_flight = scores
    pending += padded.size
    num_images += 1
    bar.update(1)
  bar.close()
  cm_host += np.asarray(cm, np.int64)
  cm_host, num_images = sum_over_processes(cm_host, num_images)
  seconds = time.perf_counter() - start

  result = metrics.compute_metrics(cm_host, class_names)
  return {
      "mIoU": result["mIoU"],
      "mAcc": result["mAcc"],
      "aAcc": result["aAcc"],
      "per_class": result["per_class"],
      "IoU": result["IoU"].tolist(),
      "Acc": result["Acc"].tolist(),
      "confusion_matrix": cm_host,
      "mode": settings.mode,
      "num_images": num_images,
      "seconds": seconds,
  }


def evaluate_model(
    model,
    variables,
    class_tokens,
    dataset,
    config,
    class_names: Sequence[str] | None = None,
    workdir: str | None = None,
    step: int = 0,
    progress: bool = True,
) -> dict:
  """Evaluates flax `variables` of `model` with the settings of `config`.

  The head is `config.eval.head` ("class" or "similarity", with tau =
  `config.loss.tau`); C = `config.model.num_classes`. Prints the per-class table and,
  with `workdir`, writes the results (`write_results`) on process 0.
  """
  head = config.eval.get("head", "class")
  tau = float(config.loss.get("tau", 1.0)) if "loss" in config else 1.0
  # Each process runs the model on its own images (this_process_share), alone.
  predict_fn = inference.make_predict_fn(
      model, local_copy(variables), class_tokens, head=head, tau=tau
  )
  results = evaluate(
      predict_fn,
      dataset,
      config.eval,
      int(config.model.num_classes),
      class_names,
      progress=progress,
  )
  results["head"] = head
  results["step"] = int(step)
  # They set the result's name apart from the full validation result (report.py).
  results["split"] = config.eval.get("split", report.DEFAULT_SPLIT)
  results["max_images"] = int(config.eval.get("max_images", 0) or 0)
  if jax.process_index() == 0:
    print(report.format_table(results), flush=True)
  if workdir is not None:
    report.write_results(results, workdir, step)
  return results


def run(config, workdir: str) -> dict:
  """`--mode eval`: restore the latest (or config.eval.step) checkpoint, evaluate."""
  with distributed.agreed("start-up checks"):  # all processes stop if one fails
    validate.validate_config(config)
    validate.check_paths(config, init=False)
    validate.check_checkpoints(workdir)
  want = int(config.eval.get("step", -1))
  step, model, variables, tokens = restore.restore_variables(
      config, workdir, None if want < 0 else want
  )
  dataset = pipeline.make_eval_dataset(config.data, config.eval.get("split", "val"))
  results = evaluate_model(
      model,
      variables,
      tokens,
      dataset,
      config,
      class_names=classes.class_names(config.data),
      workdir=workdir,
      step=step,
      progress=True,
  )
  results["step"] = step
  return results

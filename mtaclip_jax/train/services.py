"""What the train loop needs around the step: data, class tokens, metrics, progress
and periodic evaluation. Kept out of loop.py so the loop stays short."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

import jax
import tqdm

from mtaclip_jax import errors
from mtaclip_jax.data import classes as data_classes
from mtaclip_jax.data import generate
from mtaclip_jax.data import pipeline
from mtaclip_jax.evaluation import evaluate as evaluate_lib
from mtaclip_jax.evaluation import report
from mtaclip_jax.runtime import sharding
from mtaclip_jax.train import metric_writer

log = logging.getLogger(__name__)


class Runtime:
  """Per-run services: data, logs, progress, evaluation."""

  def __init__(self, config, workdir, mesh):
    self.config, self.workdir, self.mesh = config, workdir, mesh
    self.is_main = jax.process_index() == 0
    self.evaluated = False  # whether this run wrote evaluation results
    generate.ensure_dataset(config.data)

  def class_tokens(self):
    return data_classes.class_tokens(self.config.data, self.config.model.class_length)

  def train_iterator(self):
    """This process's rows of the global batches (`pipeline.TrainBatches`), from step
    0 until `resume_data` moves it to a restored step."""
    d = self.config.data
    return pipeline.TrainBatches(d, d.seed, sharding.process_rows(self.mesh, d.batch_size))

  def data_position(self, step, data_iter) -> dict:
    """What a checkpoint records of the data order at `step` (checkpoint.py)."""
    d = self.config.data
    return {
        "order": "global",
        "step": int(step),
        "seed": int(d.seed),
        "batch_size": int(d.batch_size),
        "num_samples": int(data_iter.num_samples),
    }

  def resume_data(self, ckpt, step, data_iter) -> None:
    """Moves `data_iter` to restored step `step`: the global order's position follows
    from the step, whatever topology saved it. A checkpoint of an earlier version
    saved per-process iterators: with one process its order was the global order
    (resumed exactly); with several it cannot be continued, unless
    `train.restart_data_order` says to go on with the global order from `step`."""
    saved = ckpt.data_position(step) or {}
    if saved.get("order") == "per-process" and saved["processes"] > 1:
      if not self.config.train.get("restart_data_order", False):
        raise errors.CheckpointError(
            f"checkpoint step {step} in {ckpt.directory} was written by an earlier "
            f"version by {saved['processes']} processes, each with its own data order "
            "(data/process_I-of-N.json): that order cannot be continued, on any number "
            "of processes. Its model and optimizer state are intact: to resume them "
            f"with this version's global data order from step {step} (the batches a "
            "run of this config reads from that step), run the same command with "
            "--config.train.restart_data_order=True"
        )
      log.warning("step %d: the data order restarts as the global order", step)
    d = self.config.data
    now = {"seed": d.seed, "batch_size": d.batch_size, "num_samples": data_iter.num_samples}
    changed = [f"{k} {saved[k]} -> {v}" for k, v in now.items() if k in saved and saved[k] != v]
    if changed:
      log.warning(
          "checkpoint step %d was saved with another data order (%s): from here on "
          "the batches differ from those the saved run would have read",
          step,
          ", ".join(changed),
      )
    data_iter.start_at(step)

  def metric_writer(self):
    return metric_writer.MetricWriter(self.workdir, enabled=self.is_main)

  def progress(self, start, total):
    return tqdm.tqdm(
        total=total,
        initial=start,
        desc="train",
        unit="step",
        disable=not self.is_main,
        dynamic_ncols=True,
        file=sys.stderr,
    )

  def log_metrics(self, writer, step, metrics, bar):
    writer.write(step, {f"train/{k}": v for k, v in metrics.items()})
    bar.set_postfix(
        loss=f"{metrics.get('loss', float('nan')):.3f}", lr=f"{metrics.get('lr', 0):.2e}"
    )

  def evaluate(self, model, state, class_tokens, step, writer) -> dict:
    dataset = pipeline.make_eval_dataset(self.config.data, self.config.eval.split)
    results = evaluate_lib.evaluate_model(
        model,
        state.variables(),
        class_tokens,
        dataset,
        self.config,
        class_names=data_classes.class_names(self.config.data),
        workdir=self.workdir if self.is_main else None,
        step=step,
        progress=self.is_main,
    )
    which = (results["mode"], results["head"])
    subset = (results["split"], results["max_images"])
    writer.write(
        step, {report.tag(*which, k, *subset): results[k] for k in ("mIoU", "mAcc", "aAcc")}
    )
    self.evaluated = True
    log.info(
        "%s: mIoU %.2f mAcc %.2f aAcc %.2f",
        report.title(dict(results, step=step)),
        results["mIoU"],
        results["mAcc"],
        results["aAcc"],
    )
    return {f"eval_{k}": results[k] for k in ("mIoU", "mAcc", "aAcc")}

  def has_eval_results(self, step) -> bool:
    e = self.config.eval
    path = report.results_path(
        self.workdir,
        step,
        e.mode,
        e.get("head", "class"),
        e.get("split", report.DEFAULT_SPLIT),
        int(e.get("max_images", 0) or 0),
    )
    return os.path.exists(path)

  def print_summary(self, seconds):
    if not self.is_main:
      return
    w = os.path.abspath(self.workdir)
    if importlib.util.find_spec("tensorboard") is not None:
      board = f"tensorboard --logdir {w}"
    else:  # tensorboardX writes the event files; the viewer is an optional extra
      where = f"{w}/tb and {w}/eval" if self.evaluated else f"{w}/tb"
      board = (
          f"event files in {where} (to view them: "
          f"pip install -e '.[tensorboard]', then tensorboard --logdir {w})"
      )
    lines = [
        f"\ntraining finished in {seconds / 60:.1f} min",
        f"  checkpoints: {w}/checkpoints",
        f"  TensorBoard: {board}",
        f"  metrics:     {w}/metrics.jsonl",
    ]
    if self.evaluated:
      lines.append(f"  evaluation:  {w}/eval/")
    print("\n".join(lines), flush=True)

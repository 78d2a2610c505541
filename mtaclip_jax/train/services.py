"""What the train loop needs around the step: data, class tokens, metrics, progress
and periodic evaluation. Kept out of loop.py so the loop stays short."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

import jax
import tqdm

from mtaclip_jax.data import classes as data_classes
from mtaclip_jax.data import generate
from mtaclip_jax.data import pipeline
from mtaclip_jax.evaluation import evaluate as evaluate_lib
from mtaclip_jax.evaluation import report
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
    return pipeline.make_train_iterator(self.config.data, self.config.data.seed)

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
    mode, head = results["mode"], results["head"]
    writer.write(step, {report.tag(mode, head, k): results[k] for k in ("mIoU", "mAcc", "aAcc")})
    self.evaluated = True
    log.info(
        "step %d, %s, %s head: mIoU %.2f mAcc %.2f aAcc %.2f",
        step,
        mode,
        head,
        results["mIoU"],
        results["mAcc"],
        results["aAcc"],
    )
    return {f"eval_{k}": results[k] for k in ("mIoU", "mAcc", "aAcc")}

  def has_eval_results(self, step) -> bool:
    e = self.config.eval
    return os.path.exists(report.results_path(self.workdir, step, e.mode, e.get("head", "class")))

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

"""Training-pipeline throughput (images/s on one core) and time per transform.

    python benchmarks/data_pipeline.py --dataset ade20k      # 512x683 images, 512 recipe
    python benchmarks/data_pipeline.py --dataset cityscapes  # 1024x2048, 1024 recipe

Generates a few images of the real size in a temporary folder (or uses --root),
then runs decode + the recipe's transforms + targets in one thread, sample by
sample, and reports the mean CPU time of each stage (process CPU time with
cv2 limited to one thread, so the numbers hold on a busy machine).
"""

import argparse
import collections
import os
import tempfile
import time

import cv2
import numpy as np

from mtaclip_jax.config import recipes
from mtaclip_jax.data import generate
from mtaclip_jax.data import pipeline
from mtaclip_jax.data import transforms
from mtaclip_jax.runtime import xla_cpu

SIZES = {"ade20k": (512, 683), "cityscapes": (1024, 2048)}


def run(dataset, root, samples, max_segments):
  cfg = recipes.data_config(dataset, root, max_segments=max_segments)
  source = pipeline.make_source(cfg, "train")
  ops = transforms.parse(list(cfg.transforms))
  times = collections.defaultdict(float)
  rng = np.random.default_rng(0)
  start = time.process_time()
  for i in range(samples):
    t0 = time.process_time()
    ex = source[i % len(source)]
    t1 = time.process_time()
    times["decode"] += t1 - t0
    for name, kwargs in ops:
      ex = transforms.REGISTRY[name](ex, rng, **kwargs)
      t2 = time.process_time()
      times[name] += t2 - t1
      t1 = t2
    transforms.make_targets(ex, max_segments)
    times["make_targets"] += time.process_time() - t1
  total = time.process_time() - start
  return samples / total, {k: 1e3 * v / samples for k, v in times.items()}


def main():
  cv2.setNumThreads(1)  # per-core numbers
  p = argparse.ArgumentParser()
  p.add_argument("--dataset", choices=sorted(SIZES), default="ade20k")
  p.add_argument("--root", default="", help="existing dataset (default: generate)")
  p.add_argument("--images", type=int, default=8, help="images to generate")
  p.add_argument("--samples", type=int, default=40, help="samples to time")
  p.add_argument("--max-segments", type=int, default=32)
  a = p.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    root = a.root
    if not root:
      root = os.path.join(tmp, a.dataset)
      generate.write_dataset(a.dataset, root, {"train": a.images}, 0, SIZES[a.dataset], 19)
    run(a.dataset, root, 2, a.max_segments)  # warm-up
    rate, per_stage = run(a.dataset, root, a.samples, a.max_segments)
  print(
      f"{a.dataset} {SIZES[a.dataset][0]}x{SIZES[a.dataset][1]}: {rate:.1f} images/s "
      f"on one core ({1e3 / rate:.1f} ms per image)"
  )
  for name, ms in per_stage.items():
    print(f"  {name:24s} {ms:7.2f} ms")


if __name__ == "__main__":
  xla_cpu.apply()  # before jax starts its CPU backend, as the entry points do
  main()

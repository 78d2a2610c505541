"""Train-step benchmark: this project vs transformers' PyTorch Mask2Former, one run.

  python -m benchmarks.train_step [--size 512 --batch 2 --steps 5 --threads 2]
         [--which baseline,full,hf] [--inference]

(a) `baseline`: this project's train step in Mask2Former mode (CLIP RN50, ADE20k
    shapes: 150 classes, 100 queries, 12544 points, 9 decoder layers);
(b) `full`: the MTA-CLIP step (K=3 prompts, similarity loss);
(c) `hf`: transformers' Mask2FormerForUniversalSegmentation (ResNet-50 backbone,
    random init) forward + loss + backward + AdamW step at the same size, batch,
    classes and points.
All sides get the same images and ground truth (8 segments per image), warm-up is
excluded, and the median and spread of `--steps` steps are printed, with FLOPs from
XLA's cost analysis, achieved GFLOP/s and the share of the measured matmul peak.
Threads: JAX's CPU client uses every core; torch is set to `--threads`, default the
number of cores, so both sides use the same threads.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--segments", type=int, default=8)
  p.add_argument("--max-segments", type=int, default=0,
                 help="padded ground-truth slots T (default: the ADE20k recipe's)")
  p.add_argument("--which", default="baseline,full,hf")
  p.add_argument("--inference", action="store_true",
                 help="time a forward pass at batch 1 instead of a train step")
  p.add_argument("--bf16", action="store_true")
  return p.parse_args(argv)


import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def fake_batch(batch, size, segments, slots, num_classes=150, seed=0):
  """Images and `segments` rectangular class regions per image (CONTRACT batch)."""
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  label = np.full((batch, size, size), 255, np.int32)
  for b in range(batch):
    classes = rng.choice(num_classes, segments, replace=False)
    for i, c in enumerate(classes):
      y0, x0 = rng.integers(0, size // 2, 2)
      h, w = rng.integers(size // 8, size // 2, 2)
      label[b, y0:y0 + h, x0:x0 + w] = c
    label[b, : size // 16] = classes[0]
  masks = np.zeros((batch, slots, size, size), np.uint8)
  cls = np.zeros((batch, slots), np.int32)
  valid = np.zeros((batch, slots), bool)
  for b in range(batch):
    present = [c for c in np.unique(label[b]) if c != 255][:segments]
    for i, c in enumerate(present):
      masks[b, i] = label[b] == c
      cls[b, i] = c
      valid[b, i] = True
  return dict(image=image, label=label, masks=masks, classes=cls, valid=valid)


def timed(fn, steps, warmup):
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return np.array(times)


def matmul_peak(threads):
  n = 4096
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  t = timed(lambda: f(a).block_until_ready(), 3, 1)
  return 2 * n ** 3 / np.median(t) / 1e9


def ours(variant, args, batch):
  from mtaclip_jax import config_lib, optim, runtime, sharding, train_state
  from mtaclip_jax.models import mtaclip
  arg = "baseline" if variant == "baseline" else ""
  if args.bf16:
    arg = ",".join(a for a in (arg, "bf16") if a)
  config = config_lib.paper_config("ade20k", "RN50", arg)
  config.data.crop_size = (args.size, args.size)
  config.data.batch_size = args.batch
  config.data.max_segments = args.max_segments
  mesh = sharding.make_mesh(config.mesh)
  model = mtaclip.build_model(config.model)
  tokens = runtime.class_tokens(config)
  tx = optim.make_optimizer(config.optim)
  with jax.set_mesh(mesh):
    state, shard = train_state.init_state_sharded(model, tx, config, tokens,
                                                  jax.random.key(0), mesh)
    if args.inference:
      images = jnp.asarray(batch["image"][:1])
      fwd = jax.jit(lambda v, x: model.apply(v, x, tokens, train=False))
      compiled = fwd.lower(state.variables(), images).compile()
      run = lambda: jax.block_until_ready(compiled(state.variables(), images))
    else:
      step = train_state.jit_train_step(model, tx, config, shard, mesh)
      gb = sharding.global_batch(batch, mesh)
      compiled = step.lower(state, gb, tokens).compile()
      holder = {"state": state}

      def run():
        holder["state"], m = compiled(holder["state"], gb, tokens)
        jax.block_until_ready(m["loss"])
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    mem = compiled.memory_analysis()
    times = timed(run, args.steps, args.warmup)
  return times, float(cost.get("flops", 0.0)), mem


def hf(args, batch):
  import torch
  from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation
  from transformers import ResNetConfig
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  cfg = Mask2FormerConfig(
      backbone_config=ResNetConfig(out_features=["stage1", "stage2", "stage3", "stage4"]),
      num_labels=150, train_num_points=12544)
  model = Mask2FormerForUniversalSegmentation(cfg)
  pixels = torch.tensor(batch["image"]).permute(0, 3, 1, 2).contiguous()
  mask_labels = [torch.tensor(batch["masks"][b][batch["valid"][b]]).float()
                 for b in range(len(pixels))]
  class_labels = [torch.tensor(batch["classes"][b][batch["valid"][b]]).long()
                  for b in range(len(pixels))]
  if args.inference:
    model.eval()
    x = pixels[:1]

    def run():
      with torch.no_grad():
        model(pixel_values=x)
  else:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.02)

    def run():
      opt.zero_grad(set_to_none=True)
      with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
        out = model(pixel_values=pixels, mask_labels=mask_labels,
                    class_labels=class_labels)
      out.loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
      opt.step()
  return timed(run, args.steps, args.warmup)


def main(args):
  what = "inference (batch 1)" if args.inference else f"train step (batch {args.batch})"
  print(f"{what} at {args.size}x{args.size}, {args.threads} threads, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}; LD_PRELOAD="
        f"{os.environ.get('LD_PRELOAD', '') or '(none)'}", flush=True)
  if not args.max_segments:
    from mtaclip_jax import config_lib  # pylint: disable=g-import-not-at-top
    args.max_segments = config_lib.RECIPES["ade20k"]["max_segments"]
  print(f"ground truth: {args.segments} segments per image, padded to "
        f"T={args.max_segments} slots", flush=True)
  batch = fake_batch(args.batch, args.size, args.segments, args.max_segments)
  peak = matmul_peak(args.threads)
  print(f"measured fp32 matmul peak: {peak:.0f} GFLOP/s", flush=True)
  rows = {}
  for which in args.which.split(","):
    if which in ("baseline", "full"):
      times, flops, mem = ours(which, args, batch)
      rows[which] = times
      med = np.median(times)
      mem_txt = (f", temp {mem.temp_size_in_bytes / 2**30:.2f} GiB" if mem else "")
      print(f"({'a' if which == 'baseline' else 'b'}) ours {which}: median {med:.3f} s "
            f"(min {times.min():.3f}, max {times.max():.3f}); {flops / 1e9:.0f} GFLOP, "
            f"{flops / med / 1e9:.0f} GFLOP/s = {100 * flops / med / 1e9 / peak:.0f}% "
            f"of peak{mem_txt}", flush=True)
    elif which == "hf":
      times = hf(args, batch)
      rows[which] = times
      print(f"(c) transformers Mask2Former: median {np.median(times):.3f} s (min "
            f"{times.min():.3f}, max {times.max():.3f})", flush=True)
    else:
      raise SystemExit(f"--which: unknown {which!r}; expected baseline, full, hf")
  if "baseline" in rows:
    a = np.median(rows["baseline"])
    if "full" in rows:
      print(f"(b)/(a) = {np.median(rows['full']) / a:.2f}")
    if "hf" in rows:
      print(f"(c)/(a) = {np.median(rows['hf']) / a:.2f}  (>1: this project is faster)")


if __name__ == "__main__":
  sys.exit(main(_args()))

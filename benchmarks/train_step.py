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
excluded, and the median and spread of `--steps` steps are printed, with the matmul +
convolution FLOPs counted from the jaxpr (benchmarks/flops.py; XLA's cost analysis
beside it where the backend gives one), achieved GFLOP/s and the share of the
measured matmul peak.
Threads: JAX's CPU client uses every core; torch is set to `--threads`, default the
number of cores, so both sides use the same threads.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
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
  p.add_argument(
      "--max-segments",
      type=int,
      default=0,
      help="padded ground-truth slots T (default: the ADE20k recipe's)",
  )
  p.add_argument("--which", default="baseline,full,hf")
  p.add_argument(
      "--inference",
      action="store_true",
      help="time a forward pass at batch 1 instead of a train step",
  )
  p.add_argument("--bf16", action="store_true")
  p.add_argument(
      "--micro-batches",
      type=int,
      default=1,
      help="ours: gradient accumulation over N micro-batches of the batch",
  )
  p.add_argument(
      "--max-batch",
      type=int,
      default=0,
      help="also find the largest batch of the full step that fits, up to N",
  )
  p.add_argument(
      "--estimate-only",
      action="store_true",
      help="--max-batch: print the estimate from compiled memory, skip the run",
  )
  p.add_argument(
      "--text",
      action="store_true",
      help="also time the prompted text tower alone (forward + backward)",
  )
  p.add_argument(
      "--lock",
      default="",
      help="file locked around every timed section, so that processes that "
      "compile side by side take turns on the device (gpu.sh)",
  )
  p.add_argument(
      "--set",
      action="append",
      default=[],
      metavar="KEY=VALUE",
      help="ours: override a config entry, e.g. model.attention_impl=cudnn "
      "(repeatable; the value takes the type of the entry it replaces)",
  )
  return p.parse_args(argv)


def apply_overrides(config, pairs) -> None:
  """`--set a.b=v` entries into the config; unknown keys name themselves."""
  for pair in pairs:
    key, sep, text = pair.partition("=")
    *path, leaf = key.split(".")
    node = config
    for part in path:
      node = node[part] if part in node else None
      if node is None:
        raise SystemExit(f"--set {pair}: config has no {key!r}")
    if not sep or leaf not in node:
      raise SystemExit(f"--set {pair}: config has no {key!r} (expected KEY=VALUE)")
    old = node[leaf]
    if isinstance(old, bool):
      value = text.lower() in ("1", "true", "yes")
    elif isinstance(old, (int, float)):
      value = type(old)(text)
    else:
      value = text
    node[leaf] = value


import copy

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import flops  # noqa: E402
from mtaclip_jax.config import recipes
from mtaclip_jax.data import classes as data_classes
from mtaclip_jax.evaluation import inference
from mtaclip_jax.models import clip
from mtaclip_jax.models import mtaclip
from mtaclip_jax.runtime import sharding
from mtaclip_jax.runtime import xla_cpu
from mtaclip_jax.train import compile_ahead
from mtaclip_jax.train import optim
from mtaclip_jax.train import train_state


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
      label[b, y0 : y0 + h, x0 : x0 + w] = c
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


CPU_SECONDS = []  # process CPU seconds per timed step of the last `timed` call
SETUP_SECONDS = []  # wall seconds of the last `ours` call's state init + compile
LOCK = [""]  # --lock: the file locked around each timed section
_HELD = [False]  # this process holds it


@contextlib.contextmanager
def exclusive():
  """Holds --lock (if any) so that only one process times on the device at once;
  nested uses in one process hold it once."""
  if not LOCK[0] or _HELD[0]:
    yield
    return
  with open(LOCK[0], "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    _HELD[0] = True
    try:
      yield
    finally:
      _HELD[0] = False
      fcntl.flock(f, fcntl.LOCK_UN)


def timed(fn, steps, warmup):
  """Wall seconds of each of `steps` calls after `warmup` calls; the process CPU
  seconds of the same calls go to CPU_SECONDS (all threads; on a shared machine a
  fairer comparison than wall time)."""
  with exclusive():
    for _ in range(warmup):
      fn()
    times = []
    CPU_SECONDS.clear()
    for _ in range(steps):
      t, c = time.perf_counter(), time.process_time()
      fn()
      times.append(time.perf_counter() - t)
      CPU_SECONDS.append(time.process_time() - c)
  return np.array(times)


def stamp(what, since):
  """Prints how long a set-up phase took (a run cut off by a time limit still says
  where its time went)."""
  print(f"  [{what}: {time.perf_counter() - since:.1f} s]", flush=True)


def matmul_peak(dtype=jnp.float32):
  """Measured dense matmul rate of the default device in GFLOP/s (8192^3 on GPUs)."""
  n = 4096 if jax.devices()[0].platform == "cpu" else 8192
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  t = timed(lambda: f(a).block_until_ready(), 3 if n == 4096 else 20, 1)
  return 2 * n**3 / np.median(t) / 1e9


def hlo_flops(lowered) -> float:
  """FLOPs of the program as traced, from XLA's cost analysis of the HLO before
  optimisation (elementwise work included; 0 where the backend gives none: XLA:GPU did
  on an H200, 2026-11-27). The compiled program's analysis leaves out the convolutions
  and matmuls that XLA:GPU hands to cuDNN / cuBLAS."""
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float((cost or {}).get("flops", 0.0))


def step_flops(traced) -> tuple[float, float]:
  """(matmul + convolution FLOPs counted from the jaxpr, XLA's count) of a traced
  program: the first is the same on every backend and is what "% of peak" uses."""
  return float(flops.jaxpr_flops(traced.jaxpr)), hlo_flops(traced.lower())


def flops_text(counts: tuple[float, float], seconds: float, peak: float) -> str:
  model, xla = counts
  xla_txt = f"XLA's count {xla / 1e9:.0f}" if xla else "XLA's count: none"
  return (
      f"{model / 1e9:.0f} GFLOP matmul+conv ({xla_txt}), "
      f"{model / seconds / 1e9:.0f} GFLOP/s = {100 * model / seconds / 1e9 / peak:.1f}%"
      f" of peak"
  )


def _setup(variant, args, batch_size):
  """The paper's ADE20k RN50 config at the benchmark's size -> (config, mesh, model,
  class tokens, optimizer)."""
  arg = "baseline" if variant == "baseline" else ""
  if args.bf16:
    arg = ",".join(a for a in (arg, "bf16") if a)
  config = recipes.paper_config("ade20k", "RN50", arg)
  config.data.crop_size = (args.size, args.size)
  config.data.batch_size = batch_size
  config.data.max_segments = args.max_segments
  config.train.micro_batches = getattr(args, "micro_batches", 1)
  apply_overrides(config, getattr(args, "set", []))
  config.optim.total_steps = config.train.steps  # the recipe's -1, as validate_config does
  return (
      config,
      sharding.make_mesh(config.mesh),
      mtaclip.build_model(config.model),
      data_classes.class_tokens(config.data, config.model.class_length),
      optim.make_optimizer(config.optim),
  )


def ours(variant, args, batch, keep=None):
  """`keep`: optional dict that receives the compiled executable as keep['compiled']."""
  config, mesh, model, tokens, tx = _setup(variant, args, args.batch)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    state, shard = train_state.init_state_sharded(
        model, tx, config, tokens, jax.random.key(0), mesh
    )
    jax.block_until_ready(state)
    stamp(f"{variant}: state initialised", start)
    if args.inference:  # as evaluate/predict: the prompts are encoded once, not timed
      images = jnp.asarray(batch["image"][:1])
      t0 = inference.text_embeddings(model, state.variables(), tokens)
      fwd = jax.jit(lambda v, x, t: inference.apply_model(model, v, x, tokens, t))
      traced = fwd.trace(state.variables(), images, t0)
      lowered = traced.lower()
      stamp(f"{variant}: inference traced", start)
      compiled = lowered.compile()
      run = lambda: jax.block_until_ready(compiled(state.variables(), images, t0))
    else:
      step = train_state.jit_train_step(model, tx, config, shard, mesh)
      gb = sharding.global_batch(batch, mesh)
      traced = step.trace(state, gb, tokens)
      lowered = traced.lower()
      stamp(f"{variant}: step traced", start)
      compiled = lowered.compile()
      holder = {"state": state}

      def run():
        holder["state"], m = compiled(holder["state"], gb, tokens)
        jax.block_until_ready(m["loss"])

    SETUP_SECONDS[:] = [time.perf_counter() - start]
    stamp(f"{variant}: compiled", start)
    if keep is not None:
      keep["compiled"] = compiled
    cost = step_flops(traced)
    mem = compiled.memory_analysis()
    times = timed(run, args.steps, args.warmup)
  return times, cost, mem


def compiled_bytes(mem) -> int:
  """Device bytes a compiled step needs (arguments + outputs + temporaries - aliased)."""
  return int(
      mem.argument_size_in_bytes
      + mem.output_size_in_bytes
      + mem.temp_size_in_bytes
      - mem.alias_size_in_bytes
  )


def step_bytes(args, batch_size: int) -> int:
  """Device bytes of the full step compiled at `batch_size` from abstract inputs (no
  state or batch is allocated)."""
  config, mesh, model, tokens, tx = _setup("full", args, batch_size)
  with jax.set_mesh(mesh):
    abstract = train_state.abstract_state(model, tx, config, tokens, jax.random.key(0))
    shard = train_state.state_shardings(abstract, config, mesh)
    step = train_state.jit_train_step(model, tx, config, shard, mesh)
    lowered = step.lower(abstract, compile_ahead.batch_spec(config), tokens)
    return compiled_bytes(lowered.compile().memory_analysis())


def max_batch(args, limit: int) -> int:
  """Largest batch (multiple of 8, <= limit) of the full step that fits the device:
  the compiled memory at batches 16 and 32 (compile only) extrapolated linearly, then
  the prediction compiled and run (and 8 less if that fails), each probe printed."""
  stats = jax.devices()[0].memory_stats() or {}
  capacity = stats.get("bytes_limit", 0)
  note = functools.partial(print, flush=True)
  if not capacity:
    note("the device reports no memory limit")
    return 0
  need = {}
  for b in (16, 32):
    start = time.perf_counter()
    need[b] = step_bytes(args, b)
    note(
        f"batch {b}: compiled step needs {need[b] / 2**30:.1f} GiB of "
        f"{capacity / 2**30:.1f} (compiled in {time.perf_counter() - start:.0f} s)"
    )
  per_image = max((need[32] - need[16]) / 16, 1)
  best = min(limit, 32 + int((capacity - need[32]) / per_image)) // 8 * 8
  note(f"linear estimate: {per_image / 2**30:.3f} GiB per image -> batch {best}")
  if getattr(args, "estimate_only", False):
    return best
  while best >= 8:
    a = copy.copy(args)
    a.batch, a.steps, a.warmup = best, 2, 1
    try:
      times, _, _ = ours("full", a, fake_batch(best, args.size, args.segments, args.max_segments))
    except Exception as e:  # pylint: disable=broad-except
      note(f"batch {best}: failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
      best -= 8
      continue
    note(
        f"batch {best}: ran, {np.median(times):.3f} s/step, " f"{best / np.median(times):.1f} img/s"
    )
    return best
  return 0


def text_tower(args):
  """Forward + backward of the prompted CLIP text tower to the contexts (K x (C+1)
  sequences), the part of the full step that does not depend on the batch."""
  config = recipes.paper_config("ade20k", "RN50", "bf16" if args.bf16 else "")
  arch = clip.get_arch(config.model.text_encoder)
  dtype = jnp.bfloat16 if args.bf16 else jnp.float32
  enc = clip.TextEncoder(arch, dtype=dtype)
  tokens = data_classes.class_tokens(config.data, config.model.class_length)
  ctx = jnp.zeros(
      (config.model.num_contexts, config.model.context_length, arch.text_width), jnp.float32
  )
  params = enc.init(jax.random.key(0), tokens, ctx, method="encode_prompts")

  def loss(c):
    t = enc.apply(params, tokens, c, method="encode_prompts")
    return jnp.sum(t.astype(jnp.float32) ** 2)

  traced = jax.jit(jax.grad(loss)).trace(ctx)
  compiled = traced.lower().compile()
  cost = step_flops(traced)
  times = timed(lambda: jax.block_until_ready(compiled(ctx)), args.steps, args.warmup)
  return times, cost


def hf(args, batch):
  import torch
  from transformers import Mask2FormerConfig
  from transformers import Mask2FormerForUniversalSegmentation
  from transformers import ResNetConfig

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  cfg = Mask2FormerConfig(
      backbone_config=ResNetConfig(out_features=["stage1", "stage2", "stage3", "stage4"]),
      num_labels=150,
      train_num_points=12544,
  )
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
  model = Mask2FormerForUniversalSegmentation(cfg).to(dev)
  pixels = torch.tensor(batch["image"]).permute(0, 3, 1, 2).contiguous().to(dev)
  mask_labels = [
      torch.tensor(batch["masks"][b][batch["valid"][b]]).float().to(dev) for b in range(len(pixels))
  ]
  class_labels = [
      torch.tensor(batch["classes"][b][batch["valid"][b]]).long().to(dev)
      for b in range(len(pixels))
  ]
  if args.inference:
    model.eval()
    x = pixels[:1]

    def run():
      with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=args.bf16):
        model(pixel_values=x)
      sync()

  else:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.02)

    def run():
      opt.zero_grad(set_to_none=True)
      with torch.autocast(dev, dtype=torch.bfloat16, enabled=args.bf16):
        out = model(pixel_values=pixels, mask_labels=mask_labels, class_labels=class_labels)
      out.loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
      opt.step()
      sync()

  return timed(run, args.steps, args.warmup)


def main(args):
  LOCK[0] = args.lock
  # As the entry points do on CPU; it holds for the whole process, transformers included.
  malloc = xla_cpu.keep_freed_memory_on_cpu()
  what = "inference (batch 1)" if args.inference else f"train step (batch {args.batch})"
  if args.micro_batches > 1 and not args.inference:
    what += f", ours as {args.micro_batches} micro-batches"
  print(
      f"{what} at {args.size}x{args.size}, {args.threads} threads, "
      f"jax {jax.__version__} on {jax.devices()[0].platform}; LD_PRELOAD="
      f"{os.environ.get('LD_PRELOAD', '') or '(none)'}; XLA_FLAGS="
      f"{os.environ.get('XLA_FLAGS', '') or '(none)'}; glibc malloc "
      f"{'keeps freed memory' if malloc else 'as installed'}",
      flush=True,
  )
  if not args.max_segments:
    args.max_segments = recipes.RECIPES["ade20k"]["max_segments"]
  print(
      f"ground truth: {args.segments} segments per image, padded to "
      f"T={args.max_segments} slots",
      flush=True,
  )
  if args.set:
    print(f"config overrides (ours): {' '.join(args.set)}", flush=True)
  batch = fake_batch(args.batch, args.size, args.segments, args.max_segments)
  peak_dtype = jnp.bfloat16 if args.bf16 else jnp.float32
  peak = matmul_peak(peak_dtype)  # timed under --lock, like every timed section
  print(f"measured {jnp.dtype(peak_dtype).name} matmul peak: {peak:.0f} GFLOP/s", flush=True)
  rows = {}
  n_img = 1 if args.inference else args.batch
  if args.text:
    times, flops = text_tower(args)
    print(
        f"prompted text tower (K x (C+1) sequences, fwd + bwd to the contexts): "
        f"median {np.median(times):.3f} s, "
        f"{flops_text(flops, np.median(times), peak)}",
        flush=True,
    )
  for which in args.which.split(","):
    if not which:
      continue
    if which in ("baseline", "full"):
      times, flops, mem = ours(which, args, batch)
      rows[which] = times
      med = np.median(times)
      mem_txt = f", temp {mem.temp_size_in_bytes / 2**30:.2f} GiB" if mem else ""
      print(
          f"({'a' if which == 'baseline' else 'b'}) ours {which}: median {med:.3f} s "
          f"(min {times.min():.3f}, max {times.max():.3f}), {n_img / med:.1f} img/s; "
          f"{flops_text(flops, med, peak)}{mem_txt}; "
          f"{np.median(CPU_SECONDS):.1f} CPU-s/step; init + compile "
          f"{SETUP_SECONDS[0]:.0f} s",
          flush=True,
      )
    elif which == "hf":
      times = hf(args, batch)
      rows[which] = times
      print(
          f"(c) transformers Mask2Former: median {np.median(times):.3f} s (min "
          f"{times.min():.3f}, max {times.max():.3f}), "
          f"{n_img / np.median(times):.1f} img/s; {np.median(CPU_SECONDS):.1f} CPU-s/step",
          flush=True,
      )
    else:
      raise SystemExit(f"--which: unknown {which!r}; expected baseline, full, hf")
  if "baseline" in rows:
    a = np.median(rows["baseline"])
    if "full" in rows:
      print(f"(b)/(a) = {np.median(rows['full']) / a:.2f}")
    if "hf" in rows:
      print(f"(c)/(a) = {np.median(rows['hf']) / a:.2f}  (>1: this project is faster)")
  if "full" in rows and "hf" in rows:
    print(f"(c)/(b) = {np.median(rows['hf']) / np.median(rows['full']):.2f}")
  if args.max_batch:
    best = max_batch(args, args.max_batch)
    if args.estimate_only:
      print(
          f"largest batch of the full step by compiled memory (multiple of 8, <= "
          f"{args.max_batch}; not run): {best}"
      )
      return
    print(
        f"largest batch of the full step that fits and ran (multiple of 8, <= "
        f"{args.max_batch}): {best}"
    )


if __name__ == "__main__":
  xla_cpu.apply()  # before jax starts its CPU backend, as the entry points do
  sys.exit(main(_args()))

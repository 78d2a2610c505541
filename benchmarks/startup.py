"""Time to the first train step, with the step compiled after the state's
initialisation or beside it in a thread (`--overlap`: compile_ahead.AheadOfTimeStep,
as the train loop does).

  python -m benchmarks.startup [--size 256 --batch 2 --variant baseline] [--overlap]

Prints when the state is initialised, when the step is compiled and when the first
step has run (seconds from the start, tracing included), and the first step's loss
(the same either way).
"""

from __future__ import annotations

import argparse
import time

import jax

from benchmarks import train_step as bench
from mtaclip_jax.config import recipes
from mtaclip_jax.runtime import sharding
from mtaclip_jax.runtime import xla_cpu
from mtaclip_jax.train import compile_ahead
from mtaclip_jax.train import train_state


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--variant", default="baseline", choices=("baseline", "full"))
  p.add_argument("--bf16", action="store_true")
  p.add_argument(
      "--overlap",
      action="store_true",
      help="compile the step in a thread while the state initialises",
  )
  a = p.parse_args()
  args = bench._args(["--size", str(a.size)] + (["--bf16"] if a.bf16 else []))
  args.max_segments = recipes.RECIPES["ade20k"]["max_segments"]
  config, mesh, model, tokens, tx = bench._setup(a.variant, args, a.batch)
  spec = compile_ahead.batch_spec(config)
  rng = jax.random.key(0)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    traced = train_state.trace_init(model, tx, config, tokens, rng)  # as the train loop
    abstract = traced.abstract
    shard = train_state.state_shardings(abstract, config, mesh)
    step = train_state.jit_train_step(model, tx, config, shard, mesh)
    if a.overlap:  # as the train loop does
      step = compile_ahead.AheadOfTimeStep(step, abstract, shard, spec, tokens, mesh)
    state = traced.init(tokens, rng, shard)
    jax.block_until_ready(state)
    bench.stamp("state initialised", start)
    if a.overlap:
      step.wait()
    else:
      step = step.lower(abstract, spec, tokens).compile()
    bench.stamp("step compiled", start)
    batch = sharding.global_batch(
        bench.fake_batch(a.batch, a.size, args.segments, args.max_segments), mesh
    )
    state, metrics = step(state, batch, tokens)
    loss = float(metrics["loss"])
    bench.stamp("first step run", start)
  print(
      f"{'overlapped' if a.overlap else 'serial'}: first step after "
      f"{time.perf_counter() - start:.1f} s, loss {loss:.4f}"
  )


if __name__ == "__main__":
  xla_cpu.apply()  # before jax starts its CPU backend, as the entry points do
  main()

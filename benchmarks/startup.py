"""Time to the first train step, with the step compiled after the state's
initialisation (as the train loop does) or beside it in a thread.

  python -m benchmarks.startup [--size 256 --batch 2 --variant baseline] [--overlap]

Prints when the state is initialised, when the step is compiled and when the first
step has run (seconds from the start, tracing included), and the first step's loss
(the same either way).
"""

from __future__ import annotations

import argparse
import threading
import time

import mtaclip_jax  # noqa: F401  (its XLA:CPU setting must precede jax's client)
import jax

from benchmarks import train_step as bench


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--variant", default="baseline", choices=("baseline", "full"))
  p.add_argument("--bf16", action="store_true")
  p.add_argument("--overlap", action="store_true",
                 help="compile the step in a thread while the state initialises")
  a = p.parse_args()
  from mtaclip_jax import config_lib, sharding, train_state  # pylint: disable=g-import-not-at-top
  args = bench._args(["--size", str(a.size)] + (["--bf16"] if a.bf16 else []))
  args.max_segments = config_lib.RECIPES["ade20k"]["max_segments"]
  config, mesh, model, tokens, tx = bench._setup(a.variant, args, a.batch)
  one = bench.fake_batch(1, a.size, args.segments, args.max_segments)
  spec = {k: jax.ShapeDtypeStruct((a.batch,) + v.shape[1:], v.dtype)
          for k, v in one.items()}
  start = time.perf_counter()
  compiled = {}
  with jax.set_mesh(mesh):
    abstract = train_state.abstract_state(model, tx, config, tokens, jax.random.key(0))
    shard = train_state.state_shardings(abstract, config, mesh)
    step = train_state.jit_train_step(model, tx, config, shard, mesh)

    def compile_step():
      with jax.set_mesh(mesh):
        compiled["step"] = step.lower(abstract, spec, tokens).compile()

    thread = threading.Thread(target=compile_step) if a.overlap else None
    if thread:
      thread.start()
    state, _ = train_state.init_state_sharded(model, tx, config, tokens,
                                              jax.random.key(0), mesh)
    jax.block_until_ready(state)
    bench.stamp("state initialised", start)
    if thread:
      thread.join()
    else:
      compile_step()
    bench.stamp("step compiled", start)
    batch = sharding.global_batch(bench.fake_batch(a.batch, a.size, args.segments,
                                                   args.max_segments), mesh)
    state, metrics = compiled["step"](state, batch, tokens)
    loss = float(metrics["loss"])
    bench.stamp("first step run", start)
  print(f"{'overlapped' if a.overlap else 'serial'}: first step after "
        f"{time.perf_counter() - start:.1f} s, loss {loss:.4f}")


if __name__ == "__main__":
  main()

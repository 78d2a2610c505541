"""Entry point: `python -m mtaclip_jax.main --config configs/X.py[:arg] --workdir DIR`.

Thin: flags, distributed init, dispatch to train or evaluate; the work is in the
train and evaluation packages.
"""

from __future__ import annotations

import logging

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from mtaclip_jax.cli import runner
from mtaclip_jax.evaluation import evaluate
from mtaclip_jax.runtime import distributed
from mtaclip_jax.runtime import xla_cpu
from mtaclip_jax.train import loop


def _define_flags():
  config_flags.DEFINE_config_file(
      "config",
      None,
      "Config file (configs/*.py), optionally with ':arg' variants.",
      lock_config=True,
  )
  flags.DEFINE_string("workdir", None, "Where checkpoints, logs and results go.")
  flags.DEFINE_enum("mode", "train", ["train", "eval"], "What to run.")
  flags.DEFINE_string(
      "coordinator_address", None, "host:port of process 0 for multi-process runs (else from env)."
  )
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
  flags.DEFINE_integer(
      "heartbeat_timeout",
      distributed.HEARTBEAT_TIMEOUT_S,
      "Multi-process runs: seconds after which a process that stopped answering (killed, "
      "crashed, cut off) is declared dead and the others stop.",
      lower_bound=1,
  )
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Our own messages at INFO; libraries (orbax is chatty) at WARNING.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("mtaclip_jax").setLevel(logging.INFO)
  logging.getLogger("convert_weights").setLevel(logging.INFO)
  distributed.initialize(
      flags.FLAGS.coordinator_address,
      flags.FLAGS.num_processes,
      flags.FLAGS.process_id,
      flags.FLAGS.heartbeat_timeout,
  )
  xla_cpu.keep_freed_memory_on_cpu()
  config = flags.FLAGS.config
  if flags.FLAGS.mode == "train":
    loop.run(config, flags.FLAGS.workdir)
  else:
    evaluate.run(config, flags.FLAGS.workdir)


def cli():
  _define_flags()
  runner.run_app(main)


if __name__ == "__main__":
  cli()

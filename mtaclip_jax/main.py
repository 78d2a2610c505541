"""Entry point: `python -m mtaclip_jax.main --config configs/X.py[:arg] --workdir DIR`.

Thin by design (STYLE 1): flags, distributed init, dispatch to train or evaluate.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from mtaclip_jax import config_cli, distributed

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py), optionally with ':arg' variants.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and results go.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "What to run.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for multi-process runs (else from env).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Our own messages at INFO; libraries (orbax is chatty) at WARNING.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("mtaclip_jax").setLevel(logging.INFO)
  logging.getLogger("convert_weights").setLevel(logging.INFO)
  distributed.initialize(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes,
                         flags.FLAGS.process_id)
  config = _CONFIG.value
  if _MODE.value == "train":
    from mtaclip_jax import train  # pylint: disable=g-import-not-at-top
    train.run(config, _WORKDIR.value)
  else:
    from mtaclip_jax import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.run(config, _WORKDIR.value)


def _user_errors() -> tuple[type[BaseException], ...]:
  """Exceptions that describe something the user can fix: one line, no traceback."""
  # pylint: disable=g-import-not-at-top
  from mtaclip_jax import checkpoint, runtime, sharding, train
  from mtaclip_jax.data import readers
  return (runtime.ConfigError, runtime.WorkdirError, sharding.MeshConfigError,
          checkpoint.CheckpointError, readers.BadSampleError, train.NonFiniteLossError,
          FileNotFoundError)


def cli():
  try:
    app.run(main, flags_parser=config_cli.parse_flags_or_exit)
  except KeyboardInterrupt:
    sys.exit(130)
  except Exception as e:  # pylint: disable=broad-except
    if isinstance(e, _user_errors()):
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)
    raise


if __name__ == "__main__":
  cli()

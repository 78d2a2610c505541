"""`python -m mtaclip_jax.predict`: flags and dispatch; the work is serve/predict.py."""

from __future__ import annotations

import sys

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from mtaclip_jax.cli import runner
from mtaclip_jax.runtime import xla_cpu
from mtaclip_jax.serve import predict


def main(argv):
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax is chatty at INFO
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  xla_cpu.keep_freed_memory_on_cpu()
  f = flags.FLAGS
  failures = predict.run(
      f.config if f.artifact is None else None,
      f.workdir,
      f.images,
      f.out,
      f.mode,
      f.classes,
      f.artifact,
      batch=f.batch,
      fail_fast=f["fail-fast"].value,
  )
  if failures:
    # Each failure already printed its one `error:` line as it happened.
    print(f"{len(failures)} image(s) failed (the error lines above)", file=sys.stderr)
    sys.exit(1)


def _define_flags():
  config_flags.DEFINE_config_file(
      "config",
      None,
      "Config file the model was trained with (configs/*.py[:arg]; default: the one "
      "saved in the checkpoint).",
      lock_config=True,
  )
  flags.DEFINE_string("workdir", None, "Workdir of the checkpoint (latest step).")
  flags.DEFINE_string("artifact", None, "An exported artifact instead of a checkpoint.")
  flags.DEFINE_list("images", None, "Image files, folders or glob patterns.")
  flags.DEFINE_string("out", None, "Output folder.")
  flags.DEFINE_enum(
      "mode",
      None,
      ["whole", "slide"],
      "Inference mode (default: "
      "config.eval.mode; with --artifact: whole = resize to the artifact's "
      "size, slide = windows of that size).",
  )
  flags.DEFINE_integer(
      "batch",
      8,
      "Images per forward pass (whole mode: images of the "
      "same resized shape; slide mode: windows of one image).",
  )
  flags.DEFINE_string("classes", None, "Open vocabulary: 'a,b,c' or a .txt file.")
  flags.DEFINE_bool(
      "fail-fast",
      False,
      "Stop at the first image that fails (default: report it as one error line and go on).",
  )
  flags.mark_flags_as_required(["images", "out"])


def cli():
  _define_flags()
  runner.run_app(main, runner.list_flag_words("--images"), also_user_errors=(ValueError, OSError))

"""`python -m mtaclip_jax.export`: flags and dispatch; the work is serve/export.py."""

from __future__ import annotations

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from mtaclip_jax.cli import runner
from mtaclip_jax.serve import export
from mtaclip_jax.serve import vocabulary


def main(argv):
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax is chatty at INFO
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  classes = vocabulary.parse_classes(f.classes) if f.classes else None
  meta = export.export_checkpoint(f.config, f.workdir, f.out, f.size, classes, f.platforms)
  print(
      f"wrote {f.out} and {f.out}.json (step {meta['step']}, head {meta['head']}, "
      f"{len(meta['class_names'])} classes, {f.size}x{f.size}, "
      f"platforms {meta['platforms']})"
  )


def cli():
  config_flags.DEFINE_config_file(
      "config",
      None,
      "Config the model was trained with (default: the one saved in the checkpoint).",
      lock_config=True,
  )
  flags.DEFINE_string("workdir", None, "Workdir of the checkpoint (latest step).")
  flags.DEFINE_string("out", None, "Artifact path (a .json sidecar is written next to it).")
  flags.DEFINE_integer("size", 512, "Square input size S of the artifact.")
  flags.DEFINE_string("classes", None, "Open vocabulary names ('a,b,c' or a .txt file).")
  flags.DEFINE_list(
      "platforms", None, "jax.export platforms, e.g. cpu,cuda (default: " "the current backend)."
  )
  flags.mark_flags_as_required(["workdir", "out"])
  runner.run_app(main, also_user_errors=(ValueError,))

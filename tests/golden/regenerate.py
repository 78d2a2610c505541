"""Writes the golden files under tests/golden/ that the regression tests compare with.

  python -m tests.golden.regenerate state_layout   # every config's train-state tree
  python -m tests.golden.regenerate checkpoint     # a small checkpoint of the tiny model
  python -m tests.golden.regenerate model_outputs  # the tiny model's outputs, losses, gradient norm

Run one only when a change is meant to move what it records, and say so in the commit:
these files are what users' checkpoints and converted weights are held to.
"""

import json
import os
import shutil
import sys
import tempfile

import jax

HERE = os.path.dirname(os.path.abspath(__file__))
STATE_LAYOUT = os.path.join(HERE, "state_layout.json")
CHECKPOINT = os.path.join(HERE, "checkpoint_tiny")
MODEL_OUTPUTS = os.path.join(HERE, "model_outputs.json")

# Every config file with its default variant, and the ablation variants that change
# the state's tree (the others change values or losses only).
LAYOUT_CONFIGS = (
    "ade20k_r50",
    "ade20k_r101",
    "ade20k_vitb16",
    "ade20k_vits16",
    "ade20k_mitb4",
    "cityscapes_r50",
    "cityscapes_r101",
    "demo",
    "ade20k_r50:baseline",
    "ade20k_r50:text_only",
    "ade20k_r50:K=5",
    "ade20k_vits16:baseline",
    "ade20k_mitb4:baseline",
)


def state_layout(spec: str) -> dict[str, str]:
  """{tree path: "SHAPE DTYPE"} of the train state of configs/NAME.py[:ARG]."""
  # pylint: disable=g-import-not-at-top
  from tests import train_fixtures

  name, _, arg = spec.partition(":")
  config = train_fixtures.load_config(name, arg or None)
  abstract = train_fixtures.abstract_state(config)
  flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
  return {
      jax.tree_util.keystr(path): f"{'x'.join(map(str, leaf.shape))} {leaf.dtype}"
      for path, leaf in flat
  }


def write_state_layout() -> None:
  layouts = {spec: state_layout(spec) for spec in LAYOUT_CONFIGS}
  with open(STATE_LAYOUT, "w") as f:
    json.dump(layouts, f, indent=1, sort_keys=True)
    f.write("\n")
  print(f"wrote {STATE_LAYOUT}: {sum(len(v) for v in layouts.values())} leaves")


def write_checkpoint() -> None:
  """Trains the tiny test model one step on a generated dataset and saves it (state,
  data iterator and config) as a run does; the dataset is not kept."""
  # pylint: disable=g-import-not-at-top
  from tests import train_fixtures

  with tempfile.TemporaryDirectory() as tmp:
    train_fixtures.make_dataset(tmp)
    config = train_fixtures.tiny_config(os.path.join(tmp, "ADEChallengeData2016"), steps=1)
    workdir = os.path.join(tmp, "run")
    train_fixtures.train_run(config, workdir)
    shutil.rmtree(CHECKPOINT, ignore_errors=True)
    shutil.copytree(os.path.join(workdir, "checkpoints"), CHECKPOINT)
  print(f"wrote {CHECKPOINT}")


def write_model_outputs() -> None:
  """Summaries of the tiny model's forward outputs, loss terms and gradient norm on a
  fixed batch (tests/golden/model_outputs.py)."""
  # pylint: disable=g-import-not-at-top
  from tests.golden import model_outputs

  with open(MODEL_OUTPUTS, "w") as f:
    json.dump(model_outputs.compute(), f, indent=1, sort_keys=True)
    f.write("\n")
  print(f"wrote {MODEL_OUTPUTS}")


def main(argv):
  jobs = {
      "state_layout": write_state_layout,
      "checkpoint": write_checkpoint,
      "model_outputs": write_model_outputs,
  }
  for what in argv[1:] or list(jobs):
    jobs[what]()


if __name__ == "__main__":
  main(sys.argv)

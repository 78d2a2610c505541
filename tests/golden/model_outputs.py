"""Compact summaries of the full MTA-CLIP's numbers on a fixed input, for the golden
regression test (tests/integration/test_golden_model.py): the tiny test model
(`train_fixtures.tiny_config`, seed 0), a fixed synthetic batch of 2 images, the
forward pass (every output of `model.apply(..., train=False)`), each loss term, the
total loss and the gradient norm of one train step.

Each output is stored as its shape, mean, standard deviation, largest magnitude and
its first 8 values along the last entry of its first axis (for the outputs stacked
over the supervised layers: the last layer, first image, first query), not whole: the
file stays a few kB.
"""

import numpy as np

from mtaclip_jax.data import transforms
from tests import train_fixtures

SEED = 0
BATCH = 2
SLICE = 8
# fp32 tolerances: |now - golden| <= RTOL * scale, scale = the golden output's largest
# magnitude (outputs) or the golden value itself (loss terms, gradient norm).
# Measured between XLA:CPU at -O0 (the tests) and at the default -O3, which fuse and
# round differently: see the test's docstring.
RTOL = {"outputs": 1e-4, "metrics": 1e-4}


def fixed_batch(config) -> dict:
  """2 images: random pixels over rectangles of the 4 classes, some pixels ignored
  (255), as the train pipeline yields them (`transforms.make_targets`)."""
  h, w = config.data.crop_size
  rng = np.random.default_rng(SEED)
  examples = []
  for i in range(BATCH):
    label = np.full((h, w), i % 2, np.int32)
    label[h // 4 : h // 2, w // 8 : w // 2] = 2
    label[h // 2 :, w // 2 :] = 3 - i
    label[: h // 8, -w // 8 :] = 255
    shade = 0.5 * np.where(label == 255, 0, label)[..., None]
    image = (rng.normal(0, 1, (h, w, 3)) + shade).astype(np.float32)
    examples.append(
        transforms.make_targets(
            {"image": image, "label": label, "name": f"golden_{i}"}, config.data.max_segments
        )
    )
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def _summary(value) -> dict:
  a = np.asarray(value, np.float64)
  return {
      "shape": list(a.shape),
      "mean": float(a.mean()),
      "std": float(a.std()),
      "abs_max": float(np.abs(a).max()),
      "slice": [float(x) for x in np.ravel(a[-1])[:SLICE]],
  }


def compute(root="unused") -> dict:
  """{"outputs": {name: summary}, "metrics": {name: value}} of the tiny model."""
  # pylint: disable=g-import-not-at-top
  import jax

  from mtaclip_jax.runtime import sharding

  config = train_fixtures.tiny_config(root)
  mesh, model, state, step, tokens = train_fixtures.setup_training(config, seed=SEED)
  batch = fixed_batch(config)
  with jax.set_mesh(mesh):
    outputs = jax.jit(lambda v, x, t: model.apply(v, x, t, train=False))(
        state.variables(), batch["image"], tokens
    )
    outputs = {k: np.asarray(v) for k, v in jax.device_get(outputs).items()}
    _, metrics = step(state, sharding.global_batch(batch, mesh), tokens)
  metrics = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
  return {
      "config": "tests/train_fixtures.py tiny_config (defaults), seed 0, "
      "tests/golden/model_outputs.py fixed_batch",
      "rtol": RTOL,
      "outputs": {k: _summary(v) for k, v in sorted(outputs.items())},
      "metrics": {k: v for k, v in sorted(metrics.items()) if k not in ("finite", "lr")},
  }

"""What users hold stays readable: every config's train-state tree (parameter paths,
shapes, dtypes, optimizer state) equals the committed golden list, and a checkpoint
written by an earlier version of the code restores (state, data iterator, config).

Regenerate the goldens only for a change that is meant to move them:
`python -m tests.golden.regenerate state_layout` (or `checkpoint`)."""

import json
import shutil

import jax
import numpy as np
import pytest

from tests import train_fixtures
from tests.golden import regenerate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def golden():
  with open(regenerate.STATE_LAYOUT) as f:
    return json.load(f)


@pytest.mark.parametrize("spec", regenerate.LAYOUT_CONFIGS)
def test_state_layout_matches_golden(golden, spec):
  now = regenerate.state_layout(spec)
  want = golden[spec]
  missing = sorted(set(want) - set(now))
  extra = sorted(set(now) - set(want))
  changed = sorted(k for k in set(want) & set(now) if want[k] != now[k])
  assert not (missing or extra or changed), (
      f"{spec}: {len(missing)} leaves missing (e.g. {missing[:3]}), {len(extra)} new "
      f"(e.g. {extra[:3]}), {len(changed)} changed (e.g. "
      f"{[(k, want[k], now[k]) for k in changed[:3]]})"
  )


def test_checkpoint_of_an_earlier_version_restores(tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(regenerate.CHECKPOINT, workdir / "checkpoints")
  train_fixtures.make_dataset(tmp_path)
  config = train_fixtures.tiny_config(str(tmp_path / "ADEChallengeData2016"), steps=1)
  abstract = train_fixtures.abstract_state(config)
  step, state, saved_config, data_iter = train_fixtures.restore_checkpoint(
      config, str(workdir), abstract
  )
  assert step == 1
  assert int(state.step) == 1
  assert saved_config["model"]["hidden_dim"] == config.model.hidden_dim
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  want = jax.tree_util.tree_flatten_with_path(abstract)[0]
  assert [p for p, _ in leaves] == [p for p, _ in want]
  for (path, got), (_, like) in zip(leaves, want):
    assert got.shape == like.shape and got.dtype == like.dtype, path
    if jax.dtypes.issubdtype(got.dtype, np.floating):
      assert np.all(np.isfinite(np.asarray(got))), path
  # The restored data iterator yields the batch that follows the saved one.
  batch = next(data_iter)
  assert batch["image"].shape[0] == config.data.batch_size

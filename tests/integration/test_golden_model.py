"""Numeric regression of the full MTA-CLIP: the tiny test model (seed 0) on a fixed
batch gives the forward outputs, loss terms and gradient norm committed in
tests/golden/model_outputs.json (tests/golden/model_outputs.py says what is stored).

Tolerance, fp32: each output's statistics and slice within 1e-4 of that output's
largest magnitude, each loss term and the gradient norm within 1e-4 relative. XLA:CPU
at -O0 (the tests) and at -O3 differ by at most 4.5e-7 (outputs) and 1.5e-6 (the
gradient norm) on this model.

A change that is meant to move these numbers (a new initialisation, a different loss)
regenerates the file, and says so in its commit:
`python -m tests.golden.regenerate model_outputs`.
"""

import json

import numpy as np
import pytest

from tests.golden import model_outputs
from tests.golden import regenerate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def golden():
  with open(regenerate.MODEL_OUTPUTS) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def now():
  return model_outputs.compute()


def test_forward_outputs_match_golden(golden, now):
  rtol = model_outputs.RTOL["outputs"]
  assert sorted(now["outputs"]) == sorted(golden["outputs"])
  for name, want in golden["outputs"].items():
    got = now["outputs"][name]
    assert got["shape"] == want["shape"], name
    scale = want["abs_max"]
    for key in ("mean", "std", "abs_max"):
      assert abs(got[key] - want[key]) <= rtol * scale, (name, key, got[key], want[key])
    np.testing.assert_allclose(got["slice"], want["slice"], rtol=0, atol=rtol * scale, err_msg=name)


def test_loss_terms_and_gradient_norm_match_golden(golden, now):
  rtol = model_outputs.RTOL["metrics"]
  assert sorted(now["metrics"]) == sorted(golden["metrics"])
  for name, want in golden["metrics"].items():
    assert now["metrics"][name] == pytest.approx(want, rel=rtol), name
  # Every loss term takes part: none is zero.
  assert all(abs(v) > 1e-3 for v in golden["metrics"].values())

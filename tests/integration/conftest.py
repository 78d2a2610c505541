"""Fixtures of the integration tests."""

import pytest

from tests.integration import faults


@pytest.fixture(scope="module")
def data_root():
  return faults.data_root()


@pytest.fixture(scope="module")
def reference_dir():
  return faults.reference_dir()


@pytest.fixture(scope="module")
def reference(reference_dir):
  return faults.final_state(reference_dir, faults.STEPS)

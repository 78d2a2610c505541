"""The tiny test model as a config file, for tests that run `python -m mtaclip_jax.main`.

--config tests/configs/tiny.py:DATA_ROOT
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests import train_fixtures  # pylint: disable=g-import-not-at-top


def get_config(arg=None):
  if not arg:
    raise ValueError("tests/configs/tiny.py needs the data root: tiny.py:/path/to/data")
  return train_fixtures.tiny_config(arg)

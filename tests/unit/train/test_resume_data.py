"""Where a resumed run stands in the data: the step says it (global data order);
checkpoints of earlier versions, which held each process's iterator state, resume
when one process wrote them and otherwise stop with a message that says why and how
to go on (never "damaged")."""

import json
import logging
import os

import jax.numpy as jnp
import pytest

from mtaclip_jax import errors
from mtaclip_jax.runtime import checkpoint
from mtaclip_jax.runtime import sharding
from mtaclip_jax.train import services
from tests import train_fixtures


class _Batches:
  num_samples = 8

  def __init__(self):
    self.started_at = None

  def start_at(self, step):
    self.started_at = step


@pytest.fixture
def setup(tmp_path):
  config = train_fixtures.tiny_config(str(tmp_path / "no_data"), batch=4)
  rt = services.Runtime(config, str(tmp_path), sharding.make_mesh(config.mesh))
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, max_to_keep=3, async_save=False)
  yield config, rt, ckpt
  ckpt.close()


def _save(ckpt, step, config, data_position=None, old_processes=None):
  ckpt.save(step, {"w": jnp.zeros(3)}, data_position, config)
  ckpt.wait()
  if old_processes:  # the `data` item of earlier versions: grain's state per process
    folder = os.path.join(ckpt.directory, str(step), "data")
    os.makedirs(folder)
    for i in range(old_processes):
      with open(os.path.join(folder, f"process_{i}-of-{old_processes}.json"), "w") as f:
        json.dump({"next_index": step}, f)


def test_position_follows_from_the_step(setup):
  config, rt, ckpt = setup
  batches = _Batches()
  _save(ckpt, 3, config, rt.data_position(3, batches))
  assert ckpt.data_position(3) == {
      "order": "global",
      "step": 3,
      "seed": config.data.seed,
      "batch_size": 4,
      "num_samples": 8,
  }
  rt.resume_data(ckpt, 3, batches)
  assert batches.started_at == 3


def test_another_batch_size_is_warned(setup, caplog):
  config, rt, ckpt = setup
  batches = _Batches()
  _save(ckpt, 2, config, dict(rt.data_position(2, batches), batch_size=8))
  with caplog.at_level(logging.WARNING):
    rt.resume_data(ckpt, 2, batches)
  assert "batch_size 8 -> 4" in caplog.text and batches.started_at == 2


def test_one_process_checkpoint_of_an_earlier_version_resumes(setup):
  """Its per-process order was the global order (tests/unit/data/test_global_order.py)."""
  config, rt, ckpt = setup
  _save(ckpt, 5, config, old_processes=1)
  assert ckpt.data_position(5) == {"order": "per-process", "processes": 1}
  batches = _Batches()
  rt.resume_data(ckpt, 5, batches)
  assert batches.started_at == 5


def test_multi_process_checkpoint_of_an_earlier_version_says_how_to_go_on(setup):
  config, rt, ckpt = setup
  _save(ckpt, 5, config, old_processes=2)
  batches = _Batches()
  with pytest.raises(errors.CheckpointError) as e:
    rt.resume_data(ckpt, 5, batches)
  message = str(e.value)
  assert "by 2 processes, each with its own data order" in message
  assert "state are intact" in message and "damaged" not in message
  assert message.endswith("--config.train.restart_data_order=True")
  assert "\n" not in message and batches.started_at is None
  config.train.restart_data_order = True
  rt.resume_data(ckpt, 5, batches)
  assert batches.started_at == 5

"""The lines a training run ends with name only what it wrote, and the TensorBoard
viewer as an extra when it is not installed."""

import importlib.util

from mtaclip_jax.train import services
from tests import train_fixtures


def _summary(tmp_path, capsys, evaluated, installed, monkeypatch):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(
      importlib.util,
      "find_spec",
      lambda name, *a: (object() if installed else None)
      if name == "tensorboard"
      else find_spec(name, *a),
  )
  rt = services.Runtime(train_fixtures.tiny_config(str(tmp_path)), str(tmp_path / "run"), None)
  rt.evaluated = evaluated
  rt.print_summary(60.0)
  return capsys.readouterr().out


def test_without_evaluation_or_tensorboard(tmp_path, capsys, monkeypatch):
  out = _summary(tmp_path, capsys, evaluated=False, installed=False, monkeypatch=monkeypatch)
  assert "evaluation:" not in out
  assert "pip install -e '.[tensorboard]'" in out and "/run/tb (" in out


def test_with_evaluation_and_tensorboard(tmp_path, capsys, monkeypatch):
  out = _summary(tmp_path, capsys, evaluated=True, installed=True, monkeypatch=monkeypatch)
  assert f"evaluation:  {tmp_path}/run/eval/" in out
  assert f"TensorBoard: tensorboard --logdir {tmp_path}/run\n" in out

"""mtaclip_jax.xla_cpu: the XLA:CPU flag is added once, never over a user's choice."""

import importlib.metadata
import os

from mtaclip_jax import xla_cpu


def test_appends_flag_to_existing_flags(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  monkeypatch.delenv("MTACLIP_KEEP_XLA_CPU_FUSION", raising=False)
  monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.10.2")
  assert xla_cpu.apply()
  assert os.environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=8 "
                                     + xla_cpu.FLAG)
  assert not xla_cpu.apply()  # already there: unchanged
  assert os.environ["XLA_FLAGS"].count("ynn_fusion_type") == 1


def test_keeps_a_users_value_and_honours_opt_out(monkeypatch):
  monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.10.2")
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
  assert not xla_cpu.apply()
  assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("MTACLIP_KEEP_XLA_CPU_FUSION", "1")
  assert not xla_cpu.apply()
  assert os.environ["XLA_FLAGS"] == ""


def test_only_for_measured_jaxlib(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.delenv("MTACLIP_KEEP_XLA_CPU_FUSION", raising=False)
  monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.12.0")
  assert not xla_cpu.apply()
  assert os.environ["XLA_FLAGS"] == ""

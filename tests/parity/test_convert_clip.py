"""CLIP weight conversion: every checkpoint format through the CLI, orbax round trip,
and the errors a user can cause (unknown / missing / mis-shaped keys, truncated files,
TorchScript without the flag, pickles that would run code)."""

import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert_weights import CheckpointError
from convert_weights import convert_clip
from convert_weights import infer_arch
from convert_weights import load_converted
from convert_weights import merge_into
from convert_weights.__main__ import main as cli_main
from mtaclip_jax.models import clip
from tests import train_fixtures
from tests.clip_reference import reference_clip
from tests.clip_reference import rel_err
from tests.clip_reference import state_dict_numpy

ROOT = train_fixtures.ROOT


@pytest.fixture(scope="module")
def tiny():
  return reference_clip("tiny", seed=5)


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
  """The tiny reference saved in every supported format."""
  from safetensors.torch import save_file

  d = tmp_path_factory.mktemp("ckpts")
  sd = tiny.state_dict()
  paths = {
      "pt": d / "plain.pt",
      "pth": d / "plain.pth",
      "bin": d / "plain.bin",
      "safetensors": d / "tiny.safetensors",
      "open_clip": d / "open_clip.pt",
      "module_prefix": d / "prefixed.pt",
      "torchscript": d / "openai_jit.pt",
  }
  for k in ("pt", "pth", "bin"):
    torch.save(sd, paths[k])
  save_file({k: v.contiguous() for k, v in sd.items()}, str(paths["safetensors"]))
  torch.save({"epoch": 3, "name": "tiny", "state_dict": sd}, paths["open_clip"])
  torch.save({f"module.{k}": v for k, v in sd.items()}, paths["module_prefix"])
  traced = torch.jit.trace(
      tiny, (torch.randn(1, 3, 224, 224), torch.zeros(1, 77, dtype=torch.long)), check_trace=False
  )
  traced.save(str(paths["torchscript"]))
  return paths


def _assert_tiny_converted(tiny, towers):
  sd = state_dict_numpy(tiny)
  p = towers["image"]["params"]
  np.testing.assert_array_equal(
      p["conv1"]["kernel"], sd["visual.conv1.weight"].transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(
      p["attnpool"]["c_proj"]["kernel"], sd["visual.attnpool.c_proj.weight"].T
  )
  np.testing.assert_array_equal(
      towers["image"]["batch_stats"]["layer1"]["0"]["bn1"]["var"],
      sd["visual.layer1.0.bn1.running_var"],
  )
  t = towers["text"]["params"]
  np.testing.assert_array_equal(
      t["transformer"]["resblocks"]["1"]["attn"]["in_proj_weight"],
      sd["transformer.resblocks.1.attn.in_proj_weight"],
  )
  np.testing.assert_array_equal(t["token_embedding"]["embedding"], sd["token_embedding.weight"])
  assert set(towers["text"]) == {"params"}


@pytest.mark.parametrize("fmt", ["pt", "pth", "bin", "safetensors", "open_clip", "module_prefix"])
def test_formats_convert(tiny, files, fmt):
  towers = convert_clip(str(files[fmt]))
  _assert_tiny_converted(tiny, towers)


def test_torchscript_needs_flag(tiny, files):
  with pytest.raises(CheckpointError, match="allow-torchscript"):
    convert_clip(str(files["torchscript"]))
  _assert_tiny_converted(tiny, convert_clip(str(files["torchscript"]), allow_torchscript=True))


@pytest.mark.slow
def test_cli_writes_orbax_and_meta(tiny, files, tmp_path, capsys):
  out = tmp_path / "converted"
  assert cli_main(["--src", str(files["safetensors"]), "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  meta, towers = load_converted(str(out))
  assert meta["arch"] == "tiny"
  assert meta["sha256"] == hashlib.sha256(files["safetensors"].read_bytes()).hexdigest()
  n_image = sum(v.size for v in jax.tree.leaves(towers["image"]["params"]))
  assert meta["params"]["image"] == n_image and f"{n_image:,}" in printed
  assert f"{meta['params']['total']:,}" in printed
  _assert_tiny_converted(tiny, towers)
  # The restored variables run the tower and agree with the reference.
  images = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
  with torch.no_grad():
    ref = tiny.encode_image(torch.from_numpy(images)).numpy()
  out_jax = clip.ImageEncoder("tiny").apply(
      towers["image"], jnp.asarray(images.transpose(0, 2, 3, 1))
  )
  assert rel_err(out_jax["embedding"], ref) <= 1e-4
  # Refuses to overwrite.
  assert cli_main(["--src", str(files["safetensors"]), "--out", str(out)]) == 1
  assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_entry_point_torchscript(files, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [
      sys.executable,
      "-m",
      "convert_weights",
      "--src",
      str(files["torchscript"]),
      "--out",
      str(tmp_path / "a"),
  ]
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  assert r.returncode == 1 and "--allow-torchscript" in r.stderr
  r = subprocess.run(
      cmd + ["--allow-torchscript"], cwd=ROOT, env=env, capture_output=True, text=True
  )
  assert r.returncode == 0, r.stderr
  assert json.loads((tmp_path / "a" / "meta.json").read_text())["arch"] == "tiny"


def test_unknown_missing_misshaped_keys_listed(tiny):
  sd = state_dict_numpy(tiny)
  sd["visual.extra.weight"] = np.zeros(3, np.float32)
  sd["transformer.resblocks.0.attn.bogus"] = np.zeros(3, np.float32)
  del sd["visual.layer2.0.bn1.running_mean"]
  del sd["ln_final.bias"]
  sd["visual.attnpool.q_proj.bias"] = np.zeros(7, np.float32)
  with pytest.raises(CheckpointError) as e:
    convert_clip(sd, arch="tiny")
  msg = str(e.value)
  assert "2 unknown keys" in msg and "visual.extra.weight" in msg and "attn.bogus" in msg
  assert "2 missing parameters" in msg and "layer2/0/bn1/mean" in msg
  assert "text:params/ln_final/bias" in msg
  assert "1 mis-shaped keys" in msg and "visual.attnpool.q_proj.bias: (7,)" in msg


def test_many_missing_keys_are_summarised(tiny):
  sd = {k: v for k, v in state_dict_numpy(tiny).items() if not k.startswith("visual.layer")}
  with pytest.raises(CheckpointError, match=r"missing parameters: .*\(\+\d+ more\)"):
    convert_clip(sd, arch="tiny")


def test_arch_inference_and_mismatch(tiny):
  sd = state_dict_numpy(tiny)
  assert infer_arch(sd).name == "tiny"
  with pytest.raises(CheckpointError, match="does not match CLIP arch 'RN50'"):
    convert_clip(sd, arch="RN50")
  sd["text_projection"] = np.zeros((64, 33), np.float32)
  with pytest.raises(CheckpointError, match="no registered CLIP arch matches"):
    convert_clip(sd)


def test_truncated_files_named(files, tmp_path):
  for fmt in ("pt", "safetensors"):
    data = files[fmt].read_bytes()
    bad = tmp_path / f"truncated_{files[fmt].name}"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{bad.name}.*truncated or corrupt"):
      convert_clip(str(bad))


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.pt"):
    convert_clip(str(tmp_path / "nope.pt"))


class _Exploit:
  """Unpickling this creates the marker file (stands for arbitrary code)."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def test_malicious_pickle_not_executed(tmp_path, capsys):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pt"
  torch.save({"visual.conv1.weight": torch.zeros(1), "x": _Exploit(str(marker))}, path)
  with pytest.raises(CheckpointError, match="evil.pt.*arbitrary code"):
    convert_clip(str(path))
  assert cli_main(["--src", str(path), "--out", str(tmp_path / "o")]) == 1
  assert "arbitrary code" in capsys.readouterr().err
  assert not marker.exists()


def test_merge_into_checks_paths_and_shapes(tiny):
  towers = convert_clip(tiny.state_dict())
  init = jax.tree.map(jnp.zeros_like, towers["image"])  # stands for init variables
  merged = merge_into(init, towers["image"])
  np.testing.assert_array_equal(
      merged["params"]["conv1"]["kernel"], towers["image"]["params"]["conv1"]["kernel"]
  )
  assert init["params"]["conv1"]["kernel"] is not merged["params"]["conv1"]["kernel"]
  bad = {"params": {"conv1": {"kernel": np.zeros((1, 1, 1, 1), np.float32)}}}
  with pytest.raises(CheckpointError, match="conv1/kernel"):
    merge_into(init, bad)


def test_half_precision_checkpoint_becomes_float32(tiny, tmp_path):
  """OpenAI's released archives hold fp16 weights, some others bf16 (which
  safetensors.numpy cannot read); converted variables are fp32."""
  from safetensors.torch import save_file

  for dtype in (torch.float16, torch.bfloat16):
    half = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tiny.state_dict().items()}
    path = tmp_path / f"{dtype}.safetensors"
    save_file({k: v.contiguous() for k, v in half.items()}, str(path))
    for src in (half, str(path)):
      towers = convert_clip(src)
      assert all(x.dtype == np.float32 for x in jax.tree.leaves(towers))
      np.testing.assert_array_equal(
          towers["text"]["params"]["text_projection"], half["text_projection"].float().numpy()
      )

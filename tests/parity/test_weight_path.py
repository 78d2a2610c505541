"""The weight path of docs/REPRODUCE.md, end to end: a random-weight checkpoint in the
public format (OpenAI CLIP RN50 written by openai-clip's own model class; an ImageNet
ViT-S/16 by transformers' ViTModel), converted by the `python -m convert_weights` CLI's main,
loaded by a paper config through `--config.init.clip` / `--config.init.backbone`,
trained one step and evaluated (`train.loop.run`, what `python -m mtaclip_jax.main`
runs; its evaluation at the end is the one `--mode eval` makes).

The recipe is kept except where a 2-core CPU needs less: 64x64 crops, batch 1, one
step, 1 pixel-decoder and 3 decoder layers, the device matcher, the evaluation's test scale and window
(slide mode as the recipe, window 64 at stride 43, the recipe's 2/3 overlap) on one
image. Each test takes 85-130 s on the shared 2-core machine with an empty compilation
cache (about 140 s of CPU time; 2026-12). The towers the run loaded are
checked against the converted files tensor by tensor (exactly) and against the
PyTorch models they came from (fp32, relative 1e-4 on the image embedding and the
text features, as tests/parity/test_clip_parity.py).
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import convert_weights
from convert_weights.__main__ import main as convert_main
from mtaclip_jax.config import recipes
from mtaclip_jax.evaluation import report
from mtaclip_jax.models import backbones
from mtaclip_jax.models import clip
from mtaclip_jax.models.clip import tokenizer
from mtaclip_jax.train import loop
from mtaclip_jax.train import optim
from mtaclip_jax.train import pretrained
from tests import clip_reference
from tests import train_fixtures

pytestmark = [pytest.mark.parity, pytest.mark.slow]

TOL = 1e-4


def convert_cli(src, out):
  """`python -m convert_weights --src SRC --out OUT`, as docs/REPRODUCE.md runs it: its
  main in this process (a new interpreter would import torch and jax again, ~5 s; the
  entry point itself is run in tests/parity/test_convert_clip.py)."""
  assert convert_main(["--src", str(src), "--out", str(out)]) == 0
  return str(out)


def reduced(name, root, **init):
  """configs/NAME.py with the CPU reductions of the module docstring."""
  c = train_fixtures.load_config(name)
  crop = (64, 64)
  c.data.update(dict(root=str(root), crop_size=crop, batch_size=1, num_workers=0))
  c.data.transforms = recipes.train_transforms(crop, recipes.RECIPES["ade20k"]["test_scale"])
  c.train.update(dict(steps=1, checkpoint_every=1, log_every=1))
  c.optim.total_steps = 1
  c.eval.update(
      dict(test_scale=(96, 64), crop_size=crop, stride=(43, 43), max_images=1, at_end=True)
  )
  # The towers stay whole (their weights are what is checked); 1 pixel-decoder and 3
  # decoder layers (of 6 and 9) cut the CPU time of initialising, compiling and
  # running the first step from about 130 to 95 s.
  c.model.update(dict(enc_layers=1, dec_layers=3))
  # The device matcher: a train step without host callbacks, which the test session's
  # compilation cache keeps (the matchers agree: tests/parity/test_matching.py).
  c.loss.matcher = "device"
  c.init.update(init)
  return c


def run_and_capture(config, workdir, monkeypatch):
  """Trains and evaluates; returns (results, the state's variables right after the
  weights were loaded, as numpy)."""
  loaded = {}
  load = pretrained.load_pretrained

  def capture(state, config, model=None):
    state = load(state, config, model)
    loaded["params"] = optim.flatten(jax.device_get(state.params))
    loaded["batch_stats"] = optim.flatten(jax.device_get(state.batch_stats))
    return state

  monkeypatch.setattr(pretrained, "load_pretrained", capture)
  results = loop.run(config, str(workdir))
  return results, loaded


def assert_loaded(loaded, folder, prefix, tower):
  """Every tensor of `tower` in the converted folder is in the state, unchanged."""
  _, towers = convert_weights.load_converted(folder)
  n = 0
  for coll, tree in towers[tower].items():
    for path, value in optim.flatten(tree).items():
      np.testing.assert_array_equal(loaded[coll][f"{prefix}/{path}"], value, err_msg=path)
      n += 1
  assert n > 10
  return n


def assert_trained_and_evaluated(results, workdir):
  assert results["loss"] > 0 and np.isfinite(results["loss"])
  assert 0.0 <= results["eval_mIoU"] <= 100.0
  saved = report.results_path(str(workdir), 1, "slide", "class", max_images=1)
  with open(saved) as f:
    assert json.load(f)["num_images"] == 1


def rel_err(a, b):
  return clip_reference.rel_err(np.asarray(a), np.asarray(b))


def test_clip_rn50_file_to_a_trained_and_evaluated_paper_config(tmp_path, monkeypatch):
  t0 = time.time()
  model = clip_reference.reference_clip("RN50", seed=3)
  src = tmp_path / "RN50.pt"
  torch.save(model.state_dict(), src)
  folder = convert_cli(src, tmp_path / "clip_rn50")
  train_fixtures.make_dataset(tmp_path / "data", num_classes=150, train=2, val=1, size=(64, 96))
  config = reduced("ade20k_r50", tmp_path / "data" / "ADEChallengeData2016", clip=folder)
  results, loaded = run_and_capture(config, tmp_path / "run", monkeypatch)
  assert_trained_and_evaluated(results, tmp_path / "run")
  assert assert_loaded(loaded, folder, "backbone", "image") > 250
  assert assert_loaded(loaded, folder, "text_encoder", "text") > 100

  # The loaded towers compute what the PyTorch model computes.
  def sub(coll, prefix):
    return optim.unflatten(
        {k[len(prefix) + 1 :]: v for k, v in loaded[coll].items() if k.startswith(prefix + "/")}
    )

  images = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
  tokens = np.asarray(tokenizer.tokenize(["a wall", "a sky"], 77), np.int32)
  with torch.no_grad():
    emb_ref = model.encode_image(torch.from_numpy(images)).numpy()
    txt_ref = model.encode_text(torch.from_numpy(tokens).long()).numpy()
  image = jax.jit(clip.ImageEncoder("RN50").apply)(
      {"params": sub("params", "backbone"), "batch_stats": sub("batch_stats", "backbone")},
      jnp.asarray(images.transpose(0, 2, 3, 1)),
  )
  text = jax.jit(lambda p, t: clip.TextEncoder("RN50").apply(p, t, method="encode_text"))(
      {"params": sub("params", "text_encoder")}, jnp.asarray(tokens)
  )
  assert rel_err(image["embedding"], emb_ref) <= TOL
  assert rel_err(text, txt_ref) <= TOL
  print(f"RN50 weight path: {time.time() - t0:.1f} s")


def test_vit_s16_file_to_a_trained_and_evaluated_paper_config(tmp_path, monkeypatch):
  """ade20k_vits16: the ViT-S/16 image tower from a ViTModel file, the text tower from
  a CLIP ViT-B/16 file (as the released code pairs them)."""
  from safetensors.torch import save_file

  t0 = time.time()
  vit = clip_reference.reference_vit_s16(pooler=False)
  vit_src = tmp_path / "vit_small.safetensors"
  save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(vit_src))
  vits_folder = convert_cli(vit_src, tmp_path / "vits16")
  clip_src = tmp_path / "ViT-B-16.pt"
  torch.save(clip_reference.reference_clip("ViT-B/16", seed=4).state_dict(), clip_src)
  clip_folder = convert_cli(clip_src, tmp_path / "clip_vitb16")
  os.remove(clip_src)
  train_fixtures.make_dataset(tmp_path / "data", num_classes=150, train=2, val=1, size=(64, 96))
  config = reduced(
      "ade20k_vits16",
      tmp_path / "data" / "ADEChallengeData2016",
      backbone=vits_folder,
      clip=clip_folder,
  )
  results, loaded = run_and_capture(config, tmp_path / "run", monkeypatch)
  assert_trained_and_evaluated(results, tmp_path / "run")
  assert assert_loaded(loaded, vits_folder, "backbone", "image") > 150
  assert assert_loaded(loaded, clip_folder, "text_encoder", "text") > 100
  # The CLIP image tower in that file is not this model's backbone.
  assert not any(k.startswith("backbone/transformer/") for k in loaded["params"])
  # The adapters fpn1..fpn4 are in no checkpoint: each GroupNorm keeps its
  # initialisation, scale 1 and bias 0.
  for a in clip.vit.ADAPTERS:
    np.testing.assert_array_equal(loaded["params"][f"backbone/{a}/group_norm/scale"], 1.0)
    np.testing.assert_array_equal(loaded["params"][f"backbone/{a}/group_norm/bias"], 0.0)

  images = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
  with torch.no_grad():
    ref = vit(pixel_values=torch.from_numpy(images)).last_hidden_state[:, 0].numpy()
  module = backbones.get("ViT-S/16").build(dtype=jnp.float32, norm="frozen_bn")
  params = optim.unflatten(
      {k[len("backbone/") :]: v for k, v in loaded["params"].items() if k.startswith("backbone/")}
  )
  stats = optim.unflatten(
      {
          k[len("backbone/") :]: v
          for k, v in loaded["batch_stats"].items()
          if k.startswith("backbone/")
      }
  )
  out = jax.jit(module.apply)(
      {"params": params, "batch_stats": stats}, jnp.asarray(images.transpose(0, 2, 3, 1))
  )
  assert rel_err(out["embedding"], ref) <= TOL
  print(f"ViT-S/16 weight path: {time.time() - t0:.1f} s")

"""PyTorch references for the CLIP parity tests: OpenAI's `clip/model.py` and
`clip/simple_tokenizer.py` loaded by file path (the package's `__init__` imports
torchvision, which is not a dependency), random-init models with every parameter and
BN statistic randomised so that nothing is trivially zero or one."""

import importlib.util
import os

import numpy as np

from mtaclip_jax.models import clip


def _load(name):
  spec = importlib.util.find_spec("clip")
  path = os.path.join(spec.submodule_search_locations[0], f"{name}.py")
  mod_spec = importlib.util.spec_from_file_location(f"_openai_clip_{name}", path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module


def openai_model_module():
  return _load("model")


def openai_simple_tokenizer():
  return _load("simple_tokenizer").SimpleTokenizer()


def reference_clip(arch_name, seed: int = 0):
  """Random-init OpenAI CLIP(...) with the hyper-parameters of clip.ARCHS[arch_name]
  (or of a CLIPArch),
  in eval mode, biases / norm affine params / BN running stats randomised."""
  import torch

  arch = clip.get_arch(arch_name)
  torch.manual_seed(seed)
  model = openai_model_module().CLIP(
      arch.embed_dim,
      arch.image_resolution,
      arch.vision_layers,
      arch.vision_width,
      arch.vision_patch_size,
      arch.context_length,
      arch.vocab_size,
      arch.transformer_width,
      arch.transformer_heads,
      arch.transformer_layers,
  )
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
        n = module.weight.shape[0]
        module.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
        module.bias.copy_(0.1 * torch.randn(n, generator=g))
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.copy_(0.1 * torch.randn(n, generator=g))
        module.running_var.copy_(0.5 + torch.rand(n, generator=g))
    for name, p in model.named_parameters():
      if (
          name.endswith("bias")
          and "bn" not in name
          and "ln" not in name
          and "downsample.1" not in name
      ):
        p.copy_(0.02 * torch.randn(p.shape, generator=g))
  return model.eval()


def state_dict_numpy(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def randomise(model, seed):
  """A torch model with norm scales ~1 and every bias non-zero (random), so that a
  swapped or dropped tensor shows in a parity test."""
  import torch  # pylint: disable=g-import-not-at-top  (torch only where a test needs it)

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
      elif name.endswith("bias") or "norm" in name:
        p.copy_(0.05 * torch.randn(p.shape, generator=g))
  return model


def reference_vit_s16(pooler=True):
  """A random transformers ViTModel of ViT-S/16's shape (`randomise`d), in eval mode."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  from mtaclip_jax.models.backbones import vit_imagenet  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  cfg = transformers.ViTConfig(
      hidden_size=384,
      num_hidden_layers=12,
      num_attention_heads=6,
      intermediate_size=1536,
      image_size=224,
      patch_size=16,
      layer_norm_eps=vit_imagenet.ARCHS["ViT-S/16"].layer_norm_eps,
  )
  return randomise(transformers.ViTModel(cfg, add_pooling_layer=pooler).eval(), 1)

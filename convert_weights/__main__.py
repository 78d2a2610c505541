"""python -m convert_weights --src PATH --out DIR [--arch ARCH] [--allow-torchscript]

Converts a CLIP checkpoint (OpenAI TorchScript .pt with --allow-torchscript, plain or
open_clip state dicts .pt/.pth/.bin, .safetensors, transformers CLIPModel), an ImageNet
ViT (transformers ViTModel or timm-style) or a SegFormer MiT encoder (transformers
SegformerModel) into an orbax checkpoint DIR/variables + DIR/meta.json, for
`config.init.clip=DIR` (CLIP) or `config.init.backbone=DIR` (any backbone).
"""

import argparse
import sys

from convert_weights.backbone_convert import convert_any
from convert_weights.clip_io import save_converted
from convert_weights.clip_sources import CheckpointError
from convert_weights.clip_sources import read_state_dict
from mtaclip_jax.models import backbones


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m convert_weights", description=__doc__.split("\n\n")[1]
  )
  parser.add_argument("--src", required=True, help="checkpoint file")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument(
      "--arch",
      choices=sorted(backbones.REGISTRY),
      default=None,
      help="arch (default: inferred from the key names and shapes)",
  )
  parser.add_argument(
      "--allow-torchscript",
      action="store_true",
      help="allow TorchScript archives (runs code stored in the file)",
  )
  args = parser.parse_args(argv)
  try:
    state = read_state_dict(args.src, allow_torchscript=args.allow_torchscript)
    arch, towers = convert_any(state, args.arch)
    meta = save_converted(args.out, arch, towers, args.src)
  except (CheckpointError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  p = meta["params"]
  print(f"converted {args.src} ({arch}, sha256 {meta['sha256'][:12]}...) -> {args.out}")
  print(f"  image tower: {p['image']:,} parameters")
  if "text" in p:
    print(f"  text tower:  {p['text']:,} parameters")
  print(f"  total:       {p['total']:,} parameters")
  return 0


if __name__ == "__main__":
  sys.exit(main())

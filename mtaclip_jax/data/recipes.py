"""`config.data` of the paper recipes (DESIGN §5); configs/ may start from these."""

import ml_collections

RECIPES = {
    # name: (crop (h, w), resize scale (long cap, short), global batch, classes)
    "ade20k": ((512, 512), (2048, 512), 16, 150),
    "cityscapes": ((1024, 1024), (2048, 1024), 8, 19),
}


def train_transforms(crop_size, scale, ratio_range=(0.5, 2.0), cat_max_ratio=0.75):
  return [
      f"random_resize(scale={tuple(scale)}, ratio_range={tuple(ratio_range)})",
      f"random_crop(size={tuple(crop_size)}, cat_max_ratio={cat_max_ratio})",
      "random_flip(prob=0.5)",
      "photometric_distortion()",
      "normalize()",
      f"pad(size={tuple(crop_size)})",
  ]


def data_config(name, root, **overrides):
  """ConfigDict with every `config.data` field, recipe defaults for `name`."""
  crop, scale, batch, num_classes = RECIPES[name]
  cfg = ml_collections.ConfigDict(dict(
      name=name, root=root, source="raw", tfds_dir="", num_classes=num_classes,
      crop_size=crop, test_scale=scale, batch_size=batch, max_segments=32,
      transforms=train_transforms(crop, scale), num_workers=0, num_threads=2,
      prefetch=4, seed=0, on_bad_sample="error"))
  cfg.update(overrides)
  if "crop_size" in overrides and "transforms" not in overrides:
    cfg.transforms = train_transforms(cfg.crop_size, cfg.test_scale)
  return cfg

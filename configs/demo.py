"""Demo: MTA-CLIP with a small CLIP-style backbone on a generated dataset, on CPU.

The same code paths as the paper configs with reduced widths and depths, from random
initialisation, with the values the demo was tuned with (context init, warm-up start,
learning rate, whole-image evaluation). The dataset
(ADE20k layout, 8 classes of textured shapes) is generated under demo_data/ on the
first run.

  python -m mtaclip_jax.main --config configs/demo.py --workdir workdirs/demo
"""

import ml_collections

from mtaclip_jax.config import recipes
from mtaclip_jax.config import variants


def get_config(arg=None):
  c = recipes.paper_config("ade20k", "tiny")
  num_classes, crop = 8, (128, 128)
  c.model.update(dict(num_classes=num_classes, **recipes.DEMO_MODEL))
  c.loss.num_points = 1024
  c.data.update(
      dict(
          root="demo_data/ADEChallengeData2016",
          num_classes=num_classes,
          crop_size=crop,
          batch_size=8,
          max_segments=num_classes,
          num_workers=0,
          test_scale=(160, 128),
      )
  )
  c.data.transforms = recipes.train_transforms(crop, (160, 128), ratio_range=(0.75, 1.5))
  c.data.none_class_name = "background"  # the "none" class's text the demo was tuned with
  c.data.generate = ml_collections.ConfigDict(
      dict(enabled=True, train=64, val=16, size=(128, 160), seed=0)
  )
  c.optim.update(dict(lr=1e-3, warmup_steps=20, warmup_start_factor=1e-6, clip_norm=1.0))
  c.train.update(dict(steps=300, log_every=10, checkpoint_every=100, max_to_keep=2))
  c.eval.update(
      dict(
          mode="whole",
          ms_mode="whole",
          test_scale=(160, 128),
          crop_size=crop,
          stride=(96, 96),
          every_steps=0,
      )
  )
  # A small model with nothing to load: it trains from random initialisation (the
  # paper configs refuse to without converted weights; docs/REPRODUCE.md).
  c.init.allow_random = True
  variants.apply_variant(c, arg)  # last, so that nothing above overrides it
  return c

"""Tokenizer ids equal OpenAI's `clip/simple_tokenizer.py` / `clip.tokenize`."""

import logging

import numpy as np
import pytest

from mtaclip_jax.models.clip import tokenizer
from tests.clip_reference import openai_simple_tokenizer

# mmseg's ADE20KDataset.CLASSES (150) and the 19 Cityscapes train classes.
ADE20K = (
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "bed ",
    "windowpane",
    "grass",
    "cabinet",
    "sidewalk",
    "person",
    "earth",
    "door",
    "table",
    "mountain",
    "plant",
    "curtain",
    "chair",
    "car",
    "water",
    "painting",
    "sofa",
    "shelf",
    "house",
    "sea",
    "mirror",
    "rug",
    "field",
    "armchair",
    "seat",
    "fence",
    "desk",
    "rock",
    "wardrobe",
    "lamp",
    "bathtub",
    "railing",
    "cushion",
    "base",
    "box",
    "column",
    "signboard",
    "chest of drawers",
    "counter",
    "sand",
    "sink",
    "skyscraper",
    "fireplace",
    "refrigerator",
    "grandstand",
    "path",
    "stairs",
    "runway",
    "case",
    "pool table",
    "pillow",
    "screen door",
    "stairway",
    "river",
    "bridge",
    "bookcase",
    "blind",
    "coffee table",
    "toilet",
    "flower",
    "book",
    "hill",
    "bench",
    "countertop",
    "stove",
    "palm",
    "kitchen island",
    "computer",
    "swivel chair",
    "boat",
    "bar",
    "arcade machine",
    "hovel",
    "bus",
    "towel",
    "light",
    "truck",
    "tower",
    "chandelier",
    "awning",
    "streetlight",
    "booth",
    "television receiver",
    "airplane",
    "dirt track",
    "apparel",
    "pole",
    "land",
    "bannister",
    "escalator",
    "ottoman",
    "bottle",
    "buffet",
    "poster",
    "stage",
    "van",
    "ship",
    "fountain",
    "conveyer belt",
    "canopy",
    "washer",
    "plaything",
    "swimming pool",
    "stool",
    "barrel",
    "basket",
    "waterfall",
    "tent",
    "bag",
    "minibike",
    "cradle",
    "oven",
    "ball",
    "food",
    "step",
    "tank",
    "trade name",
    "microwave",
    "pot",
    "animal",
    "bicycle",
    "lake",
    "dishwasher",
    "screen",
    "blanket",
    "sculpture",
    "hood",
    "sconce",
    "vase",
    "traffic light",
    "tray",
    "ashcan",
    "fan",
    "pier",
    "crt screen",
    "plate",
    "monitor",
    "bulletin board",
    "shower",
    "radiator",
    "glass",
    "clock",
    "flag",
)
CITYSCAPES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
SENTENCES = (
    "a photo of a cat.",
    "Hello, World!! It's 3:45pm -- isn't it?",
    "naïve café — déjà vu 東京 🙂",
    "  multiple   spaces\tand\nnewlines ",
    "&amp; html &lt;tag&gt;",
    "don't you'll WE'RE",
    "ÉCOLE Straße İstanbul",
    "mojibake: cafÃ©",
    "e-mail: a.b@c.org #hashtag (1234567890)",
    "ﬁ ligature, Ω, e\u0301",
    "",
)


@pytest.fixture(scope="module")
def reference():
  return openai_simple_tokenizer()


def _reference_tokenize(ref, texts, context_length=77):
  """clip.tokenize (clip/clip.py imports torchvision, so it is rewritten here as is)."""
  out = np.zeros((len(texts), context_length), np.int64)
  for i, t in enumerate(texts):
    ids = [ref.encoder["<|startoftext|>"]] + ref.encode(t) + [ref.encoder["<|endoftext|>"]]
    out[i, : len(ids)] = ids
  return out


def test_class_lists_complete():
  assert len(ADE20K) == 150 and len(set(ADE20K)) == 150
  assert len(CITYSCAPES) == 19


@pytest.mark.parity
@pytest.mark.parametrize(
    "texts", [ADE20K, CITYSCAPES, SENTENCES], ids=["ade20k", "cityscapes", "sentences"]
)
def test_tokenize_matches_openai(reference, texts):
  ours = tokenizer.tokenize(list(texts))
  assert ours.dtype == np.int32 and ours.shape == (len(texts), 77)
  np.testing.assert_array_equal(ours, _reference_tokenize(reference, texts))


@pytest.mark.parity
def test_class_names_fit_without_truncation(reference, caplog):
  with caplog.at_level(logging.WARNING):
    ours = tokenizer.tokenize_class_names(list(ADE20K) + list(CITYSCAPES))
  assert not caplog.records
  assert ours.shape == (169, 5) and ours.dtype == np.int32
  np.testing.assert_array_equal(
      ours, _reference_tokenize(reference, list(ADE20K) + list(CITYSCAPES))[:, :5]
  )


def test_class_name_truncation_keeps_eot_and_warns(caplog):
  name = "extraordinarily complicated multi word class name"
  with caplog.at_level(logging.WARNING):
    out = tokenizer.tokenize_class_names(["dog", name], length=5)
  assert out[1, 0] == tokenizer.SOT_ID and out[1, -1] == tokenizer.EOT_ID
  assert list(out[1, 1:4]) == tokenizer.encode(name)[:3]
  assert out[0, 2] == tokenizer.EOT_ID and out[0, 3] == 0
  assert name in caplog.text and "dog" not in caplog.text.split("truncated:")[1]


def test_too_long_text_raises_unless_truncate():
  text = "word " * 100
  with pytest.raises(ValueError, match="context length 77"):
    tokenizer.tokenize(text)
  out = tokenizer.tokenize(text, truncate=True)
  assert out[0, -1] == tokenizer.EOT_ID and out[0, 0] == tokenizer.SOT_ID

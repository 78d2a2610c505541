"""The folder dataset: classes.txt parsing, the layout, masks, and one error per bad
input (data/folder.py, readers, classes, validate, the recipe of configs/folder.py)."""

import os

import numpy as np
from PIL import Image
import pytest

from mtaclip_jax import errors
from mtaclip_jax.config import folder_recipe
from mtaclip_jax.config import validate
from mtaclip_jax.data import check
from mtaclip_jax.data import classes
from mtaclip_jax.data import folder
from mtaclip_jax.data import generate
from mtaclip_jax.data import pipeline
from mtaclip_jax.data import readers

NAMES = ("scratch", "dent", "rust", "paint")


def write(root, lines="scratch\ndent\nrust\npaint\n", masks=None, split="train"):
  """A folder dataset at `root`: classes.txt from `lines`, and per stem an image and
  its mask (`masks`: {stem: uint8 [H, W] or [H, W, 3] array}) in `split`."""
  os.makedirs(os.path.join(root, "images", split), exist_ok=True)
  os.makedirs(os.path.join(root, "masks", split), exist_ok=True)
  if lines is not None:
    with open(os.path.join(root, "classes.txt"), "w") as f:
      f.write(lines)
  for stem, mask in (masks or {}).items():
    h, w = mask.shape[:2]
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(
        os.path.join(root, "images", split, stem + ".jpg")
    )
    Image.fromarray(mask).save(os.path.join(root, "masks", split, stem + ".png"))
  return str(root)


def config(root, arg=""):
  return folder_recipe.folder_config(f"root={root},backbone=tiny,crop=64" + arg)


# ---------------------------------------------------------------- classes.txt


def test_parse_names_and_colours():
  listed = folder.parse_classes("scratch\ndent 10 20 30\nrust  #FF8000\nchest of drawers\n\n\n")
  assert listed.names == ("scratch", "dent", "rust", "chest of drawers")
  assert listed.colours == (None, (10, 20, 30), (255, 128, 0), None)
  # One trailing number belongs to the name; three more after it are its colour.
  assert folder.parse_classes("class 2\nclass 3 1 2 3").names == ("class 2", "class 3")


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty class list"),
        ("\n\n", "empty class list"),
        ("scratch\n\ndent", ":2: empty class name"),
        ("scratch\ndent\nScratch", ":3: class name 'Scratch' duplicates line 1"),
        ("scratch #12345", ":1: bad colour '#12345'"),
        ("scratch #gg0000", "bad colour '#gg0000'"),
        ("scratch 1 2", "bad colour '1 2'"),
        ("scratch 1 2 300", "bad colour '1 2 300'"),
        ("10 20 30", "a colour without a class name"),
        ("scratch 1 2 3\ndent #010203", ":2: colour (1, 2, 3) of 'dent' is also the colour"),
    ],
)
def test_bad_class_lists(text, message):
  with pytest.raises(errors.ClassListError, match=message.replace("(", r"\(").replace(")", r"\)")):
    folder.parse_classes(text, "classes.txt")


def test_class_names_palette_and_count_from_the_file(tmp_path):
  root = write(tmp_path, "scratch\ndent 1 2 3\nrust\npaint\n")
  c = config(root)
  assert classes.class_names(c.data) == list(NAMES)
  assert classes.num_classes(c.data) == 4
  pal = classes.palette(c.data)
  assert pal[1] == (1, 2, 3) and pal[0] == classes.ADE20K_PALETTE[0]
  validate.validate_config(c)  # fills the class count of model and data
  assert c.data.num_classes == c.model.num_classes == 4
  # The parse is cached while the file is unchanged, and read again when it changes.
  with open(os.path.join(root, "classes.txt"), "w") as f:
    f.write("a\nb\nc\n")
  os.utime(os.path.join(root, "classes.txt"), ns=(1, 1))
  c.data.num_classes = -1
  assert classes.class_names(c.data) == ["a", "b", "c"]


def test_missing_class_list_and_count_mismatch(tmp_path):
  root = write(tmp_path, lines=None)
  with pytest.raises(errors.ClassListError, match="classes.txt: no class list"):
    validate.validate_config(config(root))
  write(tmp_path)
  c = config(root)
  c.data.num_classes = 5
  with pytest.raises(errors.ConfigError, match="num_classes=5: .* lists 4 class names"):
    validate.validate_config(c)


def test_ignore_index_must_not_be_a_class(tmp_path):
  c = config(write(tmp_path))
  c.data.ignore_index = 2
  with pytest.raises(errors.ConfigError, match="ignore_index=2 is the mask value of class 'rust'"):
    validate.validate_config(c)
  c = config(write(tmp_path))
  c.data.ignore_index, c.data.reduce_zero_label = 0, True  # 0 is unlabeled anyway
  validate.validate_config(c)


# ---------------------------------------------------------------- masks


def test_class_id_masks_ignore_and_zero_shift(tmp_path):
  mask = np.array([[0, 1, 2, 3], [255, 3, 2, 1]], np.uint8)
  root = write(tmp_path, masks={"a": mask})
  c = config(root)
  source = readers.RawSource("folder", root, "train", 4, rules=readers.label_rules(c.data, 4))
  np.testing.assert_array_equal(source[0]["label"], mask)
  c.data.reduce_zero_label = True
  rules = readers.label_rules(c.data, 4)
  label = readers.load_sample(source.samples[0], "folder", 4, rules)["label"]
  np.testing.assert_array_equal(label, [[255, 0, 1, 2], [255, 2, 1, 0]])


def test_mask_value_beyond_the_names(tmp_path):
  root = write(tmp_path, masks={"a": np.array([[0, 7], [1, 4]], np.uint8)})
  source = readers.RawSource("folder", root, "train", 4)
  with pytest.raises(errors.BadSampleError, match=r"a\.png: mask value \[4, 7\] beyond"):
    source[0]


def test_rgb_colour_masks(tmp_path):
  rgb = np.zeros((2, 3, 3), np.uint8)
  rgb[0, :] = (10, 20, 30)
  rgb[1, :] = (255, 128, 0)
  root = write(tmp_path, "scratch 10 20 30\ndent #ff8000\n", masks={"a": rgb})
  c = config(root)
  source = readers.RawSource("folder", root, "train", 2, rules=readers.label_rules(c.data, 2))
  np.testing.assert_array_equal(source[0]["label"], [[0, 0, 0], [1, 1, 1]])
  rgb[1, 2] = (1, 2, 3)
  Image.fromarray(rgb).save(os.path.join(root, "masks", "train", "a.png"))
  with pytest.raises(errors.BadSampleError, match=r"a\.png: colour \(1, 2, 3\) \(#010203\) is not"):
    source[0]


def test_rgb_unlabeled_colour(tmp_path):
  """data.ignore_colour: pixels of that colour are unlabeled (255); it is checked with
  the config (a form no colour has, or a class's colour)."""
  rgb = np.zeros((2, 3, 3), np.uint8)
  rgb[0, :] = (10, 20, 30)
  root = write(tmp_path, "scratch 10 20 30\ndent #ff8000\n", masks={"a": rgb})
  c = config(root)
  rules = readers.label_rules(c.data, 2)
  with pytest.raises(errors.BadSampleError, match="set data.ignore_colour if it marks unlabeled"):
    readers.RawSource("folder", root, "train", 2, rules=rules)[0]
  c.data.ignore_colour = "0 0 0"
  rules = readers.label_rules(c.data, 2)
  source = readers.RawSource("folder", root, "train", 2, rules=rules)
  np.testing.assert_array_equal(source[0]["label"], [[0, 0, 0], [255, 255, 255]])
  assert folder.parse_colour("#0a141e") == folder.parse_colour("10,20,30") == (10, 20, 30)
  for bad, message in [
      ("black", "expected '#rrggbb' or 'r g b'"),
      ("#ff8000", "is the colour of class 'dent'"),
  ]:
    c.data.ignore_colour = bad
    with pytest.raises(errors.ConfigError, match=message):
      validate._check_ignore_colour(c.data)


def test_rgb_mask_without_colours_in_the_list(tmp_path):
  root = write(tmp_path, masks={"a": np.zeros((2, 2, 3), np.uint8)})
  rules = readers.label_rules(config(root).data, 4)
  with pytest.raises(errors.BadSampleError, match="classes.txt gives no colours"):
    readers.RawSource("folder", root, "train", 4, rules=rules)[0]


# ---------------------------------------------------------------- layout


def test_stems_that_do_not_pair(tmp_path):
  root = write(tmp_path, masks={"a": np.zeros((2, 2), np.uint8)})
  Image.new("RGB", (2, 2)).save(os.path.join(root, "images", "train", "lonely.png"))
  Image.new("L", (2, 2)).save(os.path.join(root, "masks", "train", "stray.png"))
  with pytest.raises(errors.BadSampleError) as e:
    readers.list_samples("folder", root, "train")
  message = str(e.value)
  assert "1 image(s) without a mask of their stem in" in message and "lonely.png" in message
  assert "1 mask(s) without an image of their stem in" in message and "stray.png" in message


def test_two_images_of_one_stem(tmp_path):
  root = write(tmp_path, masks={"a": np.zeros((2, 2), np.uint8)})
  Image.new("RGB", (2, 2)).save(os.path.join(root, "images", "train", "a.png"))
  with pytest.raises(errors.BadSampleError, match="two files with one stem"):
    readers.list_samples("folder", root, "train")


def test_not_a_folder_dataset(tmp_path):
  with pytest.raises(errors.ConfigError, match="is not a folder dataset"):
    validate.check_paths(config(str(tmp_path / "nothing")), init=False)


def test_generated_dataset_is_clean(tmp_path):
  root = generate.write_folder_dataset(
      str(tmp_path), {"train": 2, "val": 1}, 0, (32, 40), ("surface",) + NAMES
  )
  c = config(root)
  result = check.scan(c.data)
  assert sorted(result) == ["train", "val"]
  assert not any(r["bad"] for r in result.values())
  assert classes.class_names(c.data) == ["surface", *NAMES]
  # The listed colours map too: the masks saved as colours read back as the same ids.
  sample = readers.list_samples("folder", root, "val")[0]
  ids = readers.load_sample(sample, "folder", 5)["label"]
  pal = np.array(classes.palette(c.data), np.uint8)
  rgb = pal[np.where(ids == 255, 0, ids)]
  Image.fromarray(rgb).save(sample.label_path)
  again = readers.load_sample(sample, "folder", 5, readers.label_rules(c.data, 5))["label"]
  np.testing.assert_array_equal(again, np.where(ids == 255, 0, ids))


# ---------------------------------------------------------------- recipe


def test_recipe_arg():
  c = folder_recipe.folder_config("root=/d,backbone=RN101,crop=384,steps=1000,batch=4,K=4")
  assert (c.data.root, c.model.backbone, c.data.crop_size) == ("/d", "RN101", (384, 384))
  assert (c.train.steps, c.data.batch_size, c.model.num_contexts) == (1000, 4, 4)
  assert c.eval.crop_size == (384, 384) and c.eval.stride == (256, 256)
  assert not c.init.allow_random  # CLIP backbones need converted weights
  with pytest.raises(errors.ConfigError, match="without pretrained weights"):
    validate.check_pretrained(c)
  tiny = folder_recipe.folder_config("backbone=tiny")
  assert tiny.init.allow_random
  validate.check_pretrained(tiny)
  with pytest.raises(ValueError, match="unknown config variant 'size'"):
    folder_recipe.folder_config("size=3")
  with pytest.raises(ValueError, match="crop='big': expected an integer"):
    folder_recipe.folder_config("crop=big")


def test_tfds_source_equals_the_raw_folder(tmp_path):
  root = generate.write_folder_dataset(
      str(tmp_path / "data"), {"train": 2, "val": 1}, 0, (32, 40), NAMES
  )
  c = config(root)
  raw = pipeline.make_source(c.data, "train")
  c.data.update(dict(source="tfds", tfds_dir=str(tmp_path / "tfds")))
  prepared = pipeline.make_source(c.data, "train")
  assert len(prepared) == len(raw) == 2
  for i in range(2):
    a, b = prepared[i], raw[i]
    assert a["name"] == b["name"]
    np.testing.assert_array_equal(a["label"], b["label"])
    np.testing.assert_array_equal(a["image"], b["image"])

"""Class names and palettes of ADE20k-150 and Cityscapes (mmsegmentation's order) or of
a folder dataset (its classes.txt, data/folder.py), and the token ids of the class
prompts the text tower reads."""

import jax
import jax.numpy as jnp

from mtaclip_jax import errors
from mtaclip_jax.data import folder
from mtaclip_jax.models.clip import tokenizer

# mmsegmentation ADE20KDataset.METAINFO["classes"] (mmseg writes 'bed ' with a
# trailing space; stripped here, the CLIP tokenizer strips it anyway).
ADE20K_CLASSES = (
    'wall',
    'building',
    'sky',
    'floor',
    'tree',
    'ceiling',
    'road',
    'bed',
    'windowpane',
    'grass',
    'cabinet',
    'sidewalk',
    'person',
    'earth',
    'door',
    'table',
    'mountain',
    'plant',
    'curtain',
    'chair',
    'car',
    'water',
    'painting',
    'sofa',
    'shelf',
    'house',
    'sea',
    'mirror',
    'rug',
    'field',
    'armchair',
    'seat',
    'fence',
    'desk',
    'rock',
    'wardrobe',
    'lamp',
    'bathtub',
    'railing',
    'cushion',
    'base',
    'box',
    'column',
    'signboard',
    'chest of drawers',
    'counter',
    'sand',
    'sink',
    'skyscraper',
    'fireplace',
    'refrigerator',
    'grandstand',
    'path',
    'stairs',
    'runway',
    'case',
    'pool table',
    'pillow',
    'screen door',
    'stairway',
    'river',
    'bridge',
    'bookcase',
    'blind',
    'coffee table',
    'toilet',
    'flower',
    'book',
    'hill',
    'bench',
    'countertop',
    'stove',
    'palm',
    'kitchen island',
    'computer',
    'swivel chair',
    'boat',
    'bar',
    'arcade machine',
    'hovel',
    'bus',
    'towel',
    'light',
    'truck',
    'tower',
    'chandelier',
    'awning',
    'streetlight',
    'booth',
    'television receiver',
    'airplane',
    'dirt track',
    'apparel',
    'pole',
    'land',
    'bannister',
    'escalator',
    'ottoman',
    'bottle',
    'buffet',
    'poster',
    'stage',
    'van',
    'ship',
    'fountain',
    'conveyer belt',
    'canopy',
    'washer',
    'plaything',
    'swimming pool',
    'stool',
    'barrel',
    'basket',
    'waterfall',
    'tent',
    'bag',
    'minibike',
    'cradle',
    'oven',
    'ball',
    'food',
    'step',
    'tank',
    'trade name',
    'microwave',
    'pot',
    'animal',
    'bicycle',
    'lake',
    'dishwasher',
    'screen',
    'blanket',
    'sculpture',
    'hood',
    'sconce',
    'vase',
    'traffic light',
    'tray',
    'ashcan',
    'fan',
    'pier',
    'crt screen',
    'plate',
    'monitor',
    'bulletin board',
    'shower',
    'radiator',
    'glass',
    'clock',
    'flag',
)

ADE20K_PALETTE = (
    (120, 120, 120),
    (180, 120, 120),
    (6, 230, 230),
    (80, 50, 50),
    (4, 200, 3),
    (120, 120, 80),
    (140, 140, 140),
    (204, 5, 255),
    (230, 230, 230),
    (4, 250, 7),
    (224, 5, 255),
    (235, 255, 7),
    (150, 5, 61),
    (120, 120, 70),
    (8, 255, 51),
    (255, 6, 82),
    (143, 255, 140),
    (204, 255, 4),
    (255, 51, 7),
    (204, 70, 3),
    (0, 102, 200),
    (61, 230, 250),
    (255, 6, 51),
    (11, 102, 255),
    (255, 7, 71),
    (255, 9, 224),
    (9, 7, 230),
    (220, 220, 220),
    (255, 9, 92),
    (112, 9, 255),
    (8, 255, 214),
    (7, 255, 224),
    (255, 184, 6),
    (10, 255, 71),
    (255, 41, 10),
    (7, 255, 255),
    (224, 255, 8),
    (102, 8, 255),
    (255, 61, 6),
    (255, 194, 7),
    (255, 122, 8),
    (0, 255, 20),
    (255, 8, 41),
    (255, 5, 153),
    (6, 51, 255),
    (235, 12, 255),
    (160, 150, 20),
    (0, 163, 255),
    (140, 140, 140),
    (250, 10, 15),
    (20, 255, 0),
    (31, 255, 0),
    (255, 31, 0),
    (255, 224, 0),
    (153, 255, 0),
    (0, 0, 255),
    (255, 71, 0),
    (0, 235, 255),
    (0, 173, 255),
    (31, 0, 255),
    (11, 200, 200),
    (255, 82, 0),
    (0, 255, 245),
    (0, 61, 255),
    (0, 255, 112),
    (0, 255, 133),
    (255, 0, 0),
    (255, 163, 0),
    (255, 102, 0),
    (194, 255, 0),
    (0, 143, 255),
    (51, 255, 0),
    (0, 82, 255),
    (0, 255, 41),
    (0, 255, 173),
    (10, 0, 255),
    (173, 255, 0),
    (0, 255, 153),
    (255, 92, 0),
    (255, 0, 255),
    (255, 0, 245),
    (255, 0, 102),
    (255, 173, 0),
    (255, 0, 20),
    (255, 184, 184),
    (0, 31, 255),
    (0, 255, 61),
    (0, 71, 255),
    (255, 0, 204),
    (0, 255, 194),
    (0, 255, 82),
    (0, 10, 255),
    (0, 112, 255),
    (51, 0, 255),
    (0, 194, 255),
    (0, 122, 255),
    (0, 255, 163),
    (255, 153, 0),
    (0, 255, 10),
    (255, 112, 0),
    (143, 255, 0),
    (82, 0, 255),
    (163, 255, 0),
    (255, 235, 0),
    (8, 184, 170),
    (133, 0, 255),
    (0, 255, 92),
    (184, 0, 255),
    (255, 0, 31),
    (0, 184, 255),
    (0, 214, 255),
    (255, 0, 112),
    (92, 255, 0),
    (0, 224, 255),
    (112, 224, 255),
    (70, 184, 160),
    (163, 0, 255),
    (153, 0, 255),
    (71, 255, 0),
    (255, 0, 163),
    (255, 204, 0),
    (255, 0, 143),
    (0, 255, 235),
    (133, 255, 0),
    (255, 0, 235),
    (245, 0, 255),
    (255, 0, 122),
    (255, 245, 0),
    (10, 190, 212),
    (214, 255, 0),
    (0, 204, 255),
    (20, 0, 255),
    (255, 255, 0),
    (0, 153, 255),
    (0, 41, 255),
    (0, 255, 204),
    (41, 0, 255),
    (41, 255, 0),
    (173, 0, 255),
    (0, 245, 255),
    (71, 0, 255),
    (122, 0, 255),
    (0, 255, 184),
    (0, 92, 255),
    (184, 255, 0),
    (0, 133, 255),
    (255, 214, 0),
    (25, 194, 194),
    (102, 255, 0),
    (92, 0, 255),
)

# Cityscapes train ids 0..18 (cityscapesscripts.helpers.labels, trainId order).
CITYSCAPES_CLASSES = (
    'road',
    'sidewalk',
    'building',
    'wall',
    'fence',
    'pole',
    'traffic light',
    'traffic sign',
    'vegetation',
    'terrain',
    'sky',
    'person',
    'rider',
    'car',
    'truck',
    'bus',
    'train',
    'motorcycle',
    'bicycle',
)

CITYSCAPES_PALETTE = (
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
)

DATASETS = {
    'ade20k': (ADE20K_CLASSES, ADE20K_PALETTE),
    'cityscapes': (CITYSCAPES_CLASSES, CITYSCAPES_PALETTE),
}
# Every `config.data.name`: the built-in datasets and the folder dataset, whose names
# come from its classes.txt.
NAMES = (*DATASETS, folder.NAME)

IGNORE_LABEL = 255


def _dataset(data_config):
  """(names, palette) of the dataset: built in, or read from a folder's classes.txt
  (names without a colour there take ADE20k's palette colour of their index)."""
  name = data_config.name
  if name == folder.NAME:
    listed = folder.read_classes(folder.classes_path(data_config))
    pal = tuple(
        c if c is not None else ADE20K_PALETTE[i % len(ADE20K_PALETTE)]
        for i, c in enumerate(listed.colours)
    )
    return listed.names, pal
  if name not in DATASETS:
    raise ValueError(f'config.data.name={name!r}: expected one of {sorted(NAMES)}')
  return DATASETS[name]


def num_classes(data_config):
  """`data.num_classes`, checked against the dataset's full class list (a folder
  dataset: -1 is the number of names in its classes.txt, any other value must be that
  number)."""
  names, _ = _dataset(data_config)
  n = data_config.get('num_classes', None)
  if data_config.name == folder.NAME:
    if n in (None, -1):
      return len(names)
    if n != len(names):
      raise errors.ConfigError(
          f'config.data.num_classes={n}: {folder.classes_path(data_config)} lists '
          f'{len(names)} class names (-1 follows the file)'
      )
    return int(n)
  n = n or len(names)
  if not 1 <= n <= len(names):
    raise ValueError(
        f'config.data.num_classes={n}: expected 1..{len(names)} for ' f'{data_config.name!r}'
    )
  return int(n)


def class_names(data_config):
  """The first `data.num_classes` class names of `data.name`."""
  names, _ = _dataset(data_config)
  return list(names[: num_classes(data_config)])


def palette(data_config):
  """uint8-valued RGB triples, one per class of `class_names(data_config)`."""
  _, pal = _dataset(data_config)
  return [tuple(c) for c in pal[: num_classes(data_config)]]


def all_class_names(data_config):
  """Every class name the dataset has (`data.num_classes` may take fewer)."""
  return list(_dataset(data_config)[0])


def full_palette(data_config):
  """The palette of every class the dataset has (open-vocabulary overlays cycle it)."""
  return [tuple(c) for c in _dataset(data_config)[1]]


def class_tokens(data_config, length: int) -> jax.Array:
  """int32 [C + 1, length]: token ids of the class names and of the "none" class
  (`data.none_class_name`), in label order, for the model's text queries."""
  names = class_names(data_config) + [data_config.none_class_name]
  return jnp.asarray(tokenizer.tokenize_class_names(names, length))

"""validate_config is the one place a bad config value is named: every key of every
config, given a bad value, gives a `ConfigError` naming that key (the CLIs print it
as one `error:` line, tests/integration/test_cli_bad_values.py); the checks across
keys; `optim.total_steps` following `train.steps`; the data section alone (the data
check); paths, mesh, batch and crop checked before the workdir is created."""

import atexit
import functools
import glob
import os
import shutil
import tempfile

from flax import traverse_util
import jax
import ml_collections
import pytest

from mtaclip_jax import errors
from mtaclip_jax.config import keys
from mtaclip_jax.config import recipes
from mtaclip_jax.config import validate
from mtaclip_jax.data import generate
from mtaclip_jax.runtime import sharding
from mtaclip_jax.train import loop
from tests import train_fixtures
from tests.unit.data import test_image_decode

CONFIGS = sorted(
    os.path.basename(p)[:-3] for p in glob.glob(os.path.join(train_fixtures.ROOT, "configs/*.py"))
)

# A bad value for every constrained key.
BAD = {
    "seed": -1,
    "model.backbone": "RN49",
    "model.text_encoder": "MiT-B4",
    "model.backbone_norm": "layer_norm",
    "model.adapter_norm": "batch",
    "model.num_classes": 0,
    "model.num_queries": 0,
    "model.hidden_dim": 0,
    "model.mask_dim": -4,
    "model.enc_layers": 0,
    "model.enc_ffn_dim": 0,
    "model.enc_heads": 0,
    "model.enc_points": 0,
    "model.num_feature_levels": 4,
    "model.dec_layers": 0,
    "model.dec_ffn_dim": 0,
    "model.dec_heads": 0,
    "model.num_contexts": 0,
    "model.context_length": 0,
    "model.class_length": 0,
    "model.gamma_init": float("nan"),
    "model.context_init": "zeros",
    "model.deform_attn_impl": "cuda",
    "model.attention_impl": "flash",
    "model.dtype": "float16",
    "loss.class_weight": -1.0,
    "loss.mask_weight": -1.0,
    "loss.dice_weight": float("inf"),
    "loss.sim_weight": -1.0,
    "loss.no_object_weight": -0.1,
    "loss.num_points": 0,
    "loss.oversample_ratio": 0.5,
    "loss.importance_sample_ratio": 1.5,
    "loss.target_chunk": -1,
    "loss.matcher": "scipy",
    "loss.neg": "both",
    "loss.tau": 0.0,
    "optim.lr": 0.0,
    "optim.weight_decay": -0.01,
    "optim.b1": 1.0,
    "optim.b2": 1.5,
    "optim.eps": 0.0,
    "optim.warmup_steps": -1,
    "optim.warmup_start_factor": 2.0,
    "optim.poly_power": -1.0,
    "optim.min_lr": -1.0,
    "optim.clip_norm": -1.0,
    "optim.total_steps": 0,
    "optim.lr_mult_rules": [["^backbone/(", 0.1]],
    "optim.no_decay_rules": ["(unclosed"],
    "data.name": "pascal",
    "data.source": "lmdb",
    "data.num_classes": 0,
    "data.crop_size": 64,
    "data.test_scale": (512,),
    "data.batch_size": 0,
    "data.max_segments": 0,
    "data.transforms": ["random_rotate(deg=10)"],
    "data.num_workers": -1,
    "data.num_threads": 0,
    "data.prefetch": -1,
    "data.seed": -1,
    "data.on_bad_sample": "ignore",
    "data.none_class_name": "",
    "data.generate.train": -1,
    "data.generate.val": -1,
    "data.generate.size": (-1, 64),
    "data.generate.seed": -1,
    "data.ignore_index": 256,
    "data.ignore_colour": "black",
    "eval.mode": "bogus",
    "eval.ms_mode": "ms_flip",
    "eval.head": "mask",
    "eval.crop_size": (0, 512),
    "eval.stride": (341,),
    "eval.scales": (),
    "eval.test_scale": "2048x512",
    "eval.split": "testing",
    "eval.every_steps": -1,
    "eval.max_images": -1,
    "eval.step": -2,
    "train.steps": 0,
    "train.log_every": 0,
    "train.checkpoint_every": 0,
    "train.max_to_keep": 0,
    "train.on_nan": "ignore",
    "train.micro_batches": 0,
    "mesh.data": 0,
    "mesh.model": 0,
    "mesh.fsdp_min_size": -1,
    # paths: checked by check_paths
    "data.root": "/nonexistent/ADE",
    "data.tfds_dir": "/nonexistent/tfds",
    "data.classes_file": "/nonexistent/classes.txt",
    "init.clip": "/nonexistent/clip_rn50",
    "init.backbone": "/nonexistent/vits16",
    "init.mask2former": "/nonexistent/m2f.safetensors",
}
# What makes a value bad in the first place (a missing dataset root is fine while the
# demo dataset is still to be generated; the TFDS folder is read for a TFDS source).
CONTEXT = {"data.root": {"data.generate.enabled": False}, "data.tfds_dir": {"data.source": "tfds"}}


@functools.cache
def _folder_root():
  """A small folder dataset: the folder config reads its class count there."""
  root = tempfile.mkdtemp(prefix="folder_config_")
  atexit.register(shutil.rmtree, root, ignore_errors=True)
  return generate.write_folder_dataset(root, {"train": 1, "val": 1}, 0, (32, 32), ("a", "b"))


def _load(name, arg=None):
  """configs/NAME.py[:arg]; the folder config on `_folder_root()`."""
  if name == "folder":
    arg = ",".join(filter(None, [f"root={_folder_root()}", arg]))
  return train_fixtures.load_config(name, arg)


def _bools(config):
  """Any bool is valid (ml_collections refuses a non-bool at flag parsing); the
  checks across keys that involve bools are below."""
  return {k for k, v in _keys(config).items() if isinstance(v, bool)}


def _set(config, key, value):
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    node = node[p]
  with node.ignore_type():
    node[leaf] = value


def _keys(config):
  return traverse_util.flatten_dict(config.to_dict(), sep=".")


@pytest.mark.parametrize("name", CONFIGS)
def test_every_key_of_every_config_names_itself_when_bad(name):
  config = _load(name)
  bools = _bools(config)
  unknown = sorted(set(_keys(config)) - set(BAD) - bools)
  assert not unknown, f"give these keys a rule in config/keys.py and a bad value here: {unknown}"
  # The paper configs' datasets are not here: their paths are walked in the demo.
  paths = name == "demo"
  for key in sorted(set(_keys(config)) - bools):
    if key in keys.FREE and not paths:
      continue
    c = config.copy_and_resolve_references()
    for k, v in CONTEXT.get(key, {}).items():
      _set(c, k, v)
    _set(c, key, BAD[key])
    with pytest.raises(errors.ConfigError) as e:
      validate.validate_config(c)
      if paths:
        validate.check_paths(c)
    message = str(e.value)
    assert f"config.{key}" in message, (key, message)
    assert "\n" not in message, message


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_and_its_variants_are_valid(name):
  for arg in (None, "baseline", "text_only", "K=1,neg=separate", "bf16"):
    c = _load(name, arg)
    validate.validate_config(c)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            {"model.text_queries": False},
            "config.loss.similarity=True needs config.model.text_queries=True",
        ),
        (
            {"model.text_queries": False, "loss.similarity": False, "eval.head": "similarity"},
            "config.eval.head='similarity' needs config.model.text_queries=True",
        ),
        (
            {"model.similarity_heads": False},
            "config.loss.similarity=True needs config.model.similarity_heads=True",
        ),
        (
            {"model.similarity_heads": False, "loss.similarity": False, "eval.head": "similarity"},
            "config.eval.head='similarity' needs config.model.similarity_heads=True",
        ),
        (
            {"data.max_segments": 17},
            "config.data.max_segments=17 exceeds config.model.num_queries=16",
        ),
        ({"model.num_classes": 7}, "config.model.num_classes=7 but config.data.num_classes=8"),
        ({"data.num_classes": 151, "model.num_classes": 151}, "expected 1..150 for 'ade20k'"),
        ({"model.hidden_dim": 66}, "config.model.hidden_dim=66 is not divisible by"),
        ({"model.context_length": 80}, "exceeds the 77 tokens of the tiny text encoder"),
        ({"data.crop_size": (100, 100)}, "both multiples of 32"),
        ({"eval.split": "test"}, "config.eval.split='test': expected one of"),
        ({"train.micro_batches": 3}, "config.train.micro_batches=3"),
        ({"model.attention_impl": "cudnn"}, "needs config.model.dtype='bfloat16'"),
        ({"data.generate.train": 0}, "config.data.generate.train=0"),
    ],
)
def test_checks_across_keys(overrides, message):
  c = train_fixtures.load_config("demo")
  for k, v in overrides.items():
    _set(c, k, v)
  with pytest.raises(errors.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    validate.validate_config(c)


def test_total_steps_follows_train_steps_unless_set():
  c = train_fixtures.load_config("ade20k_r50")
  assert c.optim.total_steps == -1  # the recipes' default: follow train.steps
  c.train.steps = 1000  # e.g. --config.train.steps=1000
  validate.validate_config(c)
  assert c.optim.total_steps == 1000
  demo = train_fixtures.load_config("demo")
  demo.train.steps = 40
  validate.validate_config(demo)
  assert demo.optim.total_steps == 40
  explicit = train_fixtures.load_config("demo")
  explicit.optim.total_steps = 500  # set on purpose: kept
  validate.validate_config(explicit)
  assert explicit.optim.total_steps == 500 and explicit.train.steps == 300


def test_paths_are_checked_before_anything_is_created(tmp_path):
  c = train_fixtures.load_config("demo")
  c.data.generate.enabled = False
  c.data.root = str(tmp_path / "no_data")
  with pytest.raises(errors.ConfigError, match="no_data"):
    validate.check_paths(c)
  root = train_fixtures.make_dataset(tmp_path, num_classes=8, train=1, val=1)
  c.data.root = root
  validate.check_paths(c)
  not_converted = tmp_path / "weights"
  not_converted.mkdir()
  c.init.clip = str(not_converted)
  with pytest.raises(errors.ConfigError, match="config.init.clip=.*no meta.json in it"):
    validate.check_paths(c)
  validate.check_paths(c, init=False)
  workdir = tmp_path / "typo"
  with pytest.raises(errors.CheckpointError, match="no such folder"):
    validate.check_checkpoints(str(workdir))
  assert not workdir.exists()


def test_a_run_stopped_by_a_check_of_the_config_or_data_creates_no_workdir(tmp_path, monkeypatch):
  """Mesh, batch, crop and the training images' headers are checked before anything
  is created in the workdir (the paths too: above)."""
  root = train_fixtures.make_dataset(tmp_path / "data", train=2, val=1)  # 64x80 images
  workdir = tmp_path / "run"

  def assert_stopped(config, error, match):
    with pytest.raises(error, match=match):
      loop.run(config, str(workdir))
    assert not workdir.exists()

  c = train_fixtures.tiny_config(root)
  c.mesh.data = len(jax.devices()) + 1
  assert_stopped(c, errors.MeshConfigError, "config.mesh.data=")

  class ThreeDevices:  # a data axis the batch of 2 does not divide over
    shape = {"data": 3, "model": 1}

  with monkeypatch.context() as m:
    m.setattr(sharding, "make_mesh", lambda cfg, devices=None: ThreeDevices())
    assert_stopped(
        train_fixtures.tiny_config(root, batch=2),
        errors.ConfigError,
        r"config.data.batch_size=2 is not divisible by the mesh's data axis \(3 devices\)",
    )

  c = train_fixtures.tiny_config(root)
  no_pad = [t for t in c.data.transforms if not t.startswith("pad")]
  c.data.transforms = [t.replace("(64, 64)", "(96, 96)") for t in no_pad]
  assert_stopped(c, errors.ConfigError, r"random_crop\(size=\(96, 96\)\) has no pad")

  # A header declaring more than twice PIL's MAX_IMAGE_PIXELS, which PIL refuses with
  # a DecompressionBombError in Image.open: the reader's one line, before the workdir.
  bomb = os.path.join(root, "images", "training", "ADE_train_00000099.jpg")
  with open(bomb, "wb") as f:
    f.write(test_image_decode.png_header(200_000, 100_000))
  c.data.transforms = [t for t in no_pad if not t.startswith("random_resize")]  # fits
  assert_stopped(c, errors.BadSampleError, f"^{bomb}: image too large: declares 20000000000 pixels")
  c.data.on_bad_sample = "skip"
  validate.check_crop(c)  # left to the reader, which skips it


def test_the_data_section_alone_is_validated_as_in_a_run():
  """What the data check validates: every `data.*` key named as validate_config names
  it, on a config with a `data` section alone too; the model is not its concern."""
  config = _load("demo")
  bools = _bools(config)
  data_keys = [k for k in _keys(config) if k.startswith("data.") and k not in bools]
  for key in sorted(set(data_keys) - set(keys.FREE)):
    c = config.copy_and_resolve_references()
    _set(c, key, BAD[key])
    with pytest.raises(errors.ConfigError) as e:
      validate.validate_data_config(c)
    assert f"config.{key}" in str(e.value), (key, str(e.value))
  _set(config, "model.hidden_dim", 66)  # refused by validate_config alone
  validate.validate_data_config(config)
  alone = ml_collections.ConfigDict({"data": recipes.data_config("ade20k", "/data", num_classes=4)})
  validate.validate_data_config(alone)
  alone.data.num_classes = 151
  with pytest.raises(errors.ConfigError, match="config.data.num_classes=151: expected 1..150"):
    validate.validate_data_config(alone)
  folder = ml_collections.ConfigDict({"data": _load("folder").data.to_dict()})
  folder.data.num_classes = -1
  validate.validate_data_config(folder)  # -1: the names of its classes.txt
  assert folder.data.num_classes == 2


def test_every_split_name_of_the_readers_is_accepted():
  for name, splits in (("demo", ("train", "val", "validation")), ("cityscapes_r50", ("test",))):
    for split in splits:
      c = train_fixtures.load_config(name)
      c.eval.split = split
      validate.validate_config(c)

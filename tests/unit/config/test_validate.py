"""validate_config is the one place a bad config value is named: every key of every
config, given a bad value, gives a `ConfigError` naming that key (the CLIs print it
as one `error:` line, tests/integration/test_cli_bad_values.py); the checks across
keys; `optim.total_steps` following `train.steps`; paths checked up front."""

import atexit
import functools
import glob
import os
import shutil
import tempfile

from flax import traverse_util
import pytest

from mtaclip_jax import errors
from mtaclip_jax.config import keys
from mtaclip_jax.config import validate
from mtaclip_jax.data import generate
from tests import train_fixtures

CONFIGS = sorted(
    os.path.basename(p)[:-3] for p in glob.glob(os.path.join(train_fixtures.ROOT, "configs/*.py"))
)

# A bad value for every constrained key.
BAD = {
    "seed": -1,
    "model.backbone": "RN49",
    "model.text_encoder": "MiT-B4",
    "model.backbone_norm": "layer_norm",
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


def test_every_split_name_of_the_readers_is_accepted():
  for name, splits in (("demo", ("train", "val", "validation")), ("cityscapes_r50", ("test",))):
    for split in splits:
      c = train_fixtures.load_config(name)
      c.eval.split = split
      validate.validate_config(c)

"""A tiny training config on a generated dataset, shared by the train/eval tests."""

import contextlib
import fcntl
import importlib.util
import os
import shutil
import struct

import jax

from mtaclip_jax.config import recipes
from mtaclip_jax.data import classes as data_classes
from mtaclip_jax.data import generate
from mtaclip_jax.data import pipeline
from mtaclip_jax.models import mtaclip
from mtaclip_jax.runtime import checkpoint
from mtaclip_jax.runtime import sharding
from mtaclip_jax.train import loop
from mtaclip_jax.train import optim
from mtaclip_jax.train import train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name="demo", arg=None):
  path = os.path.join(ROOT, "configs", name + ".py")
  spec = importlib.util.spec_from_file_location("cfg_" + name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def fake_devices_env(n, **extra):
  """The environment of a subprocess with `n` fake CPU devices: this session's XLA
  flags (tests/conftest.py: fast compilation) kept, the device count added."""
  flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
  return dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **extra)


def make_dataset(out, num_classes=4, train=8, val=2, size=(64, 80), seed=0):
  return generate.write_dataset(
      "ade20k", str(out), {"train": train, "val": val}, seed, size, num_classes
  )


def tiny_config(root, steps=3, batch=2, arg=None, num_classes=4):
  """The demo model made smaller still, on 64x64 crops."""
  c = load_config("demo", arg)
  crop = (64, 64)
  c.model.num_classes = num_classes
  c.model.update(
      dict(
          num_queries=8,
          hidden_dim=32,
          mask_dim=32,
          enc_layers=1,
          enc_ffn_dim=64,
          dec_layers=3,
          dec_ffn_dim=64,
      )
  )
  c.loss.num_points = 256
  # The device matcher keeps host callbacks out of the train step, so the persistent
  # compilation cache (conftest.py) holds it: each later test or subprocess loads it
  # instead of compiling it again (~32 s at -O0). The tests that exercise the default
  # "host" matcher in a whole step set it back.
  c.loss.matcher = "device"
  c.data.update(
      dict(
          root=str(root),
          num_classes=num_classes,
          crop_size=crop,
          batch_size=batch,
          max_segments=num_classes,
          num_workers=0,
          test_scale=(80, 64),
      )
  )
  c.data.transforms = recipes.train_transforms(crop, (80, 64), ratio_range=(0.75, 1.25))
  c.data.generate.enabled = False
  c.train.update(dict(steps=steps, log_every=1, checkpoint_every=steps))
  c.optim.update(dict(total_steps=steps, warmup_steps=1))
  c.eval.update(
      dict(test_scale=(80, 64), crop_size=crop, stride=(32, 32), at_end=False, every_steps=0)
  )
  return c


def setup_training(config, seed=0):
  """(mesh, model, initial state, jitted train step, class tokens) of `config`."""
  mesh = sharding.make_mesh(config.mesh)
  model = mtaclip.build_model(config.model)
  tx = optim.make_optimizer(config.optim)
  tokens = data_classes.class_tokens(config.data, config.model.class_length)
  with jax.set_mesh(mesh):
    state, shard = train_state.init_state_sharded(
        model, tx, config, tokens, jax.random.key(seed), mesh
    )
    step = train_state.jit_train_step(model, tx, config, shard, mesh)
  return mesh, model, state, step, tokens


def init_state(config, seed=0):
  """The initial (sharded) train state of `config`."""
  return setup_training(config, seed)[2]


def abstract_state(config, seed=0):
  """The train state of `config` as shapes and dtypes (nothing is materialised)."""
  model = mtaclip.build_model(config.model)
  tx = optim.make_optimizer(config.optim)
  return train_state.abstract_state(
      model,
      tx,
      config,
      data_classes.class_tokens(config.data, config.model.class_length),
      jax.random.key(seed),
  )


def train_run(config, workdir):
  """`python -m mtaclip_jax.main --mode train` in this process."""
  return loop.run(config, workdir)


def restore_checkpoint(config, workdir, abstract):
  """(step, state, saved config dict, data iterator) of the latest checkpoint in
  `workdir`, as a resumed run restores them."""
  ckpt = checkpoint.Checkpointer(workdir, every=1, max_to_keep=10, async_save=False)
  try:
    step, state, saved = ckpt.restore(abstract, None, config)
  finally:
    ckpt.close()
  # The data position follows from the step (data/pipeline.py).
  data_iter = pipeline.make_train_iterator(config.data, config.data.seed, start_step=step)
  return step, state, saved, data_iter


@contextlib.contextmanager
def _locked(path):
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def shared(name, make):
  """A folder made once per test session by `make(folder)` and shared by every test
  module and pytest-xdist worker (a file lock; tests/conftest.py makes the parent).
  Tests read what is in it and write their outputs elsewhere."""
  base = os.path.join(os.environ["MTACLIP_TEST_SHARED_DIR"], name)
  with _locked(base + ".lock"):
    if not os.path.exists(base + ".done"):
      shutil.rmtree(base, ignore_errors=True)
      os.makedirs(base)
      make(base)
      open(base + ".done", "w").close()
  return base


def trained_tiny(steps=2):
  """(config, workdir, validation image paths) of the tiny model trained `steps` steps
  on a small generated dataset, once per test session (`shared`)."""

  def make(base):
    make_dataset(os.path.join(base, "data"), train=4, val=2)
    train_run(
        tiny_config(os.path.join(base, "data", "ADEChallengeData2016"), steps=steps),
        os.path.join(base, "work"),
    )

  base = shared(f"trained_tiny_{steps}", make)
  root = os.path.join(base, "data", "ADEChallengeData2016")
  val = os.path.join(root, "images", "validation")
  images = sorted(os.path.join(val, f) for f in os.listdir(val))
  return tiny_config(root, steps=steps), os.path.join(base, "work"), images


def tensorboard_scalars(path):
  """{tag: (step, value)} of a TensorBoard event file (TFRecord framing: length,
  its CRC, the event, its CRC)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

  out = {}
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos : pos + 8])
    event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
    pos += 16 + length
    for value in event.summary.value:
      out[value.tag] = (event.step, value.simple_value)
  return out

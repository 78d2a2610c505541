"""The model of a checkpoint for evaluation, prediction and export: its variables
restored into the config's shardings, without the optimizer state or data position."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections

from mtaclip_jax import errors
from mtaclip_jax.config import validate
from mtaclip_jax.data import classes
from mtaclip_jax.models import mtaclip
from mtaclip_jax.runtime import checkpoint
from mtaclip_jax.runtime import sharding


def abstract_variables(model, class_tokens) -> dict:
  """`{"params", "batch_stats"}` of `model` as shapes and dtypes (nothing is
  materialised); the parameters do not depend on the image size."""
  images = jax.ShapeDtypeStruct((1, 128, 128, 3), jnp.float32)
  return jax.eval_shape(
      lambda: model.init(
          {"params": jax.random.key(0)}, jnp.zeros(images.shape), class_tokens, train=False
      )
  )


def run_config(config: ml_collections.ConfigDict | None, workdir: str) -> ml_collections.ConfigDict:
  """The config to predict or export with: `config` (--config) if given, else the one
  the checkpoint in `workdir` was saved with; checked either way."""
  validate.check_checkpoints(workdir)
  if config is None:
    _, saved = checkpoint.saved_config(workdir)
    config = ml_collections.ConfigDict(saved)
    try:
      validate.validate_config(config)
    except errors.ClassListError as e:
      # A folder dataset's names are read from its classes.txt, where it was trained.
      raise errors.ClassListError(
          f"{e}. The checkpoint in {workdir} reads its class names from there "
          f"(config.data.root={config.data.root!r}, saved at training); if the dataset "
          "moved, pass --config with its new root, e.g. --config "
          "configs/folder.py:root=NEW_ROOT,... as it was trained"
      ) from e
    return config
  validate.validate_config(config)
  return config


def check_matches_checkpoint(config, workdir: str, step: int | None = None) -> None:
  """Refuses `config` if the checkpoint was saved with other values of keys that shape
  the model (before anything is built, and without orbax's reports of a failed
  restore)."""
  saved_step, saved = checkpoint.saved_config(workdir, step)
  diffs = checkpoint.layout_differences(saved, checkpoint.config_json(config), both_only=True)
  diffs = [d for d in diffs if not d.startswith("optim.")]  # no optimizer is restored
  if diffs:
    raise errors.CheckpointError(
        f"the checkpoint {os.path.join(os.path.abspath(workdir), 'checkpoints')}/"
        f"{saved_step} was saved with another model than --config: "
        + "; ".join(diffs)
        + ". Pass the config it was trained with, or (predict, export) omit --config to "
        "use the checkpoint's own"
    )


def restore_variables(config, workdir: str, step: int | None = None):
  """(step, model, variables, class_tokens) from the checkpoint in `workdir`,
  restored straight into the shardings of the config's mesh."""
  validate.validate_config(config)
  validate.check_checkpoints(workdir)
  check_matches_checkpoint(config, workdir, step)
  model = mtaclip.build_model(config.model)
  tokens = classes.class_tokens(config.data, config.model.class_length)
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    abstract = abstract_variables(model, tokens)
    shardings = sharding.tree_shardings(abstract, config.mesh, mesh)
    target = sharding.restore_target(abstract, shardings)
    step, variables, _ = checkpoint.restore_variables(workdir, target, step, config)
  return step, model, variables, tokens

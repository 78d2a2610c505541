"""The model of a checkpoint for evaluation, prediction and export: its variables
restored into the config's shardings, without the optimizer state or data iterator."""

from __future__ import annotations

import jax
import jax.numpy as jnp

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


def restore_variables(config, workdir: str, step: int | None = None):
  """(step, model, variables, class_tokens) from the checkpoint in `workdir`,
  restored straight into the shardings of the config's mesh."""
  validate.validate_config(config)
  model = mtaclip.build_model(config.model)
  tokens = classes.class_tokens(config.data, config.model.class_length)
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    abstract = abstract_variables(model, tokens)
    shardings = sharding.tree_shardings(abstract, config.mesh, mesh)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    step, variables, _ = checkpoint.restore_variables(workdir, target, step, config)
  return step, model, variables, tokens

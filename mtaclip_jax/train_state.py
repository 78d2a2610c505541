"""TrainState, its sharded initialisation, and the module-level jitted train step."""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mtaclip_jax import losses, optim, sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any                # full nested params (trainable and frozen)
  batch_stats: Any           # BatchNorm running statistics ({} if none)
  opt_state: Any             # over the flat dict of trainable params only
  rng: jax.Array
  skipped: jax.Array         # updates skipped for non-finite loss (on_nan="skip")

  def variables(self) -> dict:
    v = {"params": self.params}
    if self.batch_stats:
      v["batch_stats"] = self.batch_stats
    return v


def init_image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int, int]:
  # Parameters do not depend on the image size; a small image keeps init cheap.
  return (1, 128, 128, 3)


def create_state(model, tx, config, class_tokens, rng) -> TrainState:
  images = jnp.zeros(init_image_shape(config), jnp.float32)
  init_rng, state_rng = jax.random.split(rng)
  variables = model.init({"params": init_rng}, images, class_tokens, train=False)
  params = variables["params"]
  trainable, _ = optim.split_trainable(params, config.optim)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get("batch_stats", {}),
      opt_state=tx.init(trainable),
      rng=state_rng,
      skipped=jnp.zeros((), jnp.int32))


def abstract_state(model, tx, config, class_tokens, rng) -> TrainState:
  return jax.eval_shape(functools.partial(create_state, model, tx, config),
                        class_tokens, rng)


def state_shardings(abstract: TrainState, config, mesh) -> TrainState:
  return sharding.tree_shardings(abstract, config.mesh, mesh)


def init_state_sharded(model, tx, config, class_tokens, rng, mesh):
  """Initialises the state directly into its shardings (STYLE 3)."""
  abstract = abstract_state(model, tx, config, class_tokens, rng)
  shardings = state_shardings(abstract, config, mesh)
  init = jax.jit(functools.partial(create_state, model, tx, config),
                 out_shardings=shardings)
  return init(class_tokens, rng), shardings


def train_step(state: TrainState, batch: dict, class_tokens: jax.Array, *, model,
               tx: optax.GradientTransformation, config: ml_collections.ConfigDict
               ) -> tuple[TrainState, dict]:
  """One optimizer step. Frozen parameters get no gradient at all."""
  trainable, frozen = optim.split_trainable(state.params, config.optim)
  rng, step_rng = jax.random.split(state.rng)
  step_rng = jax.random.fold_in(step_rng, state.step)
  mutable = ["batch_stats"] if state.batch_stats else []

  def loss_fn(trainable_params):
    params = optim.unflatten({**trainable_params, **frozen})
    variables = {"params": params}
    if state.batch_stats:
      variables["batch_stats"] = state.batch_stats
    outputs, mutated = model.apply(variables, batch["image"], class_tokens,
                                   train=True, mutable=mutable)
    loss, metrics = losses.compute_loss(outputs, batch, step_rng, config.loss,
                                        config.model.num_classes)
    return loss, (metrics, mutated.get("batch_stats", state.batch_stats))

  (loss, (metrics, new_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(trainable)
  updates, new_opt_state = tx.update(grads, state.opt_state, trainable)
  new_trainable = optax.apply_updates(trainable, updates)
  grad_norm = optax.global_norm(grads)
  update_norm = optax.global_norm(updates)
  new_state = state.replace(
      step=state.step + 1,
      params=optim.unflatten({**new_trainable, **frozen}),
      batch_stats=new_stats,
      opt_state=new_opt_state,
      rng=rng)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
  if config.train.on_nan == "skip":
    # Keep the old parameters and optimizer state, count the skip, move on.
    kept = state.replace(step=state.step + 1, rng=rng, skipped=state.skipped + 1)
    new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, kept)
  metrics = dict(metrics)
  metrics.update(loss=loss, grad_norm=grad_norm, finite=finite,
                 lr=optim.learning_rate_schedule(config.optim)(state.step))
  return new_state, metrics


def jit_train_step(model, tx, config, state_shard, mesh):
  """The train step jitted once with explicit shardings and state donation."""
  batch_shard = sharding.batch_sharding(mesh)
  step = functools.partial(train_step, model=model, tx=tx, config=config)
  return jax.jit(step,
                 in_shardings=(state_shard, batch_shard, sharding.replicated(mesh)),
                 out_shardings=(state_shard, sharding.replicated(mesh)),
                 donate_argnums=(0,))

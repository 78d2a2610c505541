"""TrainState, its sharded initialisation, and the module-level jitted train step."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import ml_collections
import optax

from mtaclip_jax.models import mtaclip
from mtaclip_jax.objective import losses
from mtaclip_jax.runtime import sharding
from mtaclip_jax.train import accumulate
from mtaclip_jax.train import optim


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # full nested params (trainable and frozen)
  batch_stats: Any  # BatchNorm running statistics ({} if none)
  opt_state: Any  # over the flat dict of trainable params only
  rng: jax.Array
  skipped: jax.Array  # updates skipped for non-finite loss (on_nan="skip")

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
      skipped=jnp.zeros((), jnp.int32),
  )


def abstract_state(model, tx, config, class_tokens, rng) -> TrainState:
  return jax.eval_shape(functools.partial(create_state, model, tx, config), class_tokens, rng)


@dataclasses.dataclass(frozen=True)
class TracedInit:
  """`create_state` traced once: its abstract result (shapes and dtypes, from which the
  shardings follow) and the initialisation into those shardings, compiled from the
  same trace. Tracing the model's init costs 1-2 s of start-up; this does it once
  instead of once for the shapes and again for the computation."""

  abstract: TrainState
  jaxpr: jax_core.ClosedJaxpr

  def init(self, class_tokens, rng, shardings) -> TrainState:
    tree = jax.tree.structure(self.abstract)

    def create_state_traced(class_tokens, rng):
      return jax.tree.unflatten(tree, jax_core.jaxpr_as_fun(self.jaxpr)(class_tokens, rng))

    return jax.jit(create_state_traced, out_shardings=shardings)(class_tokens, rng)


def trace_init(model, tx, config, class_tokens, rng) -> TracedInit:
  jaxpr, abstract = jax.make_jaxpr(
      functools.partial(create_state, model, tx, config), return_shape=True
  )(class_tokens, rng)
  return TracedInit(abstract, jaxpr)


def state_shardings(abstract: TrainState, config, mesh) -> TrainState:
  return sharding.tree_shardings(abstract, config.mesh, mesh)


def init_state(model, tx, config, class_tokens, rng, shardings) -> TrainState:
  """Initialises the state directly into `shardings`: no parameter is ever whole on
  one device first."""
  init = jax.jit(functools.partial(create_state, model, tx, config), out_shardings=shardings)
  return init(class_tokens, rng)


def init_state_sharded(model, tx, config, class_tokens, rng, mesh):
  """`init_state` into the config's shardings -> (state, shardings)."""
  traced = trace_init(model, tx, config, class_tokens, rng)
  shardings = state_shardings(traced.abstract, config, mesh)
  return traced.init(class_tokens, rng, shardings), shardings


def _loss(
    trainable,
    frozen,
    stats,
    batch,
    class_tokens,
    rng,
    *,
    model,
    config,
    text_embeddings=None,
    normalizers=None,
):
  """The training loss of `batch` -> (loss, (metrics, updated BatchNorm statistics))."""
  variables = {"params": optim.unflatten({**trainable, **frozen})}
  if stats:
    variables["batch_stats"] = stats
  outputs, mutated = model.apply(
      variables,
      batch["image"],
      class_tokens,
      train=True,
      text_embeddings=text_embeddings,
      mutable=["batch_stats"] if stats else [],
  )
  loss, metrics = losses.compute_loss(
      outputs, batch, rng, config.loss, config.model.num_classes, normalizers=normalizers
  )
  return loss, (metrics, mutated.get("batch_stats", stats))


def train_step(
    state: TrainState,
    batch: dict,
    class_tokens: jax.Array,
    *,
    model,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
) -> tuple[TrainState, dict]:
  """One optimizer step. Frozen parameters get no gradient at all."""
  trainable, frozen = optim.split_trainable(state.params, config.optim)
  rng, step_rng = jax.random.split(state.rng)
  step_rng = jax.random.fold_in(step_rng, state.step)
  micro_batches = int(config.train.get("micro_batches", 1))
  if micro_batches > 1:
    (loss, (metrics, new_stats)), grads = _accumulated_value_and_grad(
        state,
        batch,
        class_tokens,
        trainable,
        frozen,
        step_rng,
        micro_batches,
        model=model,
        config=config,
    )
  else:
    (loss, (metrics, new_stats)), grads = jax.value_and_grad(_loss, has_aux=True)(
        trainable,
        frozen,
        state.batch_stats,
        batch,
        class_tokens,
        step_rng,
        model=model,
        config=config,
    )
  updates, new_opt_state = tx.update(grads, state.opt_state, trainable)
  new_trainable = optax.apply_updates(trainable, updates)
  grad_norm = optax.global_norm(grads)
  update_norm = optax.global_norm(updates)
  new_state = state.replace(
      step=state.step + 1,
      params=optim.unflatten({**new_trainable, **frozen}),
      batch_stats=new_stats,
      opt_state=new_opt_state,
      rng=rng,
  )
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
  if config.train.on_nan == "skip":
    # Keep the old parameters and optimizer state, count the skip, move on.
    kept = state.replace(step=state.step + 1, rng=rng, skipped=state.skipped + 1)
    new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, kept)
  metrics = dict(metrics)
  metrics.update(
      loss=loss,
      grad_norm=grad_norm,
      finite=finite,
      lr=optim.learning_rate_schedule(config.optim)(state.step),
  )
  return new_state, metrics


def _is_text(path: str) -> bool:
  return path == "contexts" or path.startswith("text_encoder/")


def _accumulated_value_and_grad(
    state, batch, class_tokens, trainable, frozen, step_rng, micro_batches, *, model, config
):
  """`_loss`'s value and gradient over `micro_batches` micro-batches (train/accumulate.py):
  the prompted text tower once per step, the losses normalised by the whole batch."""
  norms = losses.batch_normalizers(
      batch["valid"], config.model.num_queries, config.loss.no_object_weight
  )
  text_trainable = {k: v for k, v in trainable.items() if _is_text(k)}
  text_frozen = {k: v for k, v in frozen.items() if _is_text(k)}
  rest = {k: v for k, v in trainable.items() if not _is_text(k)}

  def text_fn(text_params):
    variables = {"params": optim.unflatten({**text_params, **text_frozen})}
    return mtaclip.encode_classes(model, variables, class_tokens)

  def micro_loss(params, t0, micro, index, stats):
    return _loss(
        params,
        frozen,
        stats,
        micro,
        class_tokens,
        jax.random.fold_in(step_rng, index),
        model=model,
        config=config,
        text_embeddings=t0,
        normalizers=norms,
    )

  text = dict(text_fn=text_fn, text_params=text_trainable) if model.text_queries else {}
  out, (grads, text_grads) = accumulate.value_and_grad(
      micro_loss, rest, accumulate.split(batch, micro_batches), state.batch_stats, **text
  )
  return out, {**grads, **(text_grads or {})}


def jit_train_step(model, tx, config, state_shard, mesh):
  """The train step jitted once with explicit shardings and state donation."""
  batch_shard = sharding.batch_sharding(mesh)
  step = functools.partial(train_step, model=model, tx=tx, config=config)
  return jax.jit(
      step,
      in_shardings=(state_shard, batch_shard, sharding.replicated(mesh)),
      out_shardings=(state_shard, sharding.replicated(mesh)),
      donate_argnums=(0,),
  )

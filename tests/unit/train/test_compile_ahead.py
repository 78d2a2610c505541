"""compile_ahead.AheadOfTimeStep: the step compiled in a thread gives the jitted
step's results, and anything it was not compiled for falls back to the jitted step."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtaclip_jax.runtime import sharding
from mtaclip_jax.train import compile_ahead


def _setup(batch_shape=(4, 3)):
  mesh = jax.make_mesh((1,), ("data",))
  rep = sharding.replicated(mesh)
  calls = []

  def step(state, batch, tokens):
    calls.append("traced")
    return ({"w": state["w"] + jnp.sum(batch["x"]) * tokens}, {"loss": jnp.sum(state["w"])})

  jitted = jax.jit(
      step,
      in_shardings=({"w": rep}, sharding.batch_sharding(mesh), rep),
      out_shardings=({"w": rep}, rep),
  )
  abstract = {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}
  spec = {"x": jax.ShapeDtypeStruct(batch_shape, jnp.float32)}
  tokens = jnp.float32(2.0)
  ahead = compile_ahead.AheadOfTimeStep(jitted, abstract, {"w": rep}, spec, tokens, mesh)
  state = jax.device_put({"w": jnp.ones(2, jnp.float32)}, {"w": rep})
  return ahead, jitted, state, tokens, calls, mesh


def test_ahead_gives_the_jitted_results_and_compiles_once():
  ahead, jitted, state, tokens, calls, _ = _setup()
  batch = {"x": jnp.arange(12.0).reshape(4, 3)}
  got, m = ahead(state, batch, tokens)
  want, m2 = jitted(state, batch, tokens)
  np.testing.assert_array_equal(got["w"], want["w"])
  assert float(m["loss"]) == float(m2["loss"])
  ahead(got, batch, tokens)  # later steps use the executable compiled ahead
  assert ahead._compiled is not None and len(calls) == 2  # ahead + the direct jit call


def test_another_batch_shape_falls_back_to_the_jitted_step():
  ahead, jitted, state, tokens, _, _ = _setup()
  batch = {"x": jnp.ones((8, 3))}  # not what the config described
  got, _ = ahead(state, batch, tokens)
  np.testing.assert_array_equal(got["w"], jitted(state, batch, tokens)[0]["w"])


def test_a_failed_ahead_compile_falls_back(caplog):
  mesh = jax.make_mesh((1,), ("data",))
  rep = sharding.replicated(mesh)
  jitted = jax.jit(lambda s, b, t: (s, {"loss": jnp.dot(b["x"], jnp.ones(3))}))
  abstract = {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}
  bad_spec = {"x": jax.ShapeDtypeStruct((2,), jnp.float32)}  # dot with 3: lowering fails
  ahead = compile_ahead.AheadOfTimeStep(
      jitted, abstract, {"w": rep}, bad_spec, jnp.float32(1.0), mesh
  )
  _, m = ahead({"w": jnp.ones(2)}, {"x": jnp.ones(3)}, jnp.float32(1.0))
  assert float(m["loss"]) == 3.0
  assert "compiling the train step ahead failed" in caplog.text


def test_batch_spec_is_the_contract_batch():
  config = ml_collections.ConfigDict(
      {"data": {"batch_size": 4, "crop_size": (32, 48), "max_segments": 5}}
  )
  spec = compile_ahead.batch_spec(config)
  assert {k: (v.shape, v.dtype.name) for k, v in spec.items()} == {
      "image": ((4, 32, 48, 3), "float32"),
      "label": ((4, 32, 48), "int32"),
      "masks": ((4, 5, 32, 48), "uint8"),
      "classes": ((4, 5), "int32"),
      "valid": ((4, 5), "bool"),
  }

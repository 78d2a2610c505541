"""Gradient accumulation (accumulate.py): micro-batches give the whole batch's loss and
gradient, the prompted text tower included, and the train step runs with them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtaclip_jax import errors
from mtaclip_jax.config import validate
from mtaclip_jax.data import classes as data_classes
from mtaclip_jax.models import mtaclip
from mtaclip_jax.objective import losses
from mtaclip_jax.objective.matching import hungarian
from mtaclip_jax.train import accumulate
from mtaclip_jax.train import optim
from tests import train_fixtures
from tests.parity.test_losses import loss_config
from tests.parity.test_losses import make_problem


def test_split_interleaves_images_and_names_a_bad_count():
  parts = accumulate.split({"x": jnp.arange(12).reshape(6, 2)}, 2)["x"]
  np.testing.assert_array_equal(parts[:, :, 0], [[0, 4, 8], [2, 6, 10]])
  with pytest.raises(ValueError, match="batch of 6 does not split into 4"):
    accumulate.split(jnp.zeros((6, 3)), 4)


def _slice_points(points, index, n):
  return {k: v[:, index::n] for k, v in points.items()}


def test_micro_batch_losses_add_up_to_the_batch_loss():
  """Same points: the micro-batch losses with the whole batch's normalizers sum to the
  whole batch's loss, term by term, and so do their gradients."""
  cfg = loss_config()
  outputs, batch = make_problem(3, b=4, q=10, t=5)
  outputs = jax.tree.map(jnp.asarray, outputs)
  points = losses.draw_points(jax.random.key(1), 2, 4, 5, cfg)
  whole = lambda o: losses.compute_loss(o, batch, None, cfg, 7, points=points)
  (want, want_m), want_g = jax.jit(jax.value_and_grad(whole, has_aux=True))(outputs)
  norms = losses.batch_normalizers(batch["valid"], 10, cfg.no_object_weight)
  got, got_m = 0.0, {}
  got_g = jax.tree.map(jnp.zeros_like, outputs)
  for i in range(2):
    o_i = {k: v[:, i::2] for k, v in outputs.items()}
    b_i = {k: v[i::2] for k, v in batch.items()}
    part = lambda o, b_i=b_i, i=i: losses.compute_loss(
        o, b_i, None, cfg, 7, points=_slice_points(points, i, 2), normalizers=norms
    )
    (loss, m), g = jax.jit(jax.value_and_grad(part, has_aux=True))(o_i)
    got += loss
    got_m = {k: got_m.get(k, 0.0) + v for k, v in m.items()}
    got_g = {k: got_g[k].at[:, i::2].set(g[k]) for k in got_g}
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for k in want_m:
    np.testing.assert_allclose(got_m[k], want_m[k], rtol=1e-5, atol=1e-7, err_msg=k)
  for k in want_g:
    np.testing.assert_allclose(got_g[k], want_g[k], rtol=1e-4, atol=1e-7, err_msg=k)


def test_batch_normalizers_match_the_matcher():
  """class_weights = the sum of the class weights compute_loss derives from the matches."""
  cfg = loss_config()
  outputs, batch = make_problem(5, b=3, q=10, t=5)
  norms = losses.batch_normalizers(batch["valid"], 10, cfg.no_object_weight)
  points = losses.draw_points(jax.random.key(0), 2, 3, 5, cfg)
  indices = np.asarray(
      jax.jit(lambda o, p: hungarian.match(o, batch, p, cfg))(
          jax.tree.map(jnp.asarray, outputs), points["match"]
      )
  )
  _, matched = losses.query_targets(indices, batch["classes"], batch["valid"], 10, 7)
  weights = np.where(matched, 1.0, cfg.no_object_weight).sum(axis=(1, 2))
  np.testing.assert_allclose(weights, float(norms["class_weights"]), rtol=1e-6)
  assert float(norms["num_masks"]) == batch["valid"].sum()


def _tiny(tmp_path, arg=None, batch=4):
  config = train_fixtures.tiny_config(tmp_path, batch=batch, arg=arg)
  config.model.dec_layers = 1  # compile time
  model = mtaclip.build_model(config.model)
  tokens = data_classes.class_tokens(config.data, config.model.class_length)
  return config, model, tokens


def _fake_batch(b, size, t, seed=0):
  rng = np.random.default_rng(seed)
  valid = rng.random((b, t)) < 0.8
  valid[:, 0] = True
  return {
      "image": jnp.asarray(rng.normal(size=(b, size, size, 3)).astype(np.float32)),
      "masks": jnp.asarray((rng.random((b, t, size, size)) < 0.3).astype(np.uint8)),
      "classes": jnp.asarray(np.where(valid, rng.integers(0, 4, (b, t)), 255), jnp.int32),
      "valid": jnp.asarray(valid),
  }


def test_accumulated_gradient_is_the_whole_batch_gradient(tmp_path):
  """Tiny MTA-CLIP, same points: two micro-batches with the text tower run once give
  the whole batch's loss and the gradient of every parameter, contexts included."""
  config, model, tokens = _tiny(tmp_path)
  b, t = 4, config.data.max_segments
  batch = _fake_batch(b, 64, t)
  variables = jax.jit(model.init)(jax.random.key(0), batch["image"][:1], tokens)
  params = optim.flatten(variables["params"])
  stats = variables["batch_stats"]
  text = {k: v for k, v in params.items() if k == "contexts" or k.startswith("text_encoder/")}
  rest = {k: v for k, v in params.items() if k not in text}
  layers = jax.eval_shape(lambda v: model.apply(v, batch["image"], tokens), variables)[
      "logits"
  ].shape[0]
  points = losses.draw_points(jax.random.key(2), layers, b, t, config.loss)
  lc, nc = config.loss, config.model.num_classes

  def whole(p):
    out = model.apply({"params": optim.unflatten(p), "batch_stats": stats}, batch["image"], tokens)
    return losses.compute_loss(out, batch, None, lc, nc, points=points)[0]

  want, want_g = jax.jit(jax.value_and_grad(whole))(params)
  norms = losses.batch_normalizers(batch["valid"], config.model.num_queries, lc.no_object_weight)

  def micro_loss(p, t0, micro, index, carry):
    out = model.apply(
        {"params": optim.unflatten(p), "batch_stats": stats},
        micro["image"],
        tokens,
        text_embeddings=t0,
    )
    pts = jax.tree.map(
        lambda x: jax.lax.dynamic_index_in_dim(
            x.reshape((x.shape[0], b // 2, 2) + x.shape[2:]), index, 2, keepdims=False
        ),
        points,
    )
    return losses.compute_loss(out, micro, None, lc, nc, points=pts, normalizers=norms)[0], (
        {},
        carry,
    )

  def text_fn(tp):
    return mtaclip.encode_classes(model, {"params": optim.unflatten(tp)}, tokens)

  run = jax.jit(
      lambda r, tp: accumulate.value_and_grad(
          micro_loss, r, accumulate.split(batch, 2), {}, text_fn=text_fn, text_params=tp
      )
  )
  (got, _), (g_rest, g_text) = run(rest, text)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  got_g = {**g_rest, **g_text}
  assert set(got_g) == set(want_g)
  assert float(jnp.abs(want_g["contexts"]).max()) > 0
  # fp32, tolerance 2e-4 of each parameter's largest gradient, or 1e-6 of the largest
  # of all (for gradients that are zero but for rounding, e.g. attention key biases).
  top = max(float(jnp.abs(g).max()) for g in want_g.values())
  for k in want_g:
    scale = float(jnp.abs(want_g[k]).max())
    np.testing.assert_allclose(
        got_g[k], want_g[k], rtol=0, atol=max(2e-4 * scale, 1e-6 * top), err_msg=k
    )


def _step(config, batch):
  """One jitted train step from the initial state -> (loss, grad norm, changed params)."""
  mesh, _, state, step, tokens = train_fixtures.setup_training(config)
  before = {k: np.asarray(v) for k, v in optim.flatten(state.params).items()}
  with jax.set_mesh(mesh):
    new, metrics = step(state, batch, tokens)
  after = optim.flatten(new.params)
  changed = {k for k in before if not np.array_equal(before[k], np.asarray(after[k]))}
  return float(metrics["loss"]), float(metrics["grad_norm"]), changed


def test_train_step_with_micro_batches(tmp_path):
  """MTA-CLIP, micro_batches=2 on a batch of 4: the same parameters train as in the
  one-batch step (the contexts included) and the loss is close to its loss (only the
  random points differ)."""
  config, _, _ = _tiny(tmp_path)
  batch = _fake_batch(4, 64, config.data.max_segments)
  loss1, _, changed1 = _step(config, batch)
  config.train.micro_batches = 2
  loss2, grad_norm2, changed2 = _step(config, batch)
  assert np.isfinite(grad_norm2) and "contexts" in changed2
  assert changed1 == changed2
  np.testing.assert_allclose(loss2, loss1, rtol=0.15)


def test_baseline_train_step_with_micro_batches(tmp_path):
  config, _, _ = _tiny(tmp_path, arg="baseline")
  config.train.micro_batches = 4
  loss, grad_norm, changed = _step(config, _fake_batch(4, 64, config.data.max_segments))
  assert np.isfinite(loss) and np.isfinite(grad_norm) and grad_norm > 0
  assert any(k.startswith("decoder/") for k in changed)
  assert any(k.startswith("backbone/") for k in changed)


def test_micro_batches_that_do_not_divide_the_batch_are_named(tmp_path):
  config, _, _ = _tiny(tmp_path, batch=4)
  config.train.micro_batches = 3
  mesh = jax.make_mesh((1, 1), ("data", "model"))
  with pytest.raises(errors.ConfigError, match=r"micro_batches=3.*batch of 4"):
    validate.check_batch(config, mesh)

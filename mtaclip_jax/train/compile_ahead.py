"""The train step compiled in a background thread while the state initialises.

Compiled at its first call, the step would wait for the state's initialisation (itself
a compile of every initialiser: 30 s on 2 CPU cores, 60-100 s on a GPU host).
`AheadOfTimeStep` lowers and compiles the jitted step for the abstract state and the
batch the config describes in a thread as soon as the state's shardings are known, so
the two compiles overlap: time to the first step 59.7 -> 52.3 s on 2 CPU cores
(`python -m benchmarks.startup [--overlap]`, 256x256 baseline; docs/BENCHMARKS.md).
A batch or state of another shape or sharding than compiled for falls back to the
jitted step, which compiles on demand, so results never depend on it. Callers `wait()`
before the process may end (train.loop.run does, on errors too): the interpreter's
shutdown under a compiling thread aborts.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)


def batch_spec(config) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch the train iterator yields (docs/CONTRACT.md, batch)."""
  b = int(config.data.batch_size)
  h, w = (int(s) for s in config.data.crop_size)
  t = int(config.data.max_segments)
  return {
      "image": jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32),
      "label": jax.ShapeDtypeStruct((b, h, w), jnp.int32),
      "masks": jax.ShapeDtypeStruct((b, t, h, w), jnp.uint8),
      "classes": jax.ShapeDtypeStruct((b, t), jnp.int32),
      "valid": jax.ShapeDtypeStruct((b, t), jnp.bool_),
  }


def _avals(tree) -> Any:
  return jax.tree.map(lambda x: (tuple(x.shape), x.dtype), tree)


class AheadOfTimeStep:
  """Callable as the jitted step: `(state, batch, class_tokens) -> (state, metrics)`."""

  def __init__(
      self,
      step_fn: Callable,
      abstract_state,
      state_shardings,
      batch: dict[str, jax.ShapeDtypeStruct],
      class_tokens,
      mesh,
  ):
    self._step_fn = step_fn
    self._state_avals = _avals(abstract_state)
    self._state_shardings = state_shardings
    self._batch_avals = _avals(batch)
    self._compiled = None
    self._checked_state = False
    self._error: BaseException | None = None

    def compile_step():
      try:
        with jax.set_mesh(mesh):
          self._compiled = step_fn.lower(abstract_state, batch, class_tokens).compile()
      except BaseException as e:  # pylint: disable=broad-except
        self._error = e

    self._thread = threading.Thread(target=compile_step, name="compile_train_step", daemon=True)
    self._thread.start()

  def wait(self) -> None:
    """Until the background compile has ended. A process must not exit while it
    runs: the interpreter's shutdown under a compiling thread aborts (SIGABRT)."""
    self._thread.join()

  def _state_matches(self, state) -> bool:
    if _avals(state) != self._state_avals:
      return False
    pairs = zip(jax.tree.leaves(state), jax.tree.leaves(self._state_shardings))
    return all(
        getattr(x, "sharding", None) is not None and x.sharding.is_equivalent_to(s, x.ndim)
        for x, s in pairs
    )

  def __call__(self, state, batch, class_tokens):
    if not self._checked_state:
      self._thread.join()
      self._checked_state = True
      if self._error is not None:
        log.warning("compiling the train step ahead failed (%s); compiling it now", self._error)
        self._compiled = None
      elif not self._state_matches(state):
        log.info("the state differs from the one compiled for; compiling the step now")
        self._compiled = None
    if self._compiled is not None and _avals(batch) == self._batch_avals:
      return self._compiled(state, batch, class_tokens)
    return self._step_fn(state, batch, class_tokens)

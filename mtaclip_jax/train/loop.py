"""The training loop: data -> sharded train step -> logs, checkpoints, evaluation.

`run(config, workdir)` is what `python -m mtaclip_jax.main --mode train` calls, in
each process of a multi-process run alike. A restart with the same command resumes
from the latest checkpoint (state, RNG, and the data position, which follows from the
step), bit-exact on CPU; also on another number of processes or devices
(docs/SCALING.md).
"""

from __future__ import annotations

import logging
import time

import jax
import ml_collections
import numpy as np

from mtaclip_jax import errors
from mtaclip_jax.config import validate
from mtaclip_jax.models import mtaclip
from mtaclip_jax.runtime import checkpoint
from mtaclip_jax.runtime import distributed
from mtaclip_jax.runtime import sharding
from mtaclip_jax.train import compile_ahead
from mtaclip_jax.train import optim
from mtaclip_jax.train import pretrained
from mtaclip_jax.train import services
from mtaclip_jax.train import train_state

log = logging.getLogger(__name__)


def _host_metrics(metrics: dict) -> dict:
  return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains per `config`; returns the last logged metrics (and eval results)."""
  # Every process makes the checks; when one fails anywhere, all stop with its error.
  # Those of the config and the data come before the workdir is created, so that a
  # run they stop leaves nothing behind.
  with distributed.agreed("start-up checks"):
    validate.validate_config(config)
    validate.check_pretrained(config)
    validate.check_paths(config)
    mesh = sharding.make_mesh(config.mesh)
    validate.check_batch(config, mesh)
    # Process 0 generates a demo dataset; the others wait for it at the block's end.
    rt = services.Runtime(config, workdir, mesh)
  with distributed.agreed("dataset checks"):
    validate.check_crop(config)
    class_tokens = rt.class_tokens()
    data_iter = rt.train_iterator()  # a bad dataset is named before anything compiles
  with distributed.agreed("workdir checks"):
    validate.check_workdir(workdir)  # the first thing created in the workdir

  model = mtaclip.build_model(config.model)
  tx = optim.make_optimizer(config.optim)
  rng = jax.random.key(config.seed)
  with jax.set_mesh(mesh):
    traced_init = train_state.trace_init(model, tx, config, class_tokens, rng)
    abstract = traced_init.abstract
    state_shard = train_state.state_shardings(abstract, config, mesh)
    # The step compiles in a thread while the state initialises (train/compile_ahead.py).
    step_fn = compile_ahead.AheadOfTimeStep(
        train_state.jit_train_step(model, tx, config, state_shard, mesh),
        abstract,
        state_shard,
        compile_ahead.batch_spec(config),
        class_tokens,
        mesh,
    )
  try:
    return _train(
        config,
        workdir,
        rt,
        mesh,
        model,
        class_tokens,
        rng,
        traced_init,
        state_shard,
        step_fn,
        data_iter,
    )
  finally:
    step_fn.wait()  # an error before the first step ends the process only after it
    # Stops grain's prefetch processes and frees the shared memory of the batches
    # they prepared (else Python's resource_tracker reports it leaked at exit).
    data_iter.close()


def _train(
    config,
    workdir,
    rt,
    mesh,
    model,
    class_tokens,
    rng,
    traced_init,
    state_shard,
    step_fn,
    data_iter,
) -> dict:
  ckpt = checkpoint.Checkpointer(
      workdir, every=config.train.checkpoint_every, max_to_keep=config.train.max_to_keep
  )
  start = 0
  if ckpt.latest_step() is None:
    with jax.set_mesh(mesh):
      state = traced_init.init(class_tokens, rng, state_shard)
      state = pretrained.load_pretrained(state, config, model)
  else:
    # A checkpoint holds every value of the state, so a resumed run neither initialises
    # nor reads the pretrained weights: the arrays are read straight into this mesh's
    # shardings (on a pod, no process compiles the init).
    target = sharding.restore_target(traced_init.abstract, state_shard)
    try:
      start, state, _ = ckpt.restore(target, config=config)
      rt.resume_data(ckpt, start, data_iter)
    except errors.CheckpointError:
      ckpt.close()  # let orbax's threads finish before the error ends the process
      raise
    log.info("resumed from %s at step %d", ckpt.directory, start)
  total = int(config.train.steps)
  writer = rt.metric_writer()
  last: dict = {}
  pending = None  # metrics of the step before, fetched while this one runs
  # The first step's collectives start together: on CPU (gloo) their first call
  # fails if a process arrives 30 s after another, e.g. one still compiling.
  step_fn.wait()
  distributed.barrier("train step compiled")
  t0, t_last = time.time(), time.time()
  batch_size = config.data.batch_size
  with distributed.Preemption() as preempt, jax.set_mesh(mesh), ckpt.abandon_on_save_error():
    if start and _eval_due(config, start) and not rt.has_eval_results(start):
      # The run was killed while evaluating this checkpoint's step: evaluate it now.
      rt.evaluate(model, state, class_tokens, start, writer)
    bar = rt.progress(start, total)
    step = start
    while step < total:
      batch = sharding.global_batch(next(data_iter), mesh, batch_size)
      state, metrics = step_fn(state, batch, class_tokens)
      step += 1
      stop = preempt.stop(step)  # the same step on every process
      if pending is not None:
        last = _check_and_log(pending, rt, writer, bar, config, ckpt, t_last)
        t_last = time.time()
      pending = (step, metrics)
      if step % config.train.checkpoint_every == 0 or step == total or stop:
        last = _check_and_log(pending, rt, writer, bar, config, ckpt, t_last)
        pending = None
        ckpt.save(step, state, rt.data_position(step, data_iter), config, force=True)
      if _eval_due(config, step):
        # The step's checkpoint is complete before its evaluation starts, so a run
        # killed mid-evaluation resumes at this step and evaluates it again.
        ckpt.wait()
        rt.evaluate(model, state, class_tokens, step, writer)
      if stop:
        ckpt.close()
        bar.close()
        log.warning("stopped at step %d after SIGTERM; restart to resume", step)
        return last
    bar.close()
  ckpt.close()
  results = dict(last)
  if config.eval.get("at_end", True):
    results.update(rt.evaluate(model, state, class_tokens, total, writer))
  rt.print_summary(time.time() - t0)
  writer.close()
  return results


def _eval_due(config, step: int) -> bool:
  every = config.eval.every_steps
  return bool(every) and step % every == 0 and step < config.train.steps


def _check_and_log(pending, rt, writer, bar, config, ckpt, t_last) -> dict:
  step, metrics = pending
  m = _host_metrics(metrics)
  if not m.get("finite", 1.0) and config.train.on_nan == "stop":
    terms = ", ".join(f"{k}={v:.4g}" for k, v in sorted(m.items()))
    ckpt.wait()
    raise errors.NonFiniteLossError(
        f"non-finite loss or gradient at step {step} ({terms}); the last good "
        f"checkpoint ({ckpt.latest_step()}) in {ckpt.directory} is kept. Lower the "
        f"learning rate, check the data, or set --config.train.on_nan=skip"
    )
  bar.update(step - bar.n)
  if step % config.train.log_every == 0 or step == config.train.steps:
    m["step_time"] = time.time() - t_last
    rt.log_metrics(writer, step, m, bar)
  return m

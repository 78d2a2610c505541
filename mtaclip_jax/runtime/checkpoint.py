"""One orbax CheckpointManager for train state + data position + config.

Layout: `WORKDIR/checkpoints/<step>/{state,data_position,config}`. The state is saved
sharded by every process and restored into any mesh (other process and device
counts, FSDP on or off); `data_position` records where the run stands in the global
data order (data/pipeline.py), which follows from the step. Checkpoints of earlier
versions hold a `data` item instead: grain's iterator state per process
(`data/process_I-of-N.json`), see `data_position`. Orbax writes each step to a
temporary directory and renames it when complete, so a kill mid-save never leaves a
half checkpoint that looks finished. Restore takes the latest step whose parts all
read back; a damaged one is reported by name and the previous one is used. A save
that fails (disk full, quota, permissions) leaves only a temporary folder, removed at
the next start; it is reported as `errors.CheckpointSaveError` naming the folder, the step
that is intact and what to do.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import Any

from absl import flags
from flax import traverse_util
import jax
import ml_collections
import orbax.checkpoint as ocp

from mtaclip_jax import errors

log = logging.getLogger(__name__)


def _damaged_name(directory: str, step: int) -> str:
  return os.path.join(directory, f"damaged_step_{step}_{int(time.time())}")


def _config_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


# Config keys that shape the saved train state (its tree and array shapes): every
# model key but those that only change how it computes or initialises, the number of
# classes, and the rules that freeze parameters (a frozen parameter has no optimizer
# state).
_LAYOUT_KEYS = ("model.", "data.num_classes", "optim.lr_mult_rules")
_COMPUTE_ONLY_KEYS = (
    "model.deform_attn_impl",
    "model.attention_impl",
    "model.dtype",
    "model.gamma_init",
    "model.context_init",
)


def layout_differences(saved: dict, current: dict, both_only: bool = False) -> list[str]:
  """'key: value in the checkpoint vs now' for each config key that shapes the train
  state and differs between a checkpoint's saved config and the current one (both
  as JSON dicts). `both_only`: only keys both configs have (a checkpoint written
  before a key existed is not refused for lacking it)."""
  a, b = (traverse_util.flatten_dict(d, sep=".") for d in (saved, current))
  out = []
  for key in sorted(set(a) & set(b) if both_only else set(a) | set(b)):
    if key.startswith(_COMPUTE_ONLY_KEYS):
      continue
    if key.startswith(_LAYOUT_KEYS) and a.get(key, "(unset)") != b.get(key, "(unset)"):
      out.append(
          f"{key}: {json.dumps(a.get(key, '(unset)'))} in the checkpoint, "
          f"{json.dumps(b.get(key, '(unset)'))} now"
      )
  return out


def _coordination_barriers() -> None:
  """Orbax's barriers through jax's coordination service, not device collectives, in
  multi-process runs (on CPU a collective's first call gives the processes only 30 s
  to arrive; runtime/distributed.py)."""
  if jax.process_count() > 1 and "experimental_orbax_use_distributed_barrier" in flags.FLAGS:
    flags.FLAGS.experimental_orbax_use_distributed_barrier = True


class Checkpointer:
  """Saves/restores {state, data position, config} together, every N steps."""

  def __init__(self, workdir: str, *, every: int, max_to_keep: int, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.every = int(every)
    self._saving = None  # step of the save that may still be in flight
    _coordination_barriers()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=options,
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
            "data_position": ocp.JsonCheckpointHandler(),
        },
    )

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(
      self,
      step: int,
      state: Any,
      data_position: dict | None,
      config: ml_collections.ConfigDict,
      force: bool = False,
  ) -> bool:
    """Starts saving `step` (asynchronously); an error of this save or of the one
    still in flight is raised as `errors.CheckpointSaveError`."""
    args = {
        "state": ocp.args.StandardSave(state),
        "config": ocp.args.JsonSave(_config_json(config)),
    }
    if data_position is not None:
      args["data_position"] = ocp.args.JsonSave(dict(data_position))
    try:
      # Orbax waits for the previous save first and re-raises its error here.
      self.manager.wait_until_finished()
      self._saving = step
      saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(e) from e
    return saved

  def wait(self):
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(e) from e
    self._saving = None

  def close(self):
    with self.abandon_on_save_error():
      self.wait()
    self.manager.close()

  @contextlib.contextmanager
  def abandon_on_save_error(self):
    """After a failed save, stops orbax's threads without waiting on the failed
    write again, and lets the error through."""
    try:
      yield
    except errors.CheckpointSaveError:
      try:
        self.manager.close()
      except Exception:  # pylint: disable=broad-except
        pass
      raise

  def _save_error(self, error: Exception) -> errors.CheckpointSaveError:
    try:
      self.manager.reload()
      complete = [s for s in self.all_steps() if s != self._saving]
    except Exception:  # pylint: disable=broad-except
      complete = []
    last = (
        f"the last complete checkpoint, step {complete[-1]}, is intact"
        if complete
        else "no complete checkpoint exists yet"
    )
    # One line: tensorstore's messages can carry a whole Python traceback after it.
    what = (str(error).strip().splitlines() or [""])[0][:500]
    return errors.CheckpointSaveError(
        f"cannot write checkpoint step {self._saving} to {self.directory} "
        f"({type(error).__name__}: {what}); {last}. If the disk is full, "
        "free space there (or fix the folder's permissions) and run the same command "
        "again: training resumes from the last complete checkpoint"
    )

  def _set_aside(self, steps: list[int]) -> None:
    """Moves damaged step folders out of the way (kept, renamed) so the run can save
    those steps again; orbax ignores folders whose names are not step numbers."""
    for step in steps:
      src = os.path.join(self.directory, str(step))
      if os.path.isdir(src):
        dst = _damaged_name(self.directory, step)
        os.rename(src, dst)
        log.warning("moved damaged checkpoint %s to %s", src, dst)
    self.manager.reload()

  def restore(
      self,
      abstract_state: Any,
      step: int | None = None,
      config: ml_collections.ConfigDict | None = None,
  ) -> tuple[int, Any, dict]:
    """Restores (step, state, config dict) into the shardings of `abstract_state`
    (any mesh: the arrays are resharded as they are read).

    `step=None` takes the latest readable checkpoint, falling back to older ones
    with a warning naming what was wrong. `config` (the run's) lets the error when
    nothing can be restored name the config keys that differ from the checkpoint's.
    The data position is read separately (`data_position`).
    """
    steps = self.all_steps()
    if not steps:
      raise errors.CheckpointError(f"no checkpoint in {self.directory}")
    if step is not None:
      if step not in steps:
        raise errors.CheckpointError(
            f"checkpoint step {step} not found in {self.directory}; available: {steps}"
        )
      candidates = [step]
    else:
      candidates = steps[::-1]
    problems = []
    for s in candidates:
      try:
        args = {"state": ocp.args.StandardRestore(abstract_state), "config": ocp.args.JsonRestore()}
        restored = self.manager.restore(s, args=ocp.args.Composite(**args))
      except Exception as e:  # pylint: disable=broad-except
        msg = f"{self.directory}/{s}: {type(e).__name__}: {str(e)[:400]}"
        log.warning("cannot restore checkpoint %s", msg)
        problems.append(msg)
        continue
      if problems:
        log.warning(
            "restored checkpoint step %d after skipping damaged ones: %s", s, "; ".join(problems)
        )
        self._set_aside(candidates[: candidates.index(s)])
      return s, restored["state"], dict(restored["config"] or {})
    raise errors.CheckpointError(
        "no checkpoint could be restored (damaged, or saved by a different model, "
        "number of classes or optimizer than this config)"
        f"{self._layout_hint(candidates[0], config)}: " + " | ".join(problems)
    )

  def data_position(self, step: int) -> dict | None:
    """What step `step` recorded of the data order: this version's `data_position`
    ({"order": "global", "step", "seed", "batch_size", "num_samples"}); for a
    checkpoint of an earlier version, {"order": "per-process", "processes": N} (N
    files `data/process_I-of-N.json` of grain's iterator state); None if neither."""
    folder = os.path.join(self.directory, str(step))
    if os.path.isdir(os.path.join(folder, "data_position")):
      restored = self.manager.restore(
          step, args=ocp.args.Composite(data_position=ocp.args.JsonRestore())
      )
      return dict(restored["data_position"] or {})
    names = os.listdir(os.path.join(folder, "data")) if os.path.isdir(folder + "/data") else []
    counts = {n.rsplit("-of-", 1)[1][: -len(".json")] for n in names if "-of-" in n}
    if len(counts) == 1:
      return {"order": "per-process", "processes": int(counts.pop())}
    return None

  def _layout_hint(self, step: int, config: ml_collections.ConfigDict | None) -> str:
    """'; step N was saved with ...' naming the differing layout keys, or ''."""
    if config is None:
      return ""
    try:
      saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
          "config"
      ]
    except Exception:  # pylint: disable=broad-except
      return ""
    diffs = layout_differences(dict(saved or {}), _config_json(config))
    if not diffs:
      return ""
    return (
        f"; step {step} was saved with a different config: "
        + "; ".join(diffs)
        + " (to resume it, give the config the checkpoint's values: --config.KEY=VALUE "
        "for a number or string, the config file for a list; or use another "
        "--workdir)"
    )


@contextlib.contextmanager
def _quiet_orbax():
  """Orbax warns about every read-only CheckpointManager it opens (and the options
  it adjusts for one); reading a checkpoint is what these are for."""
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    absl_logger.setLevel(level)


def _read_only_manager(directory: str, item_handlers: dict) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      read_only=True, create=False, save_interval_steps=0, max_to_keep=None
  )
  _coordination_barriers()
  with _quiet_orbax():
    return ocp.CheckpointManager(directory, options=options, item_handlers=item_handlers)


def config_json(config: ml_collections.ConfigDict) -> dict:
  """A config as the JSON dict a checkpoint stores."""
  return _config_json(config)


def saved_config(workdir: str, step: int | None = None) -> tuple[int, dict]:
  """(step, config dict) saved with the checkpoint `step` (default: the latest whose
  config reads back) in `workdir`; nothing is restored but the JSON config."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    raise errors.CheckpointError(f"no checkpoint in {directory}")
  manager = _read_only_manager(directory, {"config": ocp.JsonCheckpointHandler()})
  try:
    steps = sorted(manager.all_steps())
    if step is not None and step not in steps:
      raise errors.CheckpointError(
          f"checkpoint step {step} not found in {directory}; available: {steps}"
      )
    for s in [step] if step is not None else steps[::-1]:
      try:
        restored = manager.restore(s, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        log.warning("cannot read the config of checkpoint %s/%d: %s", directory, s, e)
        continue
      if restored["config"]:
        return s, dict(restored["config"])
    raise errors.CheckpointError(f"no checkpoint in {directory} with a readable config")
  finally:
    manager.close()


def restore_variables(
    workdir: str,
    abstract_variables: dict,
    step: int | None = None,
    config: ml_collections.ConfigDict | None = None,
) -> tuple[int, dict, dict]:
  """(step, variables, saved config dict) for evaluation, prediction and export.

  Reads only the model variables (`{"params", "batch_stats"}` of the saved train
  state, into the shardings of `abstract_variables`), not the optimizer state or the
  data position, so the caller needs no optimizer. `step=None` takes the latest step
  that reads back; nothing on disk is changed.
  """
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    raise errors.CheckpointError(f"no checkpoint in {directory}")
  manager = _read_only_manager(
      directory, {"state": ocp.PyTreeCheckpointHandler(), "config": ocp.JsonCheckpointHandler()}
  )
  try:
    steps = sorted(manager.all_steps())
    if not steps:
      raise errors.CheckpointError(f"no checkpoint in {directory}")
    if step is not None and step not in steps:
      raise errors.CheckpointError(
          f"checkpoint step {step} not found in {directory}; available: {steps}"
      )
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_variables)
    problems = []
    for s in [step] if step is not None else steps[::-1]:
      try:
        restored = manager.restore(
            s,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=abstract_variables, restore_args=restore_args, partial_restore=True
                ),
                config=ocp.args.JsonRestore(),
            ),
        )
      except Exception as e:  # pylint: disable=broad-except
        problems.append(f"{directory}/{s}: {type(e).__name__}: {str(e)[:400]}")
        log.warning("cannot restore checkpoint %s", problems[-1])
        continue
      variables = {k: v for k, v in restored["state"].items() if v is not None}
      return s, variables, dict(restored["config"] or {})
    hint = ""
    if config is not None:
      try:
        saved = manager.restore(
            steps[-1] if step is None else step,
            args=ocp.args.Composite(config=ocp.args.JsonRestore()),
        )
        diffs = layout_differences(dict(saved["config"] or {}), _config_json(config))
        if diffs:
          hint = "; it was saved with a different config: " + "; ".join(diffs)
      except Exception:  # pylint: disable=broad-except
        pass
    raise errors.CheckpointError(
        "no checkpoint could be restored (damaged, or saved by a different model or "
        f"number of classes than this config){hint}: " + " | ".join(problems)
    )
  finally:
    manager.close()

"""Run by tests/integration/test_train_multidevice.py in a process with 8 fake CPU devices.

Three train steps on the same batches on 1 device (device matcher) and on an 8-device
mesh (data parallel with the host matcher, and data parallel + FSDP parameter sharding
with the device matcher) must give the same losses and parameters; so must 2 micro-batches per
step (gradient accumulation) on 1 device and on 4 data-parallel devices. Prints one line "OK max_param_diff=... max_loss_diff=..." on success;
also prints the compiled per-device memory of each variant.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtaclip_jax.data import classes as data_classes
from mtaclip_jax.data import pipeline  # noqa: E402
from mtaclip_jax.models import mtaclip  # noqa: E402
from mtaclip_jax.runtime import sharding  # noqa: E402
from mtaclip_jax.train import optim  # noqa: E402
from mtaclip_jax.train import train_state  # noqa: E402
from tests import train_fixtures  # noqa: E402

STEPS = 3
# Adam divides by sqrt(v) + eps: with the recipe's eps=1e-8 a parameter whose exact
# gradient is zero (a key bias before softmax, a conv bias before GroupNorm) moves by
# about lr per step in a direction set by rounding noise, which differs between device
# layouts. eps=1e-3 keeps such noise from being amplified, so every parameter can be
# held to the fp32 tolerance; the arithmetic of the sharded step is unchanged.
ADAM_EPS = 1e-3


def run(config, devices, batches):
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  model = mtaclip.build_model(config.model)
  tx = optim.make_optimizer(config.optim)
  tokens = data_classes.class_tokens(config.data, config.model.class_length)
  losses = []
  with jax.set_mesh(mesh):
    state, shard = train_state.init_state_sharded(
        model, tx, config, tokens, jax.random.key(0), mesh
    )
    step = train_state.jit_train_step(model, tx, config, shard, mesh)
    compiled = None
    for b in batches:
      gb = sharding.global_batch(b, mesh)
      if compiled is None:
        # One compile: the executable runs every step (calling `step` would compile
        # it again; with the host matcher's callbacks no cache holds it).
        compiled = step.lower(state, gb, tokens).compile()
        mem = compiled.memory_analysis()
        if mem is not None:
          print(
              f"devices={len(devices)} fsdp={config.mesh.fsdp} per-device temp "
              f"{mem.temp_size_in_bytes / 2**20:.1f} MiB, arguments "
              f"{mem.argument_size_in_bytes / 2**20:.1f} MiB"
          )
      state, metrics = compiled(state, gb, tokens)
      losses.append(float(metrics["loss"]))
  return np.array(losses), jax.device_get(optim.flatten(state.params))


def compare(name, ref, got):
  """(worst parameter diff relative to its largest magnitude, worst loss diff)."""
  (ref_loss, ref_params), (loss, params) = ref, got
  diffs = {}
  for k, v in ref_params.items():
    err = float(np.max(np.abs(params[k] - v)))
    scale = max(float(np.max(np.abs(v))), 1e-2)  # i.e. >= 1e-7 absolute
    diffs[k] = err / scale
  for k in sorted(diffs, key=diffs.get)[-5:]:
    print(f"{name} {k}: {diffs[k]:.3g} (max |ref| {np.max(np.abs(ref_params[k])):.3g})")
  return max(diffs.values()), float(np.max(np.abs(loss - ref_loss) / np.abs(ref_loss)))


def main(root):
  config = train_fixtures.tiny_config(root, steps=STEPS, batch=8)
  config.optim.eps = ADAM_EPS
  config.mesh.fsdp_min_size = 1024
  it = pipeline.make_train_iterator(config.data, 0)
  batches = [next(it) for _ in range(STEPS)]
  devices = jax.devices()
  assert len(devices) == 8, devices
  worst_p, worst_l = 0.0, 0.0

  def check(name, ref, got):
    nonlocal worst_p, worst_l
    p, l = compare(name, ref, got)
    worst_p, worst_l = max(worst_p, p), max(worst_l, l)

  # One device with the device matcher is the reference of the full-batch layouts: the
  # host matcher solves the same assignment problems exactly, so it must agree too.
  # Programs with the host matcher's callbacks are never cached (compiled each run):
  # only the layout that tests it (data parallel, one callback per device in
  # shard_map) uses it.
  ref = run(config, devices[:1], batches)
  config.loss.matcher = "host"
  check("host matcher, data parallel", ref, run(config, devices, batches))
  config.loss.matcher = "device"
  config.mesh.fsdp = True
  check("fsdp", ref, run(config, devices, batches))
  config.mesh.fsdp = False
  config.train.micro_batches = 2
  micro_ref = run(config, devices[:1], batches)
  check("micro_batches=2", micro_ref, run(config, devices[:4], batches))
  print(f"losses 1 device: {ref[0]}; with 2 micro-batches: {micro_ref[0]}")
  print(f"OK max_param_diff={worst_p:.3g} max_loss_diff={worst_l:.3g}")


if __name__ == "__main__":
  main(sys.argv[1])

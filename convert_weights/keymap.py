"""Key rewriting shared by the backbone converters: a PyTorch state dict whose dotted
names mirror a flax module's paths -> that module's params, with one error listing every
unknown, missing and mis-shaped key.

Rules: dots become nesting; a leaf `weight` becomes `kernel` (conv OIHW -> HWIO, linear
transposed) or `scale` (norms), whichever the module has; other leaf names are kept.
"""

from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from convert_weights.clip_convert import torch_to_flax_layout
from convert_weights.clip_sources import CheckpointError

SHOW = 8  # keys listed per kind of problem

Path = Tuple[str, ...]


def expected_shapes(module, image_hw: Tuple[int, int] = (32, 32)) -> Dict[Path, tuple]:
  """Flat {flax param path: shape} of an image module, without compute."""
  variables = jax.eval_shape(
      module.init, jax.random.key(0), jnp.zeros((1, image_hw[0], image_hw[1], 3))
  )
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(variables["params"]).items()}


def target(expected: Mapping[Path, tuple], key: str) -> Optional[Path]:
  """Flax path of a dotted key, or None if the module has no such leaf."""
  *module, leaf = key.split(".")
  if leaf == "weight":
    return next(
        (tuple(module) + (n,) for n in ("kernel", "scale") if tuple(module) + (n,) in expected),
        None,
    )
  path = tuple(module) + (leaf,)
  return path if path in expected else None


def problems_message(title: str, hints: Iterable[str], problems) -> str:
  """`problems`: [(kind, [keys])]; the first SHOW keys of each kind are listed."""
  lines = [title, *(f"  {h}" for h in hints)]
  for kind, keys in problems:
    if keys:
      more = f" (+{len(keys) - SHOW} more)" if len(keys) > SHOW else ""
      lines.append(f"  {len(keys)} {kind}: {keys[:SHOW]}{more}")
  return "\n".join(lines)


def to_params(
    state: Mapping[str, Any],
    expected: Mapping[Path, tuple],
    title: str,
    optional: Callable[[Path], bool] = lambda p: False,
    hints: Iterable[str] = (),
) -> Dict:
  """Dotted-name state dict -> nested float32 params. Module params for which
  `optional(path)` is true may be absent (they keep their initial values); anything
  else that does not fit raises CheckpointError("{title}\\n...")."""
  out, unknown, misshaped, bad_paths = {}, [], [], set()
  for key, value in state.items():
    path = target(expected, key)
    if path is None:
      unknown.append(key)
      continue
    value = torch_to_flax_layout(np.asarray(value, np.float32), path)
    if tuple(value.shape) != expected[path]:
      misshaped.append(
          f"{key}: {tuple(value.shape)} (as {'/'.join(path)}), " f"expected {expected[path]}"
      )
      bad_paths.add(path)
      continue
    out[path] = value
  missing = [
      "/".join(p) for p in expected if p not in out and p not in bad_paths and not optional(p)
  ]
  if unknown or missing or misshaped:
    raise CheckpointError(
        problems_message(
            title,
            hints,
            [
                ("unknown keys", unknown),
                ("missing parameters", missing),
                ("mis-shaped keys", misshaped),
            ],
        )
    )
  return traverse_util.unflatten_dict(out)

"""Saving / loading converted CLIP variables: an orbax checkpoint under DIR/variables plus
DIR/meta.json (arch, source file, its sha256)."""

import hashlib
import json
import os
from typing import Dict, Tuple

import jax
import numpy as np

META = "meta.json"
VARIABLES = "variables"


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def count_params(variables: Dict) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(variables.get("params", {}))))


def save_converted(out_dir: str, arch_name: str, towers: Dict, source: str) -> Dict:
  import orbax.checkpoint as ocp

  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  target = os.path.join(out_dir, VARIABLES)
  if os.path.exists(target):
    raise FileExistsError(f"{target!r} already exists; choose an empty --out directory")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(target, towers)
  meta = {
      "arch": arch_name,
      "source": os.path.abspath(source) if isinstance(source, str) else None,
      "sha256": sha256(source) if isinstance(source, str) else None,
      "params": {t: count_params(v) for t, v in towers.items()},
  }
  meta["params"]["total"] = sum(meta["params"].values())
  with open(os.path.join(out_dir, META), "w") as f:
    json.dump(meta, f, indent=2)
  return meta


def load_converted(out_dir: str) -> Tuple[Dict, Dict]:
  """DIR written by `python -m convert_weights` -> (meta, {"image": variables,
  "text": variables}) with numpy arrays."""
  import orbax.checkpoint as ocp

  out_dir = os.path.abspath(out_dir)
  meta_path = os.path.join(out_dir, META)
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(
        f"{meta_path!r} not found: {out_dir!r} is not a directory "
        f"written by `python -m convert_weights`"
    )
  with open(meta_path) as f:
    meta = json.load(f)
  with ocp.StandardCheckpointer() as ckptr:
    towers = ckptr.restore(os.path.join(out_dir, VARIABLES))
  return meta, jax.tree.map(np.asarray, towers)

"""The `arg` of a config file (big_vision style): `configs/ade20k_r50.py:K=5,neg=separate`
selects the paper's ablation rows. Docs: docs/RECIPES.md."""

from __future__ import annotations

import ml_collections

VARIANT_KEYS = ("baseline", "text_only", "sim", "K", "neg", "joint", "tau", "bf16")


def parse_arg(arg: str | None) -> dict[str, str]:
  """ "K=3,neg=mix,baseline" -> {"K": "3", "neg": "mix", "baseline": "1"}."""
  out: dict[str, str] = {}
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    key, _, value = part.partition("=")
    key = key.strip()
    if key not in VARIANT_KEYS:
      raise ValueError(
          f"unknown config variant {key!r} in {arg!r}; expected any of "
          f"{', '.join(VARIANT_KEYS)} (e.g. 'K=3,neg=mix' or 'baseline')"
      )
    out[key] = value.strip() if value else "1"
  return out


def _bool(v: str) -> bool:
  if v.lower() in ("1", "true", "yes", "on"):
    return True
  if v.lower() in ("0", "false", "no", "off"):
    return False
  raise ValueError(f"expected a boolean (0/1/true/false), got {v!r}")


def apply_variant(c: ml_collections.ConfigDict, arg: str | None) -> None:
  """The paper's ablation rows (DESIGN §5) as `arg` switches.

  baseline: Mask2Former + CLIP backbone (no text queries, no similarity loss).
  text_only: text queries in the decoder, no similarity loss ("text-enhanced").
  sim / K=k / neg=mix|separate / tau=t: similarity loss with K prompts.
  joint=0: separate self-attention for text and mask queries.
  """
  v = parse_arg(arg)
  if _bool(v.get("baseline", "0")):
    c.model.text_queries = False
    c.loss.similarity = False
  if _bool(v.get("text_only", "0")):
    c.model.text_queries = True
    c.loss.similarity = False
  if "sim" in v:
    c.loss.similarity = _bool(v["sim"])
  if "K" in v:
    c.model.num_contexts = int(v["K"])
  if "neg" in v:
    if v["neg"] not in ("mix", "separate"):
      raise ValueError(f"neg must be 'mix' or 'separate', got {v['neg']!r}")
    c.loss.neg = v["neg"]
  if "tau" in v:
    c.loss.tau = float(v["tau"])
  if "joint" in v:
    c.model.joint_self_attn = _bool(v["joint"])
  if _bool(v.get("bf16", "0")):
    c.model.dtype = "bfloat16"
  if c.loss.similarity and not c.model.text_queries:
    raise ValueError("the similarity loss needs text queries (model.text_queries=True)")

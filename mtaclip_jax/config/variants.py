"""The `arg` of a config file (big_vision style): `configs/ade20k_r50.py:K=5,neg=separate`
selects the paper's ablation rows. Docs: docs/RECIPES.md."""

from __future__ import annotations

import ml_collections

VARIANT_KEYS = (
    "baseline",
    "text_only",
    "sim",
    "K",
    "neg",
    "joint",
    "tau",
    "bf16",
    "paper_lr",
    "release_no_decay",
)

# The learning rate in the paper's text (the released config, which the recipes
# follow, trains with 1e-4; docs/REPRODUCE.md).
PAPER_LR = 2e-4

# The released config's weight-decay exemptions in this project's parameter names.
# mmengine's DefaultOptimWrapperConstructor gives a parameter that matches a
# `custom_keys` entry that entry's multipliers and no other rule: every backbone
# parameter matches 'backbone' (decay_mult 1.0), so `norm_decay_mult=0.0` exempts the
# norm layers (batch, group and layer norms) outside the backbone only; the custom keys
# query_feat / query_embed / level_embed (decay_mult 0.0) exempt the decoder's query
# features, its query positions (the release's `query_embed_decoder` holds the mask and
# the text queries' positions) and its level embedding. Everything else, the backbone's
# norms and embeddings, the prompt contexts and `gamma` included, is decayed (the pixel
# decoder's level embedding too: mmdet's pixel decoder names it `level_encoding`, which
# none of the custom keys matches).
RELEASE_NO_DECAY_RULES = (
    r"^(?!backbone/)(.*/)?(ln|bn|norm|gn|layernorm|layer_norm)[^/]*/(scale|bias)$",
    r"^(?!backbone/)(.*/)?[^/]*norm[^/]*/(scale|bias)$",
    r"^decoder/(queries_features|queries_embedder|text_pos_embed|level_embed)$",
)


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
  """The paper's ablation rows (docs/RECIPES.md, "Ablation rows") as `arg` switches.

  baseline: Mask2Former + CLIP backbone (no text queries, no similarity loss).
  text_only: text queries from one prompt (K=1), no similarity loss and so none of its
    heads: Table 3's "+ Text-Enhanced", which comes before the similarity loss (MTCL)
    and the multiple prompts (MTPL); `text_only,K=k` keeps k prompts.
  sim / K=k / neg=mix|separate / tau=t: similarity loss (and its heads) with K prompts.
  joint=0: separate self-attention for text and mask queries.
  paper_lr: the paper's learning rate, 2e-4, instead of the released config's 1e-4.
  release_no_decay: the released config's narrower weight-decay exemptions.

  A config file applies its variant last, after its own settings, so that nothing
  it sets overrides the variant. The values are checked with the rest of the config
  (validate.validate_config: e.g. K=0, neg=both, baseline,sim=1).
  """
  v = parse_arg(arg)
  if _bool(v.get("baseline", "0")):
    c.model.text_queries = False
    c.loss.similarity = False
  if _bool(v.get("text_only", "0")):
    c.model.text_queries = True
    c.model.num_contexts = 1
    c.loss.similarity = False
    c.model.similarity_heads = False
  if "sim" in v:
    c.loss.similarity = _bool(v["sim"])
    c.model.similarity_heads = c.loss.similarity
  if "K" in v:
    c.model.num_contexts = int(v["K"])
  if "neg" in v:
    c.loss.neg = v["neg"]
  if "tau" in v:
    c.loss.tau = float(v["tau"])
  if "joint" in v:
    c.model.joint_self_attn = _bool(v["joint"])
  if _bool(v.get("bf16", "0")):
    c.model.dtype = "bfloat16"
  if _bool(v.get("paper_lr", "0")):
    c.optim.lr = PAPER_LR
  if _bool(v.get("release_no_decay", "0")):
    c.optim.no_decay_rules = list(RELEASE_NO_DECAY_RULES)

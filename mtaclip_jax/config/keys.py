"""What each config key accepts, one rule per key: the table `validate.validate_config`
checks a config against before anything is built (the cross-key checks are there).

A rule is a function of the value that returns None when the value is usable, else
what was expected ("an int >= 1"). Keys absent from a config are not checked (older
checkpoints' configs lack some). A config key that is neither a bool nor in `FREE`
(paths) needs a rule here: tests/unit/config/test_validate.py walks every key of
every config with a bad value.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, Callable

from mtaclip_jax.data import classes as data_classes
from mtaclip_jax.data import folder
from mtaclip_jax.data import transforms
from mtaclip_jax.models import backbones
from mtaclip_jax.models import clip
from mtaclip_jax.models import decoder
from mtaclip_jax.models import mtaclip
from mtaclip_jax.models.ops import deform_attn
from mtaclip_jax.objective.matching import hungarian

Rule = Callable[[Any], "str | None"]

# The backbones' largest stride: crops must be a multiple of it.
CROP_MULTIPLE = 32
# The pixel decoder reads the backbone's strides 8, 16 and 32.
MAX_FEATURE_LEVELS = 3
EVAL_MODES = ("whole", "slide", "ms_flip")
EVAL_HEADS = ("class", "similarity")


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def one_of(*choices) -> Rule:
  def rule(v):
    return None if v in choices else f"one of {', '.join(map(repr, choices))}"

  return rule


def integer(lo: int | None = None, hi: int | None = None, also: tuple = ()) -> Rule:
  """An int in [lo, hi], or one of the special values `also` (e.g. -1)."""

  def rule(v):
    if _is_int(v) and (v in also or ((lo is None or v >= lo) and (hi is None or v <= hi))):
      return None
    bounds = f">= {lo}" if hi is None else f"in {lo}..{hi}" if lo is not None else f"<= {hi}"
    special = "".join(f" or {a}" for a in also)
    return f"an int {bounds}{special}"

  return rule


def number(lo: float | None = None, hi: float | None = None, open_lo=False, open_hi=False) -> Rule:
  """A finite number in the range; `open_*` excludes the bound itself."""

  def rule(v):
    ok = _is_number(v)
    if ok and lo is not None:
      ok = v > lo if open_lo else v >= lo
    if ok and hi is not None:
      ok = v < hi if open_hi else v <= hi
    if ok:
      return None
    parts = []
    if lo is not None:
      parts.append(f"{'>' if open_lo else '>='} {lo:g}")
    if hi is not None:
      parts.append(f"{'<' if open_hi else '<='} {hi:g}")
    return "a finite number" + (" " + " and ".join(parts) if parts else "")

  return rule


def boolean(v):
  return None if isinstance(v, bool) else "True or False"


def text(nonempty: bool = False) -> Rule:
  def rule(v):
    if isinstance(v, str) and (v or not nonempty):
      return None
    return "a non-empty string" if nonempty else "a string"

  return rule


def pair(lo: int = 1, multiple: int = 1) -> Rule:
  """(h, w): two ints >= lo, each a multiple of `multiple`."""

  def rule(v):
    ok = isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_int(x) for x in v)
    ok = ok and all(x >= lo and x % multiple == 0 for x in v)
    if ok:
      return None
    what = f"a pair (h, w) of ints >= {lo}"
    return what + (f", both multiples of {multiple}" if multiple > 1 else "")

  return rule


def ratios(v):
  if isinstance(v, (tuple, list)) and v and all(_is_number(x) and x > 0 for x in v):
    return None
  return "a non-empty list of numbers > 0, e.g. (0.5, 1.0, 1.5)"


def _compiles(pattern) -> bool:
  try:
    re.compile(pattern)
  except (re.error, TypeError):
    return False
  return True


def regexes(v):
  if isinstance(v, (tuple, list)) and all(isinstance(p, str) and _compiles(p) for p in v):
    return None
  return "a list of regular expressions over parameter paths"


def lr_rules(v):
  ok = isinstance(v, (tuple, list)) and all(
      isinstance(r, (tuple, list))
      and len(r) == 2
      and isinstance(r[0], str)
      and _compiles(r[0])
      and _is_number(r[1])
      and r[1] >= 0
      for r in v
  )
  return None if ok else "a list of (regex, learning-rate multiplier >= 0) pairs"


def colour_or_none(v):
  if v == "" or (isinstance(v, str) and folder.parse_colour(v) is not None):
    return None
  return "'#rrggbb' or 'r g b' (0..255), or '' for none"


def transform_specs(v):
  if not isinstance(v, (tuple, list)) or not all(isinstance(s, str) for s in v):
    return "a list of transform calls, e.g. ['random_flip(prob=0.5)', 'normalize()']"
  try:
    transforms.parse(list(v))
  except (ValueError, TypeError) as e:
    return f"transform calls this project knows ({e})"
  return None


POSITIVE = integer(1)
NON_NEGATIVE = integer(0)
WEIGHT = number(0)

RULES: dict[str, Rule] = {
    "seed": NON_NEGATIVE,
    # model
    "model.backbone": one_of(*sorted(backbones.REGISTRY)),
    "model.text_encoder": one_of("", *sorted(clip.ARCHS)),
    "model.backbone_norm": one_of(*clip.NORMS),
    "model.adapter_norm": one_of(*clip.ADAPTER_NORMS),
    "model.num_classes": POSITIVE,
    "model.num_queries": POSITIVE,
    "model.hidden_dim": POSITIVE,
    "model.mask_dim": POSITIVE,
    "model.enc_layers": POSITIVE,
    "model.enc_ffn_dim": POSITIVE,
    "model.enc_heads": POSITIVE,
    "model.enc_points": POSITIVE,
    "model.num_feature_levels": integer(1, MAX_FEATURE_LEVELS),
    "model.dec_layers": POSITIVE,
    "model.dec_ffn_dim": POSITIVE,
    "model.dec_heads": POSITIVE,
    "model.num_contexts": POSITIVE,
    "model.context_length": POSITIVE,
    "model.class_length": POSITIVE,
    "model.gamma_init": number(),
    "model.context_init": one_of(*sorted(mtaclip.CONTEXT_INITS)),
    "model.deform_attn_impl": one_of(*sorted(deform_attn.IMPLS)),
    "model.attention_impl": one_of(*decoder.ATTENTION_IMPLS),
    "model.dtype": one_of(*mtaclip.DTYPES),
    # loss
    "loss.class_weight": WEIGHT,
    "loss.mask_weight": WEIGHT,
    "loss.dice_weight": WEIGHT,
    "loss.sim_weight": WEIGHT,
    "loss.no_object_weight": WEIGHT,
    "loss.num_points": POSITIVE,
    "loss.oversample_ratio": number(1),
    "loss.importance_sample_ratio": number(0, 1),
    "loss.target_chunk": NON_NEGATIVE,
    "loss.matcher": one_of(*hungarian.MATCHERS),
    "loss.neg": one_of("mix", "separate"),
    "loss.tau": number(0, open_lo=True),
    # optim
    "optim.lr": number(0, open_lo=True),
    "optim.weight_decay": WEIGHT,
    "optim.b1": number(0, 1, open_hi=True),
    "optim.b2": number(0, 1, open_hi=True),
    "optim.eps": number(0, open_lo=True),
    "optim.warmup_steps": NON_NEGATIVE,
    "optim.warmup_start_factor": number(0, 1),
    "optim.poly_power": WEIGHT,
    "optim.min_lr": WEIGHT,
    "optim.clip_norm": WEIGHT,
    "optim.total_steps": integer(1, also=(-1,)),
    "optim.lr_mult_rules": lr_rules,
    "optim.no_decay_rules": regexes,
    # data
    "data.name": one_of(*data_classes.NAMES),
    "data.source": one_of("raw", "tfds"),
    # -1 for a folder dataset: validate_config fills in the names of its classes.txt
    # (here and in model.num_classes) before this table is checked.
    "data.num_classes": POSITIVE,
    "data.ignore_index": integer(0, 255),  # folder dataset: the unlabeled mask value
    "data.ignore_colour": colour_or_none,  # folder dataset, RGB masks: unlabeled pixels
    "data.crop_size": pair(1, CROP_MULTIPLE),
    "data.test_scale": pair(1),
    "data.batch_size": POSITIVE,
    "data.max_segments": POSITIVE,
    "data.transforms": transform_specs,
    "data.num_workers": NON_NEGATIVE,
    "data.num_threads": POSITIVE,
    "data.prefetch": NON_NEGATIVE,
    "data.seed": NON_NEGATIVE,
    "data.on_bad_sample": one_of("error", "skip"),
    "data.none_class_name": text(nonempty=True),
    "data.generate.train": NON_NEGATIVE,
    "data.generate.val": NON_NEGATIVE,
    "data.generate.size": pair(0),
    "data.generate.seed": NON_NEGATIVE,
    # eval
    "eval.mode": one_of(*EVAL_MODES),
    "eval.ms_mode": one_of("whole", "slide"),
    "eval.head": one_of(*EVAL_HEADS),
    "eval.crop_size": pair(1),
    "eval.stride": pair(1),
    "eval.scales": ratios,
    "eval.test_scale": pair(1),
    "eval.split": text(nonempty=True),  # the dataset's splits: validate.py
    "eval.every_steps": NON_NEGATIVE,
    "eval.max_images": NON_NEGATIVE,
    "eval.step": integer(0, also=(-1,)),
    # train
    "train.steps": POSITIVE,
    "train.log_every": POSITIVE,
    "train.checkpoint_every": POSITIVE,
    "train.max_to_keep": POSITIVE,
    "train.on_nan": one_of("stop", "skip"),
    "train.micro_batches": POSITIVE,
    # mesh
    "mesh.data": integer(1, also=(-1,)),
    "mesh.model": POSITIVE,
    "mesh.fsdp_min_size": NON_NEGATIVE,
}

# Keys with no rule here: bools (any bool is valid; ml_collections refuses other
# values of a bool key when it parses the flags; a new bool key needs no entry) and
# paths (checked by `validate.check_paths` where a run reads them).
FREE = {
    "model.text_queries": "bool",
    "model.similarity_heads": "bool",
    "model.joint_self_attn": "bool",
    "loss.similarity": "bool",
    "data.generate.enabled": "bool",
    "eval.flip": "bool",
    "eval.at_end": "bool",
    "mesh.fsdp": "bool",
    "train.restart_data_order": "bool",
    "init.allow_random": "bool",
    "data.root": "path",
    "data.tfds_dir": "path",
    "data.classes_file": "path",  # folder dataset: "" is ROOT/classes.txt
    "data.reduce_zero_label": "bool",
    "init.clip": "path",
    "init.backbone": "path",
    "init.mask2former": "path",
}


def problem(key: str, value) -> str | None:
  """What `key` expected, if `value` is not usable; None if it is (or has no rule)."""
  rule = RULES.get(key)
  if rule is None:
    return None
  try:
    return rule(value)
  except TypeError:  # a value of another kind than the rule compares
    return rule(None) or "another value"

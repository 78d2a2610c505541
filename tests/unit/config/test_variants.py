"""A variant is never overridden by the config that takes it: every config file,
with each ablation switch, ends with the switch's values (the config applies its
variant after its own settings)."""

import glob
import os

import pytest

from tests import train_fixtures

CONFIGS = sorted(
    os.path.basename(p)[:-3] for p in glob.glob(os.path.join(train_fixtures.ROOT, "configs/*.py"))
)

# arg -> {key: value it must leave in the config}
VARIANTS = {
    "K=4": {"model.num_contexts": 4},
    "K=1": {"model.num_contexts": 1},
    "baseline": {"model.text_queries": False, "loss.similarity": False},
    "text_only": {
        "model.text_queries": True,
        "loss.similarity": False,
        "model.similarity_heads": False,
        "model.num_contexts": 1,
    },
    "text_only,K=3": {
        "model.num_contexts": 3,
        "loss.similarity": False,
        "model.similarity_heads": False,
    },
    "text_only,sim=1": {"loss.similarity": True, "model.similarity_heads": True},
    "sim=0": {"loss.similarity": False, "model.similarity_heads": False},
    "neg=separate": {"loss.neg": "separate"},
    "tau=0.5": {"loss.tau": 0.5},
    "joint=0": {"model.joint_self_attn": False},
    "bf16": {"model.dtype": "bfloat16"},
}


def _get(config, key):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg", sorted(VARIANTS))
def test_variant_holds_in_every_config(name, arg):
  config = train_fixtures.load_config(name, arg)
  for key, want in VARIANTS[arg].items():
    assert _get(config, key) == want, (name, arg, key, _get(config, key))

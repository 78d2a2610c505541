"""CLIP BPE tokenizer: transformers' `CLIPTokenizer` built in memory from the
`bpe_simple_vocab_16e6.txt.gz` shipped inside the installed `openai-clip` package (no
download). Texts are cleaned like OpenAI's `simple_tokenizer` (ftfy, html unescape,
whitespace) before BPE, so ids equal `clip.tokenize`.
"""

import functools
import gzip
import html
import importlib.util
import logging
import os
from typing import List, Sequence, Union

import ftfy
import numpy as np
import regex

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
SOT_ID = 49406
EOT_ID = 49407
_NUM_MERGES = 49152 - 256 - 2


def bpe_path() -> str:
  """Path of the BPE merges file inside the installed openai-clip package (found
  without importing `clip/__init__.py`, which needs torchvision)."""
  spec = importlib.util.find_spec("clip")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "package 'openai-clip' is not installed; it ships "
        "bpe_simple_vocab_16e6.txt.gz (pip install openai-clip)"
    )
  for location in spec.submodule_search_locations:
    path = os.path.join(location, "bpe_simple_vocab_16e6.txt.gz")
    if os.path.exists(path):
      return path
  raise FileNotFoundError(
      f"bpe_simple_vocab_16e6.txt.gz not found in " f"{list(spec.submodule_search_locations)}"
  )


def _bytes_to_unicode():
  bs = (
      list(range(ord("!"), ord("~") + 1))
      + list(range(ord("¡"), ord("¬") + 1))
      + list(range(ord("®"), ord("ÿ") + 1))
  )
  cs = bs[:]
  n = 0
  for b in range(2**8):
    if b not in bs:
      bs.append(b)
      cs.append(2**8 + n)
      n += 1
  return [chr(c) for c in cs]


@functools.lru_cache(maxsize=1)
def get_tokenizer():
  """transformers CLIPTokenizer with OpenAI's vocabulary (49408 ids)."""
  from transformers import CLIPTokenizer  # heavy import, only when tokenizing

  with gzip.open(bpe_path()) as f:
    lines = f.read().decode("utf-8").split("\n")
  merges = lines[1 : _NUM_MERGES + 1]
  byte_chars = _bytes_to_unicode()
  vocab = byte_chars + [c + "</w>" for c in byte_chars]
  vocab += ["".join(m.split()) for m in merges] + [SOT, EOT]
  tok = CLIPTokenizer(
      vocab={t: i for i, t in enumerate(vocab)}, merges=[tuple(m.split()) for m in merges]
  )
  if tok.convert_tokens_to_ids(EOT) != EOT_ID or tok.convert_tokens_to_ids(SOT) != SOT_ID:
    raise RuntimeError(
        "CLIPTokenizer built from the bundled BPE file has unexpected " "special-token ids"
    )
  return tok


def _clean(text: str) -> str:
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return regex.sub(r"\s+", " ", text).strip().lower()


def encode(text: str) -> List[int]:
  """BPE ids of one text, without [SOT]/[EOT]."""
  return get_tokenizer()(_clean(text), add_special_tokens=False)["input_ids"]


def tokenize(
    texts: Union[str, Sequence[str]], context_length: int = 77, truncate: bool = False
) -> np.ndarray:
  """[SOT] ids [EOT] zero-padded -> np.int32 [N, context_length], as `clip.tokenize`.
  Too long texts raise ValueError unless truncate=True (then [EOT] is kept last)."""
  if isinstance(texts, str):
    texts = [texts]
  out = np.zeros((len(texts), context_length), np.int32)
  for i, text in enumerate(texts):
    ids = [SOT_ID] + encode(text) + [EOT_ID]
    if len(ids) > context_length:
      if not truncate:
        raise ValueError(
            f"text {text!r} has {len(ids)} tokens, more than the "
            f"context length {context_length}"
        )
      ids = ids[: context_length - 1] + [EOT_ID]
    out[i, : len(ids)] = ids
  return out


def tokenize_class_names(names: Sequence[str], length: int = 5) -> np.ndarray:
  """[SOT] name [EOT] zero-padded -> np.int32 [C, length]. Names that do not fit are
  truncated (keeping [EOT] last) with a warning listing them."""
  out = np.zeros((len(names), length), np.int32)
  truncated = []
  for i, name in enumerate(names):
    ids = [SOT_ID] + encode(name) + [EOT_ID]
    if len(ids) > length:
      truncated.append(name)
      ids = ids[: length - 1] + [EOT_ID]
    out[i, : len(ids)] = ids
  if truncated:
    logging.warning("class names longer than %d tokens were truncated: %s", length - 2, truncated)
  return out

"""CLIP's BPE tokenizer, with the merges of `bpe_simple_vocab_16e6.txt.gz` shipped
inside the installed `openai-clip` package (no download). Texts are cleaned like
OpenAI's `simple_tokenizer` (ftfy, html unescape, whitespace) and split with its word
pattern before BPE, so ids equal `clip.tokenize`. Written here rather than taken from
transformers, whose import alone costs every run that tokenizes ~1.7 s of start-up.
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


def _byte_chars() -> dict:
  """byte value -> the printable character that stands for it in the vocabulary
  (printable bytes stand for themselves, the others for chars from U+0100 on)."""
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
  return {b: chr(c) for b, c in zip(bs, cs)}


# How the cleaned text splits into words before BPE (OpenAI's pattern).
_WORDS = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


class BPETokenizer:
  """Byte-pair encoding with OpenAI's merges: a word's bytes become vocabulary
  characters, the last one marked end-of-word ("</w>"), and the adjacent pair of
  lowest merge rank is joined until no pair has a rank."""

  def __init__(self, merges: Sequence[tuple[str, str]]):
    self.byte_chars = _byte_chars()
    chars = list(self.byte_chars.values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT, EOT]
    self.ids = {t: i for i, t in enumerate(vocab)}
    self.ranks = {m: i for i, m in enumerate(merges)}
    self._cache = {SOT: (SOT,), EOT: (EOT,)}

  def _bpe(self, word: str) -> tuple[str, ...]:
    if word in self._cache:
      return self._cache[word]
    parts = tuple(word[:-1]) + (word[-1] + "</w>",)
    while len(parts) > 1:
      pairs = set(zip(parts, parts[1:]))
      best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
      if best not in self.ranks:
        break
      merged, i = [], 0
      while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
          merged.append(parts[i] + parts[i + 1])
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = tuple(merged)
    self._cache[word] = parts
    return parts

  def encode(self, cleaned: str) -> List[int]:
    ids = []
    for word in _WORDS.findall(cleaned):
      chars = "".join(self.byte_chars[b] for b in word.encode("utf-8"))
      ids.extend(self.ids[p] for p in self._bpe(chars))
    return ids


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> BPETokenizer:
  """The tokenizer with OpenAI's vocabulary (49408 ids)."""
  with gzip.open(bpe_path()) as f:
    lines = f.read().decode("utf-8").split("\n")
  tok = BPETokenizer([tuple(m.split()) for m in lines[1 : _NUM_MERGES + 1]])
  if tok.ids[EOT] != EOT_ID or tok.ids[SOT] != SOT_ID:
    raise RuntimeError("the bundled BPE file gives unexpected special-token ids")
  return tok


def _clean(text: str) -> str:
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return regex.sub(r"\s+", " ", text).strip().lower()


def encode(text: str) -> List[int]:
  """BPE ids of one text, without [SOT]/[EOT]."""
  return get_tokenizer().encode(_clean(text))


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

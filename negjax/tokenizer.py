"""CLIP byte-level BPE tokenizer, id-for-id with open_clip's `SimpleTokenizer`.

Pure Python/numpy (no torch), so data-loading workers can tokenize captions.
Text goes through the same cleaning as open_clip ("lower" mode): ftfy, HTML
unescaping twice, whitespace collapsing, lower-casing; then the CLIP word regex,
UTF-8 bytes mapped to printable characters, and BPE merges in rank order.

Usage:
  ids = tokenize(["a dog", "no cat"])       # int32 [2, 77]
  tok = get_tokenizer(); tok.encode("x")    # list of ids without SOT/EOT
"""
import functools
import gzip
import html
import importlib.resources
import pathlib
import re as std_re
import threading

import ftfy
import numpy as np
import regex

DEFAULT_CONTEXT_LENGTH = 77
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# The vocabulary file lists more merges than CLIP uses: CLIP's 49408-entry
# vocabulary is 256 bytes, 256 bytes + "</w>", the first 48894 merges, 2 specials.
NUM_MERGES = 49152 - 256 - 2
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
SOT_ID = 49406
EOT_ID = 49407
VOCAB_SIZE = 49408
END_OF_WORD = "</w>"

# Text made only of these characters (printable ASCII without "&", plus tab and
# line breaks) is left unchanged by ftfy and html.unescape apart from whitespace,
# which is collapsed afterwards anyway; skipping both is the main speed-up.
_NEEDS_FULL_CLEAN = std_re.compile(r"[^\t\n\r\x20-\x25\x27-\x7e]")

# Word split used by CLIP: special tokens, English contractions, letter runs,
# single digits, runs of other non-space characters.
_WORD_PATTERN = (
    SOT_TOKEN + "|" + EOT_TOKEN +
    r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")

# This many distinct words is plenty for captions; past it the cache restarts so
# memory stays bounded on adversarial input.
_MAX_CACHED_WORDS = 1 << 20


def _byte_alphabet():
  """Maps each byte 0..255 to a printable character, in CLIP's vocabulary order.

  Printable Latin-1 bytes stand for themselves; the other 68 bytes get
  characters from U+0100 upwards, in byte order. Returns a list of
  (byte, character) in the order they appear in the vocabulary.
  """
  printable = [b for b in range(256)
               if 0x21 <= b <= 0x7e or 0xa1 <= b <= 0xac or 0xae <= b <= 0xff]
  printable_set = set(printable)
  others = [b for b in range(256) if b not in printable_set]
  pairs = [(b, chr(b)) for b in printable]
  pairs += [(b, chr(256 + k)) for k, b in enumerate(others)]
  return pairs


def _vocab_bytes():
  """The gzipped merges list shipped as package data in negjax/assets."""
  try:
    return importlib.resources.files("negjax").joinpath("assets", VOCAB_FILE).read_bytes()
  except (NotADirectoryError, TypeError):
    # negjax was imported as a namespace package (seen with the editable install
    # when a script runs from another folder); the file sits next to this module.
    return (pathlib.Path(__file__).parent / "assets" / VOCAB_FILE).read_bytes()


@functools.lru_cache(maxsize=1 << 16)
def _fix_text(text):
  """ftfy then HTML unescaping twice; cached since ftfy costs ~40 us a string
  and captions repeat (templates, epochs)."""
  return html.unescape(html.unescape(ftfy.fix_text(text)))


def _clean(text):
  """open_clip's "lower" cleaning, with a shortcut for plain ASCII."""
  if _NEEDS_FULL_CLEAN.search(text) is not None:
    text = _fix_text(text)
  return " ".join(text.split()).lower()


class Tokenizer:
  """CLIP tokenizer with a word-level cache.

  Safe to share between threads: the cache is a plain dict whose entries are
  deterministic, so a race at worst computes a word twice.
  """

  def __init__(self, vocab_path=None):
    if vocab_path is None:
      raw = _vocab_bytes()
    else:
      with open(vocab_path, "rb") as f:
        raw = f.read()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    # Line 0 is a version header.
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]

    alphabet = _byte_alphabet()
    symbols = [c for _, c in alphabet]
    symbols += [c + END_OF_WORD for _, c in alphabet]
    symbols += [a + b for a, b in merges]
    symbols += [SOT_TOKEN, EOT_TOKEN]
    self.encoder = {s: i for i, s in enumerate(symbols)}
    self.decoder = symbols
    assert len(symbols) == VOCAB_SIZE, len(symbols)
    assert self.encoder[SOT_TOKEN] == SOT_ID
    assert self.encoder[EOT_TOKEN] == EOT_ID
    self.sot_token_id = SOT_ID
    self.eot_token_id = EOT_ID
    self.vocab_size = VOCAB_SIZE

    self._ranks = {pair: r for r, pair in enumerate(merges)}
    # str.translate table from a byte (as a Latin-1 character) to its symbol.
    self._byte_table = {b: c for b, c in alphabet}
    self._symbol_to_byte = {c: b for b, c in alphabet}
    self._split = regex.compile(_WORD_PATTERN, regex.IGNORECASE).findall
    self._specials = {SOT_TOKEN: (SOT_ID,), EOT_TOKEN: (EOT_ID,)}
    self._cache = dict(self._specials)

  def _bpe(self, word):
    """Merges the byte symbols of one word; returns a tuple of ids."""
    symbols = word.encode("utf-8").decode("latin-1").translate(self._byte_table)
    parts = list(symbols)
    parts[-1] += END_OF_WORD
    ranks = self._ranks
    while len(parts) > 1:
      best_rank, best = None, None
      for pair in zip(parts, parts[1:]):
        r = ranks.get(pair)
        if r is not None and (best_rank is None or r < best_rank):
          best_rank, best = r, pair
      if best is None:
        break
      first, second = best
      merged = []
      i, n = 0, len(parts)
      while i < n:
        if i + 1 < n and parts[i] == first and parts[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    encoder = self.encoder
    return tuple(encoder[p] for p in parts)

  def encode(self, text):
    """Returns the BPE ids of `text`, without start/end tokens."""
    cache = self._cache
    ids = []
    for word in self._split(_clean(text)):
      got = cache.get(word)
      if got is None:
        got = self._bpe(word)
        if len(cache) >= _MAX_CACHED_WORDS:
          cache.clear()
          cache.update(self._specials)
        cache[word] = got
      ids.extend(got)
    return ids

  def decode(self, ids):
    """Best-effort inverse of `encode`, for debugging; stops at EOT."""
    text = []
    for i in ids:
      i = int(i)
      if i == EOT_ID:
        break
      if i == SOT_ID:
        continue
      text.append(self.decoder[i])
    text = "".join(text)
    words = text.split(END_OF_WORD)
    data = [bytes(self._symbol_to_byte[c] for c in w) for w in words]
    return " ".join(d.decode("utf-8", errors="replace") for d in data).strip()

  def __call__(self, texts, context_length=DEFAULT_CONTEXT_LENGTH):
    """Tokenizes a string or a sequence of strings to int32 [N, context_length].

    Each row is SOT, ids, EOT, then zeros; too-long rows are cut to
    `context_length` with EOT as the last token, like open_clip.
    """
    if isinstance(texts, str):
      texts = [texts]
    if context_length < 2:
      raise ValueError(f"context_length must be >= 2, got {context_length}")
    out = np.zeros((len(texts), context_length), np.int32)
    keep = context_length - 2
    for row, text in enumerate(texts):
      ids = self.encode(text)
      if len(ids) > keep:
        ids = ids[:keep]
        n = context_length
      else:
        n = len(ids) + 2
      out[row, 0] = SOT_ID
      out[row, 1:n - 1] = ids
      out[row, n - 1] = EOT_ID
    return out


_lock = threading.Lock()
_default = None


def get_tokenizer():
  """The shared default tokenizer, built once per process on first use."""
  global _default
  if _default is None:
    with _lock:
      if _default is None:
        _default = Tokenizer()
  return _default


def tokenize(texts, context_length=DEFAULT_CONTEXT_LENGTH):
  """Tokenizes like `open_clip.tokenize`, returning int32 [N, context_length]."""
  return get_tokenizer()(texts, context_length)


def used_length(ids, multiple=8):
  """Tokens a causal, EOT-pooled text tower needs for `ids` [..., L]: through the last EOT
  (the largest id), rounded up to `multiple`, at most L. Features of `ids[..., :n]` equal
  those of `ids`, since no token before an EOT attends to the padding after it; fewer
  tokens make a faster step."""
  full = ids.shape[-1]
  if not multiple or not ids.size:
    return full
  last = int(np.argmax(ids, axis=-1).max()) + 1
  return min(full, -(-last // multiple) * multiple)

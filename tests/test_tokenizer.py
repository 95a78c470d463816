"""negjax.tokenizer gives open_clip's token ids exactly, on strings built to hit every rule."""
import threading

import numpy as np
import pytest

from negjax import tokenizer as tk

NEGATIONS = ["no", "not", "without", "isn't", "aren't", "doesn't", "don't", "never",
             "none", "nor", "neither", "NOT", "No", "can't", "won't", "n't", "cannot"]
WORDS = ["a", "photo", "of", "the", "dog", "cat", "sitting", "on", "grass", "Bicycle",
         "CAR", "people", "we'll", "I'm", "you've", "they're", "it'd", "O'Brien",
         "rock'n'roll", "e-mail", "state-of-the-art", "x-ray", "3D", "4k", "Mr.", "U.S.A.",
         "jekyll", "supercalifragilistic", "photograph", "photographs", "unbelievably",
         "<start_of_text>", "<END_OF_TEXT>", "</w>", "@user", "#hashtag", "http://x.org/a?b=1"]
PUNCT = [".", ",", "!", "?", "...", ";", ":", "-", "--", "(", ")", "[", "]", '"', "'",
         "/", "\\", "*", "_", "~", "`", "^", "|", "{", "}", "<", ">", "=", "+", "%", "$", "#", "@"]
UNICODE = ["café", "naïve", "Zürich", "crème brûlée", "São Paulo", "ﬁsh", "ＡＢＣ１２３",
           "日本の犬", "猫がいない", "한국어", "中文字符", "Ελληνικά", "Привет", "مرحبا",
           "עברית", "हिन्दी", "ไทย", "🐶", "🐱‍👤", "👍🏽", "🇫🇷", "❤️", "™", "©", "½", "²",
           "ſ", "K", "İstanbul", "ǅ", "e\u0301", "\u200b", "\ufeff", "“quoted”", "‘single’",
           "—", "…", "cafÃ©", "Ã¼ber", "â€œmojibakeâ€\x9d", "\u00a0", "\u3000", "\u2028",
           "\U0001d400\U0001d401", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "Ⅻ", "٣", "①"]
HTML = ["&amp;", "&amp;amp;", "&amp;amp;amp;", "&lt;b&gt;", "&#39;", "&#x27;", "&quot;",
        "&nbsp;", "&eacute;", "&EACUTE;", "&notanentity;", "&", "&&", "AT&T", "&copy",
        "&#128054;", "&#0;", "&lt;br/&gt;"]
SPACES = [" ", "  ", "\t", "\n", "\r\n", "\r", "\x0b", "\x0c", "\x1c", "\x1f", "\x85",
          "\u2009", " \n\t "]
CONTROL = ["\x00", "\x07", "\x1b[31m", "\x1b[0m", "\x7f", "\x9d", "\ud800"]


def _random_strings(rng, n):
  pools = [NEGATIONS, WORDS, PUNCT, UNICODE, HTML, SPACES, CONTROL]
  weights = np.array([4, 8, 3, 3, 1, 2, 0.5])
  weights = weights / weights.sum()
  out = []
  for _ in range(n):
    parts = []
    for _ in range(int(rng.integers(0, 16))):
      pool = pools[rng.choice(len(pools), p=weights)]
      piece = pool[int(rng.integers(len(pool)))]
      case = rng.random()
      if case < 0.1:
        piece = piece.upper()
      elif case < 0.2:
        piece = piece.title()
      elif case < 0.25:
        piece = str(int(rng.integers(0, 10 ** int(rng.integers(1, 9)))))
      parts.append(piece)
      if rng.random() < 0.7:
        parts.append(" ")
    out.append("".join(parts))
  return out


def _random_chars(rng, n, alphabet):
  return ["".join(rng.choice(alphabet, size=int(rng.integers(0, 40)))) for _ in range(n)]


@pytest.fixture(scope="module")
def oc():
  from negjax.reference import open_clip
  return open_clip()


@pytest.fixture(scope="module")
def corpus():
  rng = np.random.default_rng(1234)
  ascii_alphabet = [chr(c) for c in range(128)]
  printable = [chr(c) for c in range(0x20, 0x7f)] + ["\t", "\n", "\r"]
  wide = [chr(c) for c in rng.integers(0x80, 0x3000, size=300)] + printable
  texts = _random_strings(rng, 900)
  texts += _random_chars(rng, 150, printable)       # the ASCII fast path
  texts += _random_chars(rng, 150, ascii_alphabet)  # control characters too
  texts += _random_chars(rng, 100, wide)
  texts += [
      "", " ", "   \t\n ", "\n", ".", "a", "A", "'s", "'S", "''", "0", "12345",
      "a photo of a dog without a cat", "There is no dog in this image.",
      "A kitchen that isn't clean, and not a single cup!",
      "Is this a picture of a cat? No, it's not.",
      "x " * 200,                      # truncation
      "supercalifragilistic" * 40,     # one long word
      " ".join(NEGATIONS * 10),
      "🐶" * 100, "日本" * 100, "&amp;" * 100,
  ]
  assert len(texts) >= 1000
  return texts


@pytest.mark.parametrize("context_length", [77, 2, 5, 16, 128])
def test_matches_open_clip(oc, corpus, context_length):
  texts = corpus if context_length == 77 else corpus[::3]
  want = oc.tokenize(texts, context_length=context_length).numpy()
  got = tk.tokenize(texts, context_length=context_length)
  assert got.dtype == np.int32 and got.shape == (len(texts), context_length)
  bad = [i for i in range(len(texts)) if not np.array_equal(got[i], want[i])]
  assert not bad, [(texts[i], got[i][:12], want[i][:12]) for i in bad[:5]]


def test_encode_matches_open_clip(oc, corpus):
  ref = oc.tokenizer.SimpleTokenizer()
  tok = tk.Tokenizer()  # a fresh instance: the cache starts empty
  for text in corpus[:300]:
    assert tok.encode(text) == ref.encode(text), text


def test_truncation_keeps_eot_last(corpus):
  long = [t for t in corpus if len(tk.get_tokenizer().encode(t)) > 75]
  assert len(long) >= 5
  ids = tk.tokenize(long)
  assert (ids[:, 0] == tk.SOT_ID).all() and (ids[:, -1] == tk.EOT_ID).all()
  for text, row in zip(long, ids):
    assert row[1:-1].tolist() == tk.get_tokenizer().encode(text)[:75]


def test_single_string_and_padding():
  one = tk.tokenize("no dog")
  assert one.shape == (1, 77) and one.dtype == np.int32
  n = 2 + len(tk.get_tokenizer().encode("no dog"))
  assert one[0, 0] == tk.SOT_ID and one[0, n - 1] == tk.EOT_ID and (one[0, n:] == 0).all()
  np.testing.assert_array_equal(tk.tokenize(["no dog"]), one)
  assert tk.tokenize([]).shape == (0, 77)


def test_used_length_is_through_the_last_eot_rounded_up():
  ids = tk.tokenize(["a dog", "no cat on a red mat today"])  # 4 and 9 tokens with SOT/EOT
  assert tk.used_length(ids, 1) == 9
  assert tk.used_length(ids, 8) == 16 and tk.used_length(ids) == 16
  assert tk.used_length(ids[:1], 8) == 8
  assert tk.used_length(ids, 0) == 77 and tk.used_length(ids[:, :12], 8) == 12  # capped
  assert tk.used_length(tk.tokenize(["dog"] * 3).reshape(1, 3, 77), 5) == 5  # any leading axes


def test_bounded_cache_still_correct(oc, corpus, monkeypatch):
  monkeypatch.setattr(tk, "_MAX_CACHED_WORDS", 8)
  tok = tk.Tokenizer()
  texts = corpus[:200]
  np.testing.assert_array_equal(tok(texts), oc.tokenize(texts).numpy())
  assert len(tok._cache) <= 8


def test_threads_agree(corpus):
  want = tk.Tokenizer()(corpus)
  shared = tk.Tokenizer()
  results = [None] * 4

  def work(k):
    results[k] = shared(corpus[k::4] + corpus)

  threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  for k in range(4):
    np.testing.assert_array_equal(results[k][-len(corpus):], want)


def test_decode_round_trip():
  tok = tk.get_tokenizer()
  assert tok.decode(tk.tokenize("A dog, NOT a cat — café 🐶")[0]) == "a dog , not a cat — café 🐶"


_NO_TORCH = r"""
from negjax.tokenizer import tokenize
print(" ".join(map(str, tokenize(sys.argv[1:]).ravel())))
"""


def test_works_without_torch(run_without_torch):
  texts = ["a photo without a dog", "isn't it café 🐶?"]
  out = run_without_torch(_NO_TORCH, *texts)
  got = np.array(out.split(), np.int32).reshape(len(texts), 77)
  np.testing.assert_array_equal(got, tk.tokenize(texts))

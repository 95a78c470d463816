"""Objects from captions: the data engine's first step for image-text data without labels.

An extractor maps captions to (present, absent) object names, which the caption engine
(`negjax.data.captions`) turns into NegCap / NegMCQ as for COCO or CSV labels. Two kinds:

  VocabularyExtractor  built in, no model: COCO's 80 categories (LVIS-style names, plurals
                       and synonyms: "puppies" -> dog, "men" -> person). A category named
                       in the caption is present, unless a negation word stands just before
                       it ("no people", "without a car": then it is known absent). Absent
                       objects are proposed from the same supercategory as a present one
                       (a dog -> cat, horse, ...: plausible, hard distractors), then, by the
                       data engine, from the whole vocabulary.
  ChatExtractor        an OpenAI-compatible chat endpoint (a local vLLM or llama.cpp server,
                       as the paper used an LLM): captions sent in batches, answers as JSON,
                       retries with back-off, a cache keyed by model and caption, and one
                       clear error when the endpoint cannot be reached.

Truth: a caption names some of what an image shows, so "absent" here means "not mentioned
and plausible", the same open-world assumption the official pipeline makes; the data engine
therefore never uses the exclusive ("only A") templates for these sources.
"""
import dataclasses
import hashlib
import json
import os
import re
import time
import urllib.error
import urllib.request

import numpy as np

from negjax import cli

# COCO categories by supercategory (cocodataset.org), with common synonyms.
COCO = {
    "person": {"person": ["people", "man", "men", "woman", "women", "boy", "girl", "child",
                          "children", "kid", "guy", "lady", "ladies", "player", "persons"]},
    "vehicle": {"bicycle": ["bike"], "car": ["sedan"], "motorcycle": ["motorbike"],
                "airplane": ["plane", "aeroplane", "jet", "airliner"], "bus": [],
                "train": ["locomotive"], "truck": ["lorry"], "boat": ["ship", "sailboat"]},
    "outdoor": {"traffic light": ["stoplight"], "fire hydrant": ["hydrant"],
                "stop sign": [], "parking meter": [], "bench": []},
    "animal": {"bird": [], "cat": ["kitten", "kitty"], "dog": ["puppy", "pup"],
               "horse": ["pony"], "sheep": ["lamb"], "cow": ["cattle", "calf"],
               "elephant": [], "bear": [], "zebra": [], "giraffe": []},
    "accessory": {"backpack": [], "umbrella": [], "handbag": ["purse"], "tie": ["necktie"],
                  "suitcase": ["luggage"]},
    "sports": {"frisbee": [], "skis": ["ski"], "snowboard": [], "sports ball": ["ball"],
               "kite": [], "baseball bat": [], "baseball glove": ["mitt"],
               "skateboard": [], "surfboard": [], "tennis racket": ["racket", "racquet"]},
    "kitchen": {"bottle": [], "wine glass": [], "cup": ["mug"], "fork": [], "knife": [],
                "spoon": [], "bowl": []},
    "food": {"banana": [], "apple": [], "sandwich": [], "orange": [], "broccoli": [],
             "carrot": [], "hot dog": [], "pizza": [], "donut": ["doughnut"], "cake": []},
    "furniture": {"chair": [], "couch": ["sofa"], "potted plant": ["houseplant"],
                  "bed": [], "dining table": ["table"], "toilet": []},
    "electronic": {"tv": ["television"], "laptop": [], "mouse": [], "remote": [],
                   "keyboard": [], "cell phone": ["phone", "smartphone", "cellphone"]},
    "appliance": {"microwave": [], "oven": [], "toaster": [], "sink": [],
                  "refrigerator": ["fridge"]},
    "indoor": {"book": [], "clock": [], "vase": [], "scissors": [], "teddy bear": [],
               "hair drier": ["hair dryer", "hairdryer"], "toothbrush": []},
}
IRREGULAR = {"person": "people", "man": "men", "woman": "women", "child": "children",
             "mouse": "mice", "knife": "knives", "sheep": "sheep", "skis": "skis",
             "scissors": "scissors", "cattle": "cattle", "calf": "calves",
             "lady": "ladies", "luggage": "luggage"}
NEGATIONS = frozenset({"no", "not", "without", "never", "nor", "none", "zero", "lacking",
                       "absent", "missing"})
NEGATION_WINDOW = 3  # words between a negation and the object it negates ("no large brown dog")


class ExtractorError(cli.UserError):
  pass


@dataclasses.dataclass(frozen=True)
class Extraction:
  present: tuple
  absent: tuple  # known (negated in the caption) first, then proposed


def plural(word):
  if word in IRREGULAR:
    return IRREGULAR[word]
  if re.search(r"(s|x|z|ch|sh)$", word):
    return word + "es"
  if re.search(r"[^aeiou]y$", word):
    return word[:-1] + "ies"
  return word + "s"


def _words(text):
  return re.findall(r"[a-z]+", text.lower())


class VocabularyExtractor:
  """Category names, plurals and synonyms found in the caption (no model)."""

  def __init__(self, categories=COCO, num_proposed=3, seed=0):
    self.group = {name: group for group, names in categories.items() for name in names}
    self.vocabulary = tuple(sorted(self.group))
    self.num_proposed, self.seed = num_proposed, seed
    phrases = {}
    for names in categories.values():
      for name, synonyms in names.items():
        for form in [name, *synonyms]:
          for variant in (form, plural(form.split()[-1]) if " " not in form else
                          " ".join(form.split()[:-1] + [plural(form.split()[-1])])):
            phrases[tuple(variant.split())] = name
    # Longest phrase first: "hot dog" before "dog", "wine glass" before "glass".
    self.phrases = sorted(phrases.items(), key=lambda p: -len(p[0]))

  def extract_one(self, caption):
    words = _words(caption)
    taken = [False] * len(words)
    present, negated = {}, {}
    for phrase, name in self.phrases:
      n = len(phrase)
      for i in range(len(words) - n + 1):
        if tuple(words[i:i + n]) == phrase and not any(taken[i:i + n]):
          taken[i:i + n] = [True] * n
          before = words[max(0, i - NEGATION_WINDOW):i]
          (negated if NEGATIONS & set(before) else present).setdefault(name, i)
    present_names = tuple(sorted(present, key=present.get))
    known_absent = tuple(n for n in sorted(negated, key=negated.get) if n not in present)
    return Extraction(present_names, known_absent + self.propose(caption, present_names,
                                                                 known_absent))

  def propose(self, caption, present, absent):
    """Unmentioned categories of a present object's supercategory, seeded by the caption."""
    groups = {self.group[p] for p in present}
    pool = sorted(n for n in self.vocabulary if self.group[n] in groups
                  and n not in present and n not in absent)
    k = min(self.num_proposed, len(pool))
    if not k:
      return ()
    digest = hashlib.sha256(f"{self.seed}|{caption}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return tuple(pool[i] for i in sorted(rng.choice(len(pool), size=k, replace=False)))

  def extract(self, captions):
    return [self.extract_one(c) for c in captions]


PROMPT = """For each numbered image caption below, list the physical objects the caption says
are in the image ("present"), and 2 to 4 objects that are plausible in such a scene but not
mentioned ("absent"). Objects named with a negation ("no dogs") go in "absent". Use short
singular nouns. Answer with only a JSON list, one object per caption, in order:
[{"present": ["dog", "frisbee"], "absent": ["cat", "ball"]}, ...]

"""


class ChatExtractor:
  """Objects from an OpenAI-compatible `/chat/completions` endpoint.

  `url`: the API base (e.g. http://localhost:8000/v1). `cache`: a JSON-lines file of
  answers keyed by model and caption (reruns and restarts ask only for new captions)."""

  def __init__(self, url, model, batch_size=16, retries=3, timeout=120.0, cache=None,
               api_key=None, backoff=1.0):
    self.url = url.rstrip("/") + "/chat/completions"
    self.model, self.batch_size, self.retries = model, batch_size, retries
    self.timeout, self.backoff, self.cache_path = timeout, backoff, cache
    self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
    self.vocabulary = ()  # open vocabulary: absent objects come from the answers
    self.cache = {}
    if cache and os.path.exists(cache):
      with open(cache) as f:
        for line in f:
          if line.strip():
            entry = json.loads(line)
            self.cache[entry["key"]] = Extraction(tuple(entry["present"]),
                                                  tuple(entry["absent"]))
    self.requests = 0  # sent, for reports and tests

  def key(self, caption):
    return hashlib.sha256(f"{self.model}\n{caption}".encode()).hexdigest()

  def extract(self, captions):
    """One Extraction (or None: the endpoint gave no usable answer) per caption."""
    todo = list(dict.fromkeys(c for c in captions if self.key(c) not in self.cache))
    for start in range(0, len(todo), self.batch_size):
      batch = todo[start:start + self.batch_size]
      answers = self._ask(batch)
      if answers is None and len(batch) > 1:  # a malformed batch answer: one at a time
        answers = [(self._ask([c]) or [None])[0] for c in batch]
      self._remember(batch, answers or [None] * len(batch))
    return [self.cache.get(self.key(c)) for c in captions]

  def _remember(self, batch, answers):
    new = [(c, a) for c, a in zip(batch, answers) if a is not None]
    for c, a in new:
      self.cache[self.key(c)] = a
    if self.cache_path and new:
      os.makedirs(os.path.dirname(os.path.abspath(self.cache_path)), exist_ok=True)
      with open(self.cache_path, "a") as f:
        for c, a in new:
          f.write(json.dumps({"key": self.key(c), "caption": c, "present": list(a.present),
                              "absent": list(a.absent)}) + "\n")

  def _ask(self, batch):
    """Parsed answers for a batch, None if the answer stays malformed after retries;
    ExtractorError when the endpoint cannot be reached or refuses the request."""
    numbered = "\n".join(f"{i + 1}. {c}" for i, c in enumerate(batch))
    body = json.dumps({"model": self.model, "temperature": 0,
                       "messages": [{"role": "user", "content": PROMPT + numbered}]}).encode()
    headers = {"Content-Type": "application/json"}
    if self.api_key:
      headers["Authorization"] = f"Bearer {self.api_key}"
    problem = None
    for attempt in range(self.retries + 1):
      if attempt:
        time.sleep(self.backoff * 2 ** (attempt - 1))
      self.requests += 1
      try:
        request = urllib.request.Request(self.url, body, headers)
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
          reply = json.loads(response.read())
        answers = parse_answers(reply["choices"][0]["message"]["content"], len(batch))
        if answers is not None:
          return answers
        problem = "malformed answer"
      except urllib.error.HTTPError as e:
        if e.code not in (408, 429) and e.code < 500:  # our request is wrong: no retry
          raise ExtractorError(f"extractor endpoint {self.url} refused the request: HTTP "
                               f"{e.code} {e.read()[:300]!r}") from None
        problem = f"HTTP {e.code}"
      except (urllib.error.URLError, OSError) as e:  # refused, DNS, timeout
        problem = f"unreachable: {getattr(e, 'reason', e)}"
      except (ValueError, KeyError, IndexError, TypeError) as e:
        problem = f"not an OpenAI chat response ({type(e).__name__}: {e})"
    if problem.startswith("unreachable"):
      raise ExtractorError(f"cannot reach the extractor endpoint {self.url} after "
                           f"{self.retries + 1} tries ({problem}); start the server or fix "
                           f"--config.extractor_url") from None
    if problem.startswith("HTTP"):
      raise ExtractorError(f"extractor endpoint {self.url}: {problem} after "
                           f"{self.retries + 1} tries") from None
    return None


def parse_answers(text, n):
  """The model's text -> n Extractions, or None if it is not that JSON."""
  text = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
  try:
    items = json.loads(text)
  except ValueError:
    return None
  if not isinstance(items, list) or len(items) != n:
    return None
  out = []
  for item in items:
    if not isinstance(item, dict):
      return None
    lists = [item.get(k, []) for k in ("present", "absent")]
    if not all(isinstance(x, list) and all(isinstance(s, str) for s in x) for x in lists):
      return None
    present, absent = ([s.strip().lower() for s in x if s.strip()] for x in lists)
    present = list(dict.fromkeys(present))
    out.append(Extraction(tuple(present),
                          tuple(dict.fromkeys(a for a in absent if a not in present))))
  return out


def make_extractor(config):
  """The extractor `config.extractor` names ("vocabulary" or "chat")."""
  if config.extractor == "vocabulary":
    return VocabularyExtractor(num_proposed=config.num_absent, seed=config.seed)
  if config.extractor == "chat":
    if not config.extractor_url or not config.extractor_model:
      raise cli.UserError("extractor=chat needs --config.extractor_url (e.g. "
                          "http://localhost:8000/v1) and --config.extractor_model")
    return ChatExtractor(config.extractor_url, config.extractor_model,
                         config.extractor_batch, cache=config.extractor_cache or None)
  raise cli.UserError(f"extractor {config.extractor!r}: use vocabulary or chat")

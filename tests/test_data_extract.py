"""Objects from captions: vocabulary matcher, OpenAI-compatible endpoint client (against a
local server started here), and the data engine on a caption CSV."""
import http.server
import json
import os
import threading

import pytest

from negjax.data import extract, make, records
from test_data_official import write_caption_csv
from test_data_records import data_config


def test_vocabulary_matcher_plurals_synonyms_and_negation():
  e = extract.VocabularyExtractor(num_proposed=2)
  got = e.extract_one("Two puppies chase a frisbee while men watch, no cats around")
  assert got.present == ("dog", "frisbee", "person")
  assert got.absent[0] == "cat" and len(got.absent) == 3  # negated first, then 2 proposed
  assert all(e.group[a] in {"animal", "sports", "person"} for a in got.absent[1:])
  assert e.extract_one("a hot dog on a dining table").present == ("hot dog", "dining table")
  assert e.extract_one("a sunset over the sea").present == ()
  assert e.extract_one("x") == e.extract_one("x")  # proposals are seeded by the caption


class Server:
  """A tiny OpenAI-compatible chat server: answers from a script of responses."""

  def __init__(self, script):
    self.script, self.bodies = list(script), []
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        outer.bodies.append(body)
        status, content = outer.script.pop(0) if outer.script else (200, None)
        if content is None:  # default: answer every numbered caption by its first word
          lines = body["messages"][0]["content"].split("\n")
          captions = [l.split(". ", 1)[1] for l in lines if l[:1].isdigit() and ". " in l]
          content = json.dumps([{"present": [c.split()[0]], "absent": ["Zebra"]}
                                for c in captions])
        reply = json.dumps({"choices": [{"message": {"role": "assistant",
                                                     "content": content}}]}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server():
  servers = []

  def start(*script):
    servers.append(Server(script))
    return servers[-1]
  yield start
  for s in servers:
    s.close()


def test_chat_batches_retries_and_caches(server, tmp_path):
  s = server((503, "busy"), (200, "not json at all"), (200, "```json\n[1, 2]\n```"))
  cache = str(tmp_path / "cache.jsonl")
  captions = [f"cup {i}" for i in range(5)] + ["cup 0"]  # a repeat is asked once
  e = extract.ChatExtractor(s.url, "m", batch_size=3, retries=2, cache=cache, backoff=0)
  got = e.extract(captions)
  # batch 1: 503, malformed, malformed -> asked one caption at a time; batch 2: at once
  assert [g.present for g in got] == [("cup",)] * 6
  assert got[0].absent == ("zebra",)
  assert e.requests == 3 + 3 + 1
  assert all(b["model"] == "m" and b["temperature"] == 0 for b in s.bodies)
  again = extract.ChatExtractor(s.url, "m", cache=cache, backoff=0)
  assert again.extract(captions) == got and again.requests == 0  # all from the cache
  other_model = extract.ChatExtractor(s.url, "m2", cache=cache, backoff=0)
  other_model.extract(["cup 0"])
  assert other_model.requests == 1  # the cache is keyed by model and caption


def test_chat_gives_up_on_one_caption_not_the_run(server):
  s = server(*[(200, "[]")] * 2)  # both tries for the first caption: malformed
  e = extract.ChatExtractor(s.url, "m", batch_size=1, retries=1, backoff=0)
  assert e.extract(["a", "b"]) == [None, extract.Extraction(("b",), ("zebra",))]


def test_chat_unreachable_is_one_clear_error(server):
  s = server()
  url = s.url
  s.close()
  e = extract.ChatExtractor(url, "m", retries=1, backoff=0, timeout=5)
  with pytest.raises(extract.ExtractorError, match="cannot reach the extractor endpoint "
                     r"http://127.0.0.1:\d+/v1/chat/completions after 2 tries"):
    e.extract(["a dog"])
  s2 = server((400, "bad"))
  with pytest.raises(extract.ExtractorError, match="refused the request: HTTP 400"):
    extract.ChatExtractor(s2.url, "m", backoff=0).extract(["a dog"])


def test_data_engine_on_captions(tmp_path):
  csv_path = str(tmp_path / "pairs.tsv")
  write_caption_csv(csv_path, 4, extra_rows=[["imgs/000.jpg", "a sunset", "[]"]])
  captions = ["a dog and a frisbee on grass", "two cats on a couch, no dogs",
              "a man with an umbrella", "pizza and a cup of coffee"]
  with open(csv_path) as f:
    lines = f.read().split("\n")
  for i, c in enumerate(captions):
    lines[i + 1] = lines[i + 1].replace(f"caption {i}", c)
  with open(csv_path, "w") as f:
    f.write("\n".join(lines))
  config = data_config("captions", out=str(tmp_path / "out"), train_csv=csv_path,
                       eval_csv=csv_path, image_size=32, shards=1, workers=1)
  summary = make.build(config)
  assert summary["train"]["records"] == 4 and summary["eval"]["images"] == 4
  assert any("no known object in 'a sunset'" in s["reason"] for s in summary["skipped"])
  source = records.training_source(str(tmp_path / "out" / "train"))
  cats = [source[i] for i in range(4) if source[i]["present"] == "cat;couch"]
  assert len(cats) == 1 and cats[0]["absent"].split(";")[0] == "dog"
  for i in range(4):
    ex = source[i]
    present = set(ex["present"].split(";"))
    assert not present & set(ex["absent"].split(";"))
    assert set(ex["negcap_negated"]) <= set(ex["absent"].split(";"))
    # open world: never the exclusive templates ("no X, only A", "no X here, just A")
    assert not any(", only " in t or " here, just " in t for t in ex["negcap"])

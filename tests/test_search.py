"""Image search: index, query, baselines, the evaluator's baseline option, the server's
file rules. Images are one-object shapes scenes whose content is known; the model is the
shapes-CLIP inside negjax."""
import http.client
import os
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import search_helpers
from negjax import cli, evaluate, metrics
from negjax.data import captions, shapes
from negjax.models import weights
from negjax.search import __main__ as search_cli
from negjax.search import baselines, server
from negjax.search import index as index_lib
from negjax.search import query as query_lib


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return search_helpers.make_folder(str(tmp_path_factory.mktemp("images")))


@pytest.fixture(scope="module")
def shapes_model():
  """The packaged model and its encoders, compiled once for the whole module."""
  model = weights.load_model(index_lib.checkpoint_path("shapes"))
  return model, evaluate.Encoders(model)


@pytest.fixture(scope="module")
def built(folder, tmp_path_factory, shapes_model):
  out = str(tmp_path_factory.mktemp("index") / "shapes.npz")
  index_lib.build(folder, "shapes", out, 4, 0, None, *shapes_model, progress=False)
  return out


@pytest.fixture(scope="module")
def searcher(built, shapes_model):
  return query_lib.Searcher(built, encoders=shapes_model[1])


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory, shapes_model):
  """Another checkpoint by content: the same model written in float16."""
  path = str(tmp_path_factory.mktemp("ckpt") / "half.safetensors")
  weights.save_open_clip(shapes_model[0], path, "float16")
  return path


# ------------------------------------------------------------------ caption grammar


def test_parse_reads_back_every_negated_caption_the_engine_writes():
  seen = set()
  for i in range(200):
    scene = shapes.sample_scene(shapes.scene_rng(3, 1, i))
    present = [o.name for o in scene.objects]
    ann = captions.annotate(present, scene.absent, captions.caption_rng(3, 1, i),
                            closed_world=True)
    for c in ann.negcap + ann.mcq:
      got = captions.parse(c.text)
      if not c.negated:  # positive MCQ options negate nothing
        assert got is None, c.text
        continue
      seen.add(got.template)
      assert got.affirmed == (captions.join(c.affirmed) if c.affirmed else ""), c.text
      assert got.negated in (c.negated[0], captions.with_article(c.negated[0])), c.text
    for c in ann.affirmative:
      assert captions.parse(c.text) is None, c.text
  assert seen == set(captions.NEGCAP_TEMPLATES) | {"mcq_negative", "mcq_hybrid"}
  assert captions.parse("A kitchen but no people.") == captions.Negation(
      "A kitchen", "people", "but_no")
  assert captions.parse("a kitchen, no people") is None  # not a template: no guessing


def test_decompose_scores_affirmed_minus_alpha_negated_and_falls_back_to_plain():
  rng = np.random.default_rng(0)
  table = {}

  def encode(texts):  # a fake text tower: a fixed random vector per distinct string
    return np.stack([table.setdefault(t, rng.normal(size=8)) for t in texts])

  texts = ["a red circle but no blue square", "a red circle", "this image does not feature a cat"]
  q, n = baselines.query_vectors(encode, texts, "decompose", alpha=0.5)
  unit = lambda t: table[t] / np.linalg.norm(table[t])
  assert n == 2
  np.testing.assert_allclose(q[0], unit("a red circle") - 0.5 * unit("blue square"), atol=1e-6)
  np.testing.assert_allclose(q[1], unit("a red circle"), atol=1e-6)  # no negation: plain
  np.testing.assert_allclose(q[2], -0.5 * unit("a cat"), atol=1e-6)
  plain, n = baselines.query_vectors(encode, texts[:1], "plain")
  assert n == 0
  np.testing.assert_allclose(plain[0], unit(texts[0]), atol=1e-6)
  with pytest.raises(cli.UserError, match="baseline"):
    baselines.query_vectors(encode, texts, "clever")


def test_scored_encoders_keep_the_decomposed_order_under_the_metrics_normalisation(searcher):
  """The evaluator normalises text features; Scored's extra coordinate makes every
  normalised dot product exactly score / (1 + alpha)."""
  enc = searcher.enc
  scored = baselines.Scored(enc, "decompose", 2.0)
  texts = ["a red circle but no blue square", "a blue square", "no green star here, just a "
           "yellow triangle", "this image features a red circle but not a blue square"]
  from negjax.image import preprocess
  images = jnp.asarray(np.stack([preprocess(search_helpers.render(o), 64)  # 4: as compiled
                                 for o in list(search_helpers.SCENES.values())[:4]]))
  options = jnp.asarray(scored.texts(texts, 8))  # [texts, D + 1]
  got = metrics.mcq_logits(scored.image(images),
                           jnp.broadcast_to(options, (len(images),) + options.shape))
  assert scored.take_count() == 3
  image = np.asarray(enc.image(images))
  image = image / np.linalg.norm(image, axis=-1, keepdims=True)
  q, _ = searcher.query_vectors(texts, "decompose", 2.0)
  np.testing.assert_allclose(np.asarray(got), image @ q.T / 3.0, atol=1e-5)


def test_evaluator_reports_the_decompose_baseline(tmp_path, shapes_model, folder):
  """A retrieval file of negated captions that decomposition gets right (the images'
  objects are known), and a caption it cannot split, scored plainly."""
  csv = tmp_path / "toy_val_negated_retrieval.csv"
  rows = {"red_circle.png": ["a red circle but no blue square"],
          "blue_square.png": ["a blue square but no red circle"],
          "red_circle_blue_square.png": ["a red circle and a blue square"]}
  csv.write_text("filepath,captions\n" + "".join(
      f"{os.path.join(folder, k)},\"{v!r}\"\n" for k, v in rows.items()))
  dec = evaluate.evaluate_files(shapes_model[0], [str(csv)], batch_size=4, progress=False,
                                baseline="decompose", alpha=1.0)
  key = "toy_val_negated_retrieval"
  assert dec[key]["baseline"] == "decompose" and dec[key]["decomposed_texts"] == 2
  assert dec[key]["image_retrieval_recall@1"] == 1.0  # each caption finds its own image


def test_evaluate_config_refuses_an_unknown_baseline():
  from configs import negbench
  c = negbench.get_config()
  c.checkpoint, c.baseline = "x", "magic"
  with pytest.raises(cli.UserError, match="baseline must be one of plain, decompose"):
    evaluate.check_config(c)
  c.baseline, c.alpha = "decompose", -1.0
  with pytest.raises(cli.UserError, match="alpha"):
    evaluate.check_config(c)


# --------------------------------------------------------------------------- index


def test_index_holds_every_readable_image_and_lists_the_rest(built, folder, shapes_model):
  index = index_lib.load(built)
  assert index.paths == sorted(search_helpers.SCENES)  # notes.txt is not an image
  assert [s["path"] for s in index.skipped] == ["broken.png"]
  assert index.model == "negjax-shapes" and index.checkpoint["name"] == "shapes"
  assert index.checkpoint["sha256"] == index_lib.checkpoint_record("shapes")["sha256"]
  np.testing.assert_allclose(np.linalg.norm(index.features, axis=1), 1, atol=1e-5)
  # the evaluator's own encoding, row for row
  feats, ok, _ = evaluate.encode_media(shapes_model[1],
                                       [os.path.join(folder, p) for p in index.paths], 4)
  assert ok.all()
  np.testing.assert_allclose(index.features,
                             feats / np.linalg.norm(feats, axis=1, keepdims=True), atol=1e-5)


def test_rerun_encodes_only_new_and_changed_files_and_drops_deleted(tmp_path, shapes_model):
  folder = search_helpers.make_folder(str(tmp_path / "images"))
  out = str(tmp_path / "i.npz")
  lines = []
  build = lambda: index_lib.build(folder, "shapes", out, 4, 0, None, *shapes_model,
                                  progress=False, log=lines.append)
  first = build()
  assert "5 encoded, 0 kept, 0 dropped" in lines[-1]
  build()
  assert "0 encoded, 5 kept, 0 dropped" in lines[-1]
  touched = os.path.join(folder, "blue_square.png")  # same bytes, new mtime: kept
  os.utime(touched, ns=(time.time_ns(), time.time_ns() + 10**9))
  changed = os.path.join(folder, "red_circle.png")  # new content: encoded again
  Image.fromarray(search_helpers.render(("green star",))).save(changed)
  os.remove(os.path.join(folder, "yellow_triangle.png"))
  Image.fromarray(search_helpers.render(("purple heart",))).save(
      os.path.join(folder, "new.png"))
  second = build()
  assert "2 encoded, 3 kept, 1 dropped" in lines[-1]
  assert second.paths == sorted(["red_circle_blue_square.png", "blue_square.png",
                                 "sub/green_star.png", "red_circle.png", "new.png"])
  row = lambda ix, p: ix.features[ix.paths.index(p)]
  np.testing.assert_array_equal(row(second, "blue_square.png"), row(first, "blue_square.png"))
  assert np.abs(row(second, "red_circle.png") - row(first, "red_circle.png")).max() > 0.05
  np.testing.assert_allclose(row(second, "red_circle.png"), row(first, "sub/green_star.png"),
                             atol=0.05)  # now holds a green star
  assert not any(n.startswith("i.npz.tmp") for n in os.listdir(tmp_path))


def test_index_errors_name_the_folder_and_both_checkpoints(tmp_path, built, folder,
                                                            other_checkpoint):
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "readme.txt").write_text("no images")
  with pytest.raises(cli.UserError, match=f"--images {empty}: no image files"):
    index_lib.build(str(empty), "shapes", str(tmp_path / "x.npz"))
  with pytest.raises(cli.UserError, match="no such folder"):
    index_lib.build(str(tmp_path / "missing"), "shapes", str(tmp_path / "x.npz"))
  with pytest.raises(cli.UserError) as e:
    index_lib.build(folder, other_checkpoint, built)  # updating with another model
  assert "made with shapes" in str(e.value) and other_checkpoint in str(e.value)
  with pytest.raises(cli.UserError) as e:
    query_lib.Searcher(built, checkpoint=other_checkpoint)
  assert "made with shapes" in str(e.value) and other_checkpoint in str(e.value)


def test_cli_errors_are_one_line_and_exit_2(tmp_path):
  import subprocess
  import sys
  empty = tmp_path / "nothing"
  empty.mkdir()
  result = subprocess.run([sys.executable, "-m", "negjax.search", "index", "--images",
                           str(empty), "--checkpoint", "shapes", "--out", str(tmp_path / "o.npz")],
                          capture_output=True, text=True)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: --images {empty}: no image files in it "
      f"({', '.join(index_lib.IMAGE_EXTENSIONS)})")


# --------------------------------------------------------------------------- query


def test_query_ranks_the_matching_image_first(searcher):
  for text, best in (("a green star", "sub/green_star.png"),
                     ("a yellow triangle", "yellow_triangle.png"),
                     ("a blue square", "blue_square.png")):
    results = searcher.search(text, top=3)
    assert results[0][0] == best and len(results) == 3
    assert results[0][1] >= results[1][1] >= results[2][1]


def test_decompose_gets_the_negated_query_right(searcher):
  top = searcher.search("a red circle but no blue square", 5, "decompose")
  assert top[0][0] == "red_circle.png"
  top = searcher.search("a blue square but no red circle", 5, "decompose")
  assert top[0][0] == "blue_square.png"
  notes = []
  searcher.search("a green star", 5, "decompose", notes=notes)
  assert notes == ["note: no negation found by the caption templates; scored plainly"]


def test_jitted_top_k_matches_numpy():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(1000, 16)).astype(np.float32)
  q = rng.normal(size=(3, 16)).astype(np.float32)
  scores, rows = query_lib.top_k(jnp.asarray(feats), jnp.asarray(q), 7)
  want = np.argsort(-(q @ feats.T), axis=1)[:, :7]
  np.testing.assert_array_equal(np.asarray(rows), want)
  np.testing.assert_allclose(np.asarray(scores), np.take_along_axis(q @ feats.T, want, 1),
                             rtol=1e-5)


def test_long_query_is_cut_with_a_note(searcher):
  notes = []
  text = "a green star " + "and a very long tail of words " * 20
  results = searcher.search(text, 2, notes=notes)
  assert len(results) == 2
  assert len(notes) == 1 and "longer than the model's context of 77" in notes[0]
  assert "first 75 tokens" in notes[0]


def test_query_command_prints_two_models_side_by_side(built, capsys):
  search_cli.main(["query", built, "a green star", "--top", "2", "--compare", built])
  out = capsys.readouterr().out.splitlines()
  assert out[0] == "query: a green star"
  assert out[1].split() == ["rank", "negjax-shapes", "[shapes]", "negjax-shapes", "[shapes]"]
  assert len(out) == 4
  rank, score, path, score2, path2 = out[2].split()
  assert (rank, path, path2) == ("1", "sub/green_star.png", "sub/green_star.png")
  assert score == score2 and float(score) > float(out[3].split()[1])


# -------------------------------------------------------------------------- server


def test_server_serves_indexed_files_only(searcher, folder, tmp_path):
  outside = os.path.join(os.path.dirname(folder), "secret.png")
  Image.fromarray(search_helpers.render(("red heart",))).save(outside)
  httpd = server.make_server([], "127.0.0.1", 0, searchers=[searcher])
  assert httpd.server_address[0] == "127.0.0.1"
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  try:
    def get(path):
      conn = http.client.HTTPConnection("127.0.0.1", httpd.server_address[1], timeout=30)
      conn.request("GET", path)  # sent as written: no client-side normalisation
      response = conn.getresponse()
      return response.status, response.read()
    status, body = get("/image/0/sub/green_star.png")
    assert status == 200 and body.startswith(b"\x89PNG")
    status, _ = get("/image/0/sub%2Fgreen_star.png")
    assert status == 200
    for attack in ("/image/0/../secret.png", "/image/0/%2e%2e/secret.png",
                   "/image/0/%2E%2E%2Fsecret.png", "/image/0/sub/../../secret.png",
                   "/image/0/..%2f..%2fsecret.png", "/image/0/" + outside,
                   "/image/0/%2f" + outside.lstrip("/"), "/image/1/blue_square.png",
                   "/image/0/broken.png", "/static/../server.py", "/static/%2e%2e/server.py"):
      status, body = get(attack)
      assert status == 404, attack
      assert b"red heart" not in body and not body.startswith(b"\x89PNG"), attack
    status, body = get("/api/search?q=a+green+star&top=2")
    assert status == 200 and b"sub/green_star.png" in body
    status, body = get("/api/search?q=x&baseline=nope")
    assert status == 400 and b"baseline must be one of" in body
  finally:
    httpd.shutdown()
    httpd.server_close()


# ---------------------------------------------------------------------------- demo


def test_demo_compares_two_models_on_known_images(folder, tmp_path, shapes_model):
  from negjax.search import demo
  truth = {name: set(objects) for name, objects in search_helpers.SCENES.items()}
  lines = []
  text, precision = demo.compare(truth, folder, {"initial": "shapes", "again": "shapes"},
                                 str(tmp_path), top=2, batch_size=8, log=lines.append)
  np.testing.assert_array_equal(precision["initial"], precision["again"])
  queries = [q for q in demo.candidate_queries()
             if sum(q[1] in p and q[2] not in p for p in truth.values()) >= 2]
  assert text in [q[0] for q in queries] and len(precision["initial"]) == len(queries)
  # precision@2 of one query, from the searcher's own ranking and the known objects
  s = query_lib.Searcher(str(tmp_path / "initial.npz"), encoders=shapes_model[1])
  i = [q[0] for q in queries].index("a red circle but no green star")
  got = [p for p, _ in s.search("a red circle but no green star", 2)]
  assert precision["initial"][i] == np.mean(
      ["red circle" in truth[p] and "green star" not in truth[p] for p in got])
  assert any(f'"{text}"' in line for line in lines)
  assert sum(line.strip().startswith(("1. ", "2. ")) for line in lines) == 4  # 2 x top 2

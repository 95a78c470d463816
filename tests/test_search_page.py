"""The search page in a real headless browser: Debian's chromium (/usr/bin/chromium, installed
by .ci/run) driven by Playwright. The images are one-object shapes scenes whose content is
known, indexed with the shapes-CLIP inside negjax, shown as two columns (two searchers).

Set NEGJAX_SEARCH_SCREENSHOT=PATH to keep a copy of the page's screenshot.
"""
import os
import shutil
import threading

import numpy as np
import pytest
from PIL import Image

import search_helpers
from negjax import evaluate
from negjax.models import weights
from negjax.search import index as index_lib
from negjax.search import query as query_lib
from negjax.search import server

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
  folder = search_helpers.make_folder(str(tmp_path_factory.mktemp("images")))
  out = str(tmp_path_factory.mktemp("index") / "shapes.npz")
  model = weights.load_model(index_lib.checkpoint_path("shapes"))
  enc = evaluate.Encoders(model)
  index_lib.build(folder, "shapes", out, 8, 0, None, model, enc, progress=False)
  searchers = [query_lib.Searcher(out, encoders=enc), query_lib.Searcher(out, encoders=enc)]
  httpd = server.make_server([], "127.0.0.1", 0, top=5, searchers=searchers)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield folder, f"http://127.0.0.1:{httpd.server_address[1]}/"
  httpd.shutdown()
  httpd.server_close()


@pytest.fixture(scope="module")
def browser():
  from playwright.sync_api import sync_playwright
  assert os.path.exists(CHROMIUM), "chromium missing: apt-get install -y chromium (.ci/run)"
  with sync_playwright() as p:
    b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
    yield b
    b.close()


def _search(page, text=None, baseline=None):
  """Types a query or flips the baseline, and waits for the grid and its images."""
  with page.expect_response(lambda r: "/api/search" in r.url):
    if text is not None:
      page.fill("#query", text)
      page.click("button[type=submit]")
    else:
      page.check(f"input[name=baseline][value={baseline}]")
  page.wait_for_function("document.body.dataset.state === 'done'")
  page.wait_for_function(
      "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
  return [page.locator(".column").nth(i).locator(".path").all_inner_texts()
          for i in range(page.locator(".column").count())]


def test_page_shows_the_expected_top_image_and_the_grid(site, browser, tmp_path):
  folder, url = site
  page = browser.new_page(viewport={"width": 1000, "height": 700}, device_scale_factor=1)
  page.goto(url)
  columns = _search(page, "a green star")
  assert len(columns) == 2  # two models side by side
  for paths in columns:
    assert paths[0] == "sub/green_star.png" and len(paths) == 5
    assert sorted(paths) == sorted(search_helpers.SCENES)
  scores = [float(s) for s in page.locator(".column").first.locator(".score").all_inner_texts()]
  assert scores == sorted(scores, reverse=True)

  shot = str(tmp_path / "page.png")
  page.screenshot(path=shot)
  if os.environ.get("NEGJAX_SEARCH_SCREENSHOT"):
    shutil.copy(shot, os.environ["NEGJAX_SEARCH_SCREENSHOT"])
  image = np.asarray(Image.open(shot).convert("RGB"), np.float32)
  assert image.shape == (700, 1000, 3)
  assert image.std() > 20  # not a blank page

  def drawn(n):  # what the screenshot shows inside the n-th thumbnail of the first column
    box = page.locator(".column").first.locator(".card img").nth(n).bounding_box()
    x, y = int(round(box["x"])) + 1, int(round(box["y"])) + 1  # inside the 1 px border
    return image[y:y + 128, x:x + 128]

  def source(name):  # the file, as the page scales it: 64 -> 128 px, pixelated
    return np.repeat(np.repeat(search_helpers.pixels(folder, name), 2, 0), 2, 1)

  first = np.abs(drawn(0) - source("sub/green_star.png")).mean()
  other = np.abs(drawn(0) - source(columns[0][1])).mean()
  assert first < 6 and other > 3 * first, (first, other)  # the grid shows that very image


def test_baseline_toggle_reranks_a_negated_query(site, browser):
  _, url = site
  page = browser.new_page()
  page.goto(url)
  _search(page, "a red circle but no blue square")
  columns = _search(page, baseline="decompose")  # flipping the toggle searches again
  assert columns[0][0] == "red_circle.png" and columns[1][0] == "red_circle.png"
  assert page.locator("#notes").inner_text() == ""
  columns = _search(page, "a green star")  # the baseline stays; no negation: plain, said so
  assert columns[0][0] == "sub/green_star.png"
  assert "no negation found" in page.locator("#notes").inner_text()

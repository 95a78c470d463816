"""The local search page: `python -m negjax.search serve INDEX [INDEX2] --port 8000`.

Python's standard library serves it (http.server): one page, one JSON endpoint and the
thumbnails need no routing, templating or sessions, and a web framework would be one more
dependency to install and keep up to date for all of negjax. It binds to 127.0.0.1 unless
`--host` says otherwise.

Routes: `/` the page, `/static/NAME` its script and style, `/api/config` the models,
`/api/search?q=TEXT&baseline=plain|decompose&alpha=A&top=K` the ranked results of every
model, `/image/MODEL/PATH` a thumbnail. A thumbnail is served only for a PATH that is one
of that index's files (looked up, never joined onto a folder) whose real location is still
inside the indexed folder: `../`, encoded or not, and links out of the folder get 404.
"""
import functools
import http.server
import importlib.resources
import io
import json
import os
import sys
import threading
import urllib.parse

from negjax import cli
from negjax.search import baselines
from negjax.search import query as query_lib

STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
THUMBNAIL = 160  # pixels, longest side
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def _static(name):
  return importlib.resources.files("negjax.search").joinpath("static", name).read_bytes()


class App:
  """The searchers behind the page; the handler calls `search` and `thumbnail`."""

  def __init__(self, searchers, top=20):
    self.searchers = searchers
    self.top = top
    self.lock = threading.Lock()  # one query at a time through the model

  def config(self):
    return {"models": [{"name": s.name, "checkpoint": s.checkpoint,
                        "images": len(s.index.files), "folder": s.index.folder}
                       for s in self.searchers],
            "baselines": list(baselines.BASELINES), "alpha": baselines.DEFAULT_ALPHA,
            "top": self.top}

  def search(self, text, baseline="plain", alpha=baselines.DEFAULT_ALPHA, top=None):
    top = self.top if top is None else top
    notes, columns = [], []
    with self.lock:
      for i, s in enumerate(self.searchers):
        results = s.search(text, top, baseline, alpha, notes)
        columns.append({"name": s.name, "checkpoint": s.checkpoint, "results": [
            {"path": p, "score": round(score, 4),
             "url": f"/image/{i}/{urllib.parse.quote(p)}"} for p, score in results]})
    return {"query": text, "baseline": baseline, "alpha": alpha,
            "notes": list(dict.fromkeys(notes)), "columns": columns}

  def file(self, model, relative):
    """The indexed file `relative` of model `model`, or None: only files the index lists,
    and only while they really lie inside its folder."""
    if not 0 <= model < len(self.searchers):
      return None
    index = self.searchers[model].index
    if relative not in self._listed(model):
      return None
    full = os.path.realpath(os.path.join(index.folder, relative))
    root = os.path.realpath(index.folder)
    return full if os.path.commonpath([root, full]) == root and os.path.isfile(full) else None

  @functools.lru_cache(maxsize=4)
  def _listed(self, model):
    return frozenset(self.searchers[model].index.paths)

  @functools.lru_cache(maxsize=4096)
  def _thumbnail(self, full, mtime_ns):
    del mtime_ns  # cache key only
    from negjax.image import open_image
    image = open_image(full)
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    out = io.BytesIO()
    image.convert("RGBA" if "A" in image.getbands() else "RGB").save(out, "PNG")
    return out.getvalue()

  def thumbnail(self, model, relative):
    full = self.file(model, relative)
    if full is None:
      return None
    return self._thumbnail(full, os.stat(full).st_mtime_ns)


class Handler(http.server.BaseHTTPRequestHandler):
  app: App = None  # set by make_server

  def log_message(self, format, *args):  # quiet: one line per error only
    if args and str(args[1] if len(args) > 1 else "").startswith(("4", "5")):
      sys.stderr.write(f"{self.address_string()} {format % args}\n")

  def send(self, status, body, content_type="application/json; charset=utf-8"):
    if not isinstance(body, bytes):
      body = json.dumps(body).encode()
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    self.send_header("X-Content-Type-Options", "nosniff")
    self.end_headers()
    self.wfile.write(body)

  def do_GET(self):
    url = urllib.parse.urlsplit(self.path)
    route = url.path
    try:
      if route in ("/", "/index.html"):
        return self.send(200, _static("index.html"), STATIC["index.html"])
      if route.startswith("/static/") and route[len("/static/"):] in STATIC:
        name = route[len("/static/"):]
        return self.send(200, _static(name), STATIC[name])
      if route == "/favicon.ico":
        return self.send(204, b"", "image/x-icon")
      if route == "/api/config":
        return self.send(200, self.app.config())
      if route == "/api/search":
        return self._search(urllib.parse.parse_qs(url.query))
      if route.startswith("/image/"):
        model, _, relative = route[len("/image/"):].partition("/")
        data = self.app.thumbnail(int(model) if model.isdigit() else -1,
                                  urllib.parse.unquote(relative))
        if data is not None:
          return self.send(200, data, "image/png")
      return self.send(404, {"error": "not found"})
    except (cli.UserError, ValueError) as e:
      return self.send(400, {"error": str(e)})

  def _search(self, params):
    text = params.get("q", [""])[0]
    baseline = params.get("baseline", ["plain"])[0]
    try:
      alpha = float(params.get("alpha", [baselines.DEFAULT_ALPHA])[0])
      top = int(params.get("top", [self.app.top])[0])
    except ValueError:
      raise cli.UserError("alpha must be a number and top an integer") from None
    if not 1 <= top <= 200:
      raise cli.UserError(f"top must be in [1, 200], got {top}")
    baselines.check(baseline, alpha)
    return self.send(200, self.app.search(text, baseline, alpha, top))


def make_server(indexes, host="127.0.0.1", port=8000, top=20, arch=None, searchers=None):
  """A ready (not yet serving) HTTP server for one or two indexes; port 0 picks a free one."""
  if searchers is None:
    searchers = [query_lib.Searcher(path, arch=arch) for path in indexes]
  handler = type("BoundHandler", (Handler,), {"app": App(searchers, top)})
  try:
    return http.server.ThreadingHTTPServer((host, port), handler)
  except OSError as e:
    raise cli.UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e


def serve(indexes, host="127.0.0.1", port=8000, top=20, arch=None):
  server = make_server(indexes, host, port, top, arch)
  if host not in LOCAL_HOSTS:
    print(f"warning: listening on {host}: anyone who can reach this machine can search and "
          "see the indexed images", file=sys.stderr)
  name = f"[{host}]" if ":" in host else host
  print(f"search page: http://{name}:{server.server_address[1]}/  (Ctrl-C to stop)",
        flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()

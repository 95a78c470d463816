"""`python -m negjax.search index|query|serve`: image search with negated queries.

  python -m negjax.search index --images DIR --checkpoint CKPT --out INDEX.npz
  python -m negjax.search query INDEX.npz "a red circle but no blue square" [--top 20] \
      [--compare INDEX2.npz] [--baseline decompose --alpha 1.0]
  python -m negjax.search serve INDEX.npz [INDEX2.npz] [--port 8000] [--host 127.0.0.1]

CKPT is any checkpoint `negjax.load_model` reads, `openai:ARCH`, or `shapes` (the
shapes-CLIP inside negjax). Mistakes are one `error:` line and exit status 2 (`--debug`
for the traceback).
"""
import argparse
import sys

from negjax import cli
from negjax.search import baselines


def parser():
  p = argparse.ArgumentParser(prog="python -m negjax.search", description=__doc__.split("\n")[0])
  p.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
  sub = p.add_subparsers(dest="command", required=True)

  i = sub.add_parser("index", help="embed every image of a folder once")
  i.add_argument("--images", required=True, help="folder of images (searched recursively)")
  i.add_argument("--checkpoint", required=True, help="weights file, openai:ARCH or shapes")
  i.add_argument("--out", required=True, help="index file (.npz); an existing one is updated")
  i.add_argument("--arch", default=None, help="architecture, when the file does not record it")
  i.add_argument("--batch-size", type=int, default=64)
  i.add_argument("--workers", type=int, default=0, help="Grain processes decoding images")

  def scoring(s):
    s.add_argument("--baseline", choices=baselines.BASELINES, default="plain",
                   help="decompose: sim(affirmed) - alpha * sim(negated)")
    s.add_argument("--alpha", type=float, default=baselines.DEFAULT_ALPHA)

  q = sub.add_parser("query", help="rank the indexed images for a text")
  q.add_argument("index")
  q.add_argument("text")
  q.add_argument("--top", type=int, default=20)
  q.add_argument("--compare", default=None, help="a second index, shown side by side")
  q.add_argument("--checkpoint", default=None,
                 help="query with this checkpoint (must be the index's); default: the index's")
  q.add_argument("--arch", default=None)
  scoring(q)

  s = sub.add_parser("serve", help="a local search page")
  s.add_argument("indexes", nargs="+", metavar="INDEX", help="one or two indexes")
  s.add_argument("--port", type=int, default=8000)
  s.add_argument("--host", default="127.0.0.1",
                 help="address to listen on (default: this machine only)")
  s.add_argument("--top", type=int, default=20)
  s.add_argument("--arch", default=None)
  return p


def main(argv=None):
  args = parser().parse_args(argv)
  if args.command == "index":
    from negjax.search import index
    if args.batch_size < 1 or args.workers < 0:
      raise cli.UserError("--batch-size must be >= 1 and --workers >= 0")
    index.build(args.images, args.checkpoint, args.out, args.batch_size, args.workers,
                args.arch)
  elif args.command == "query":
    from negjax.search import query
    query.run(args.index, args.text, args.top, args.compare, args.checkpoint, args.baseline,
              args.alpha, args.arch)
  else:
    from negjax.search import server
    if len(args.indexes) > 2:
      raise cli.UserError(f"serve takes one or two indexes, got {len(args.indexes)}")
    server.serve(args.indexes, args.host, args.port, args.top, args.arch)


if __name__ == "__main__":
  try:
    main(sys.argv[1:])
  except cli.user_errors() as e:
    if cli.debugging():
      raise
    cli.fail(e)

"""How every negjax command ends: a user's mistake is one `error: ...` line and exit 2.

A mistake is a bad flag or config (typo, wrong type, missing `--config`), a malformed
input file, an unusable checkpoint, an unwritable folder: anything raised as `UserError`
or one of the error classes in `user_errors()`. Anything else is a bug and keeps its
traceback. `--debug` on the command line, or NEGJAX_DEBUG=1, shows the traceback for a
user error too.
"""
import os
import sys

EXIT_USER_ERROR = 2


class UserError(Exception):
  """A problem the user can fix; its message says what and where."""


def user_errors() -> tuple:
  """Exception classes that mean "the input is wrong", not "negjax is wrong"."""
  from negjax.data.annotations import AnnotationError
  from negjax.data.negbench import NegBenchFormatError
  from negjax.models.weights import CheckpointError
  return (UserError, AnnotationError, NegBenchFormatError, CheckpointError,
          FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
          UnicodeDecodeError)


def debugging(argv=None) -> bool:
  argv = sys.argv if argv is None else argv
  return "--debug" in argv or os.environ.get("NEGJAX_DEBUG", "") not in ("", "0")


def fail(message, at_once: bool = False) -> None:
  """Ends the process with one `error:` line on stderr and exit status 2. `at_once` skips
  Python's shutdown, which waits for every non-daemon thread: after a failed write a
  library's background threads (Orbax's) can wait on each other forever."""
  text = " ".join(str(message).split("\n")[0].split()) or "unknown error"
  print(f"error: {text}", file=sys.stderr, flush=True)
  if at_once:
    sys.stdout.flush()
    os._exit(EXIT_USER_ERROR)
  sys.exit(EXIT_USER_ERROR)


def parse_flags(argv, required=("config",)):
  """absl/ml_collections flag parsing whose failures are one line (exit 2), not absl's
  usage dump or a traceback from inside the config machinery."""
  from absl import flags
  argv = [a for a in argv if a != "--debug"]
  try:
    rest = flags.FLAGS(argv)
  except Exception as e:  # flags.Error, and the KeyError/AttributeError of a config typo
    if debugging():
      raise
    message = str(e)
    if isinstance(e, (KeyError, AttributeError)) and e.args:  # a typo in a config key
      message = str(e.args[0]).strip("'\"").replace("\\n", " ").replace("\\'", "'")
    fail(f"bad command line: {message}")
  for name in required:
    value = flags.FLAGS[name].value
    if value is None:
      fail(f"--{name} is required (e.g. --{name} configs/NAME.py)")
    if type(value).__name__ == "_ErrorConfig":  # ml_collections' stand-in for a failed load
      path = _flag_argument(argv, name)
      if path and not os.path.exists(path.split(":")[0]):
        fail(f"--{name}: no such config file: {path.split(':')[0]}")
      error = value._error
      fail(f"--{name}: cannot load the config file {path}: {error.__cause__ or error}")
  return rest


def _flag_argument(argv, name):
  for i, a in enumerate(argv):
    if a in (f"--{name}", f"-{name}") and i + 1 < len(argv):
      return argv[i + 1]
    if a.startswith((f"--{name}=", f"-{name}=")):
      return a.split("=", 1)[1]
  return None


def run(main, argv=None, required=("config",)) -> None:
  """Parses flags, runs `main(argv)`, and turns user errors into one line and exit 2."""
  argv = list(sys.argv if argv is None else argv)
  rest = parse_flags(argv, required)
  try:
    main(rest)
  except user_errors() as e:
    if debugging(argv):
      raise
    fail(e)


def load_config(path: str, **overrides):
  """The ConfigDict a config file gives, as `--config PATH[:PRESET]` would, with `overrides`
  applied (keys as the flags name them, dotted for nested fields: **{"loss.distill": 1.0}):
  for scripts and tests that build configs without flags."""
  import importlib.util
  path, _, preset = path.partition(":")
  name = os.path.splitext(os.path.basename(path))[0] + "_config"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(preset) if preset else module.get_config()
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node.update({leaf: value})
  return config

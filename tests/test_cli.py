"""negjax.cli: user mistakes end in one `error:` line and exit 2; bugs keep their traceback."""
import os
import subprocess
import sys
import textwrap

import pytest

PROGRAM = textwrap.dedent("""
    import sys
    from ml_collections import config_flags
    from negjax import cli
    _CONFIG = config_flags.DEFINE_config_file("config", None, "config file")

    def main(argv):
      c = _CONFIG.value
      if c.mode == "user":
        raise cli.UserError(f"batch_size must be positive, got {c.batch_size}")
      if c.mode == "bug":
        raise RuntimeError("an internal bug")
      print("ran", c.batch_size)

    cli.run(main)
""")
CONFIG = textwrap.dedent("""
    import ml_collections
    def get_config():
      c = ml_collections.ConfigDict()
      c.batch_size = 4
      c.mode = "ok"
      return c
""")


@pytest.fixture
def program(tmp_path):
  (tmp_path / "prog.py").write_text(PROGRAM)
  (tmp_path / "conf.py").write_text(CONFIG)

  def run(*args, env=None):
    result = subprocess.run([sys.executable, "prog.py", *args], cwd=tmp_path,
                            capture_output=True, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})))
    return result.returncode, result.stdout, result.stderr.strip().splitlines()
  return run


@pytest.mark.parametrize("args, expected", [
    ((), "--config is required"),
    (("--config", "missing.py"), "no such config file: missing.py"),
    (("--config", "conf.py", "--config.batchsize=3"), "batchsize"),
    (("--config", "conf.py", "--config.batch_size=x"), "--config.batch_size=x"),
    (("--config", "conf.py", "--config.mode=user", "--config.batch_size=0"),
     "batch_size must be positive, got 0"),
])
def test_user_errors_are_one_line_exit_2(program, args, expected):
  code, _, err = program(*args)
  assert code == 2
  assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


def test_config_typo_suggests_the_key(program):
  _, _, err = program("--config", "conf.py", "--config.batchsize=3")
  assert 'Did you mean "batch_size"' in err[0]


def test_good_run_and_bugs_keep_tracebacks(program):
  code, out, _ = program("--config", "conf.py", "--config.batch_size=7")
  assert code == 0 and "ran 7" in out
  code, _, err = program("--config", "conf.py", "--config.mode=bug")
  assert code == 1 and err[0].startswith("Traceback") and "an internal bug" in err[-1]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback_of_a_user_error(program, how):
  args = ["--config", "conf.py", "--config.mode=user"]
  code, _, err = program(*(args + ["--debug"] if how == "flag" else args),
                         env={"NEGJAX_DEBUG": "1"} if how == "env" else None)
  assert code != 0 and err[0].startswith("Traceback") and "UserError" in err[-1]

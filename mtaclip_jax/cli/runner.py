"""One-line errors for a bad --config file or --config.key=value override.

ml_collections reports an unknown key as a bare `AttributeError: "'x'"` from deep
inside flag parsing; `explain(argv, error)` finds the override at fault and says
which key is unknown and what keys its parent has.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys

from absl import app
from absl import flags

from mtaclip_jax import errors
from mtaclip_jax.runtime import console
from mtaclip_jax.runtime import xla_cpu


def _load(spec: str):
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config {path!r}: no such file")
  module_spec = importlib.util.spec_from_file_location("user_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise AttributeError(f"--config {path!r} defines no get_config(arg=None)")
  return module.get_config(arg or None) if arg else module.get_config()


def _config_spec(argv):
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def explain(argv, error: Exception) -> str:
  spec = _config_spec(argv)
  if spec is None:
    return str(error)
  try:
    config = _load(spec)
  except Exception as e:  # pylint: disable=broad-except
    return f"cannot load config {spec!r}: {type(e).__name__}: {e}"
  for a in argv:
    if not a.startswith("--config."):
      continue
    key = a[len("--config.") :].split("=", 1)[0]
    node, walked = config, []
    for part in key.split("."):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if part not in keys:
        near = difflib.get_close_matches(part, keys, n=3)
        where = ".".join(walked) or "the config"
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        return (
            f"unknown config key {key!r}: {where} has no {part!r} (it has "
            f"{', '.join(sorted(keys))}){hint}"
        )
      node = node[part]
      walked.append(part)
  return f"bad --config override: {type(error).__name__}: {error}"


def parse_flags_or_exit(argv):
  """absl flags parser for app.run that turns config errors into one line, exit 2."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    spec = _config_spec(argv[1:])
    message = str(e).splitlines()[0]
    if spec is not None:
      try:
        _load(spec)
      except Exception as load_error:  # pylint: disable=broad-except
        message = f"--config {spec!r}: {type(load_error).__name__}: {load_error}"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError, TypeError, ValueError, FileNotFoundError) as e:
    print(f"error: {explain(argv[1:], e)}", file=sys.stderr)
    sys.exit(2)
  spec = _config_spec(argv[1:])
  if spec is not None:  # config_flags defers config-file errors to first use
    try:
      _load(spec)
    except Exception as e:  # pylint: disable=broad-except
      print(f"error: --config {spec!r}: {type(e).__name__}: {e}", file=sys.stderr)
      sys.exit(2)
  return rest


def list_flag_words(flag: str, parser=parse_flags_or_exit):
  """A flags parser that lets `flag a b c` (e.g. shell-expanded globs) set a list
  flag: the words after `flag` up to the next `--` flag become its comma list."""

  def parse(argv):
    out, i = [argv[0]], 1
    while i < len(argv):
      if argv[i] == flag:
        j = i + 1
        while j < len(argv) and not argv[j].startswith("--"):
          j += 1
        out.append(f"{flag}=" + ",".join(argv[i + 1 : j]))
        i = j
      else:
        out.append(argv[i])
        i += 1
    return parser(out)

  return parse


def run_app(
    main, flags_parser=parse_flags_or_exit, also_user_errors: tuple[type[BaseException], ...] = ()
) -> None:
  """absl `app.run(main)` for the CLIs: a user error (`errors.USER_ERRORS` and
  `also_user_errors`) prints one `error: ...` line and exits 1; Ctrl-C exits 130.
  XLA:CPU gets this project's settings before jax starts its backend
  (runtime/xla_cpu.py), and libraries' background-thread tracebacks stay off the
  console (runtime/console.py)."""
  xla_cpu.apply()
  console.install()
  try:
    app.run(main, flags_parser=flags_parser)
  except KeyboardInterrupt:
    sys.exit(130)
  except Exception as e:  # pylint: disable=broad-except
    if isinstance(e, errors.USER_ERRORS + tuple(also_user_errors)):
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)
    raise

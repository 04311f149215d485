"""Command-line plumbing shared by the pipelines' entrypoints.

Entrypoints take an experiment config with `--config=configs/<name>.py` and
single fields with `--config.data.num_clients=50` (ml_collections). This
module makes every config problem (a missing file, an unknown field, a bad
value) and every unknown flag end the program with one line on stderr and
exit status 2, instead of a traceback.

The config flag is defined with `--config=<default>` inserted into the
argument list when it is absent, so the config is always loaded while the
flags are parsed (where errors are caught) rather than when the flag is
defined at import.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from absl import flags
from ml_collections import config_flags

from fedpipe.config import validation

DEFAULT_CONFIG = 'configs/digits_dp.py'
USAGE_ERROR_EXIT_CODE = 2
_CONFIG_FLAG = 'config'


def fail(message: str) -> NoReturn:
  """Prints `error: <message>` to stderr and exits with status 2."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(USAGE_ERROR_EXIT_CODE)


def _has_config_flag(argv: Sequence[str]) -> bool:
  return any(re.match(rf'^--?{_CONFIG_FLAG}(=|$)', arg) for arg in argv[1:])


def with_default_config(argv: Sequence[str], default: str = DEFAULT_CONFIG) -> list[str]:
  """Returns `argv` with `--config=<default>` after the program name if it has no --config."""
  argv = list(argv)
  if not argv or _has_config_flag(argv):
    return argv
  return [argv[0], f'--{_CONFIG_FLAG}={default}', *argv[1:]]


def define_config_flag(default: str = DEFAULT_CONFIG) -> flags.FlagHolder:
  """Defines `--config` (a config file) and its `--config.<field>` overrides.

  Call once, at module level of an entrypoint, and parse flags with
  `parse_flags`.

  Args:
    default: The config file used when `--config` is not given.

  Returns:
    The flag holder; `load_config(holder)` gives the ConfigDict.
  """
  return config_flags.DEFINE_config_file(
    _CONFIG_FLAG,
    default,
    'Experiment config file (configs/<name>.py); override single '
    'fields with --config.<section>.<field>=<value>.',
    sys_argv=with_default_config(sys.argv, default),
  )


def parse_flags(
  argv: Sequence[str], *, known_only: bool, default: str = DEFAULT_CONFIG
) -> list[str]:
  """Parses absl flags; a flags parser for `app.run(main, flags_parser=...)`.

  Args:
    argv: The command line, program name first.
    known_only: If True, flags absl does not know are returned (after the
      program name) for the caller to check; if False they are an error.
    default: The default config file (as given to `define_config_flag`).

  Returns:
    The program name followed by the arguments absl did not consume.
  """
  argv = with_default_config(argv, default)
  try:
    return flags.FLAGS(argv, known_only=known_only)
  except flags.UnrecognizedFlagError as e:
    fail(f'unknown flag --{e.flagname}; see --helpfull for the flags of this program.')
  except (AttributeError, KeyError) as e:
    # ml_collections reports an override of a field the config lacks this way.
    fail(_unknown_field_message(argv, e))
  except flags.Error as e:
    fail(' '.join(str(e).split()))


def _unknown_field_message(argv: Sequence[str], error: Exception) -> str:
  text = str(error).replace('\\n', ' ').replace('\\', '')
  match = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  bad = match.group(2) if match else None
  if bad is None:
    keys = re.findall(r"'([A-Za-z0-9_]+)'", text)
    bad = keys[0] if keys else None
  overrides = [a.split('=', 1)[0] for a in argv[1:] if re.match(rf'^--?(no)?{_CONFIG_FLAG}\.', a)]
  named = [o for o in overrides if bad and re.search(rf'\.{re.escape(bad)}(\.|$)', o)]
  flag = named[0] if named else ', '.join(overrides) or '--config.<field>'
  hint = f' (did you mean "{match.group(1)}"?)' if match else ''
  return f'{flag}: the config has no field {bad!r}{hint}; see the config file for the field names.'


def _config_filename(holder: flags.FlagHolder) -> str | None:
  """The file named by `--config`, or None if the flag does not say."""
  try:
    return config_flags.get_config_filename(flags.FLAGS[holder.name]) or None
  except (KeyError, TypeError, AttributeError):
    return None


def load_config(holder: flags.FlagHolder) -> Any:
  """Returns the parsed, validated config; fails with a clear message if it is not valid."""
  try:
    config = holder.value
    config.keys()  # A config that failed to load raises here, not before.
  except (OSError, ImportError, SyntaxError, AttributeError, KeyError, TypeError, ValueError) as e:
    path = _config_filename(holder)
    if path is not None and not os.path.isfile(path):
      fail(
        f'--{_CONFIG_FLAG}={path}: no such file; give an experiment config file '
        f'(e.g. --{_CONFIG_FLAG}={DEFAULT_CONFIG}).'
      )
    fail(f'cannot load --{_CONFIG_FLAG}: ' + ' '.join(str(e).split()))
  try:
    return validation.validate(config)
  except validation.ConfigError as e:
    fail(str(e))


def unknown_beam_args(args: Sequence[str]) -> list[str]:
  """Returns the arguments that are not Beam pipeline options.

  Uses the argument parser Beam itself builds from every `PipelineOptions`
  subclass (via `get_all_options(add_extra_args_fn=...)`), so options of all
  runners are recognized without listing them here.

  Args:
    args: Command-line arguments meant for `PipelineOptions`.

  Returns:
    Those that Beam's parser does not recognize (abbreviations are not
    allowed, as in Beam).
  """
  from apache_beam.options.pipeline_options import PipelineOptions

  parsers = []
  PipelineOptions([]).get_all_options(add_extra_args_fn=parsers.append)
  _, unknown = parsers[0].parse_known_args(list(args))
  return unknown

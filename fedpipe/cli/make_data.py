r"""Writes the bundled raw data of a config: per-client rows plus a feature spec.

    fedpipe-make-data --config=configs/digits_dp.py [--overwrite]

Takes `data.source` (a scikit-learn dataset, nothing is downloaded),
`data.raw_dir`, `data.raw_format`, `data.num_clients`, `data.partition`,
`data.dirichlet_alpha`, `data.test_fraction` and `seed` from the config
(see fedpipe/datasets/bundled_data.py). Does nothing if `data.raw_dir` already holds
data written for the same parameters, unless `--overwrite`; with
`data.source='none'` there is nothing to generate.

Exit status: 0 on success; 2 with one line on stderr on a config error.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from absl import app, flags

from fedpipe.cli import entrypoint as cli
from fedpipe.datasets import bundled_data
from fedpipe.errors import FedpipeError

_CONFIG = cli.define_config_flag()
_OVERWRITE = flags.DEFINE_bool(
  'overwrite',
  False,
  'Regenerate even if data.raw_dir holds data for the same parameters, and replace a '
  'data.raw_dir that make_data did not write.',
)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    cli.fail(f'unexpected argument(s) {" ".join(argv[1:])}; this program takes flags only.')
  config = cli.load_config(_CONFIG)
  data = config.data
  if data.source == 'none':
    print(
      "data.source is 'none': nothing to generate. Point data.train_files, "
      'data.eval_files and data.feature_spec at your own files.'
    )
    return
  try:
    result = bundled_data.write_bundled_dataset(
      source=data.source,
      raw_dir=data.raw_dir,
      raw_format=data.raw_format,
      num_clients=data.num_clients,
      partition=data.partition,
      dirichlet_alpha=data.dirichlet_alpha,
      test_fraction=data.test_fraction,
      seed=config.seed,
      overwrite=_OVERWRITE.value,
    )
  except FedpipeError as e:
    cli.fail(str(e))
  if result.reused:
    print(
      f'{result.raw_dir} already holds {data.source} data for these parameters; nothing '
      'to do (--overwrite regenerates it).'
    )
  else:
    skew = f'dirichlet, alpha={data.dirichlet_alpha}' if data.partition == 'dirichlet' else 'iid'
    if data.source in bundled_data.GENERATED_SOURCES:
      skew = 'its own users'  # Rows belong to generated users: no partition applies.
    print(
      f'Wrote {data.source} to {result.raw_dir}: {result.num_train_rows} training rows over '
      f'{result.num_clients} clients ({skew}), {result.num_test_rows} test rows '
      f'(seed {config.seed}).'
    )
  expected = {
    'data.train_files': result.train_file,
    'data.eval_files': result.test_file,
    'data.feature_spec': result.feature_spec_file,
  }
  configured = {
    'data.train_files': data.train_files,
    'data.eval_files': data.eval_files,
    'data.feature_spec': data.feature_spec,
  }
  for field, path in expected.items():
    if os.path.abspath(configured[field] or '') != os.path.abspath(path):
      print(
        f'note: {field}={configured[field]!r} is not the file just written; preprocess '
        f'with --config.{field}={path}'
      )


def run() -> None:
  """Console-script entrypoint."""
  app.run(
    lambda argv: sys.exit(main(argv)),
    flags_parser=lambda argv: cli.parse_flags(argv, known_only=False),
  )


if __name__ == '__main__':
  run()

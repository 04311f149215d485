r"""Preprocesses raw client data into a client-data directory (clients.sqlite) and a manifest (Beam).

    fedpipe-preprocess --config=configs/digits_dp.py \
        [--config.data.processed_dir=...] [Beam pipeline options]

Reads `data.train_files` and `data.eval_files` (CSV or JSONL), validates
their rows against `data.feature_spec`, and writes `data.processed_dir`
(see fedpipe/data/manifest.py). Flags this program does not define are passed to
Beam's `PipelineOptions` (e.g. `--runner=FlinkRunner --flink_master=...`;
docs/beam_runners.md gives those of Flink, Spark and Dataflow, and Beam's
DaskRunner is refused); a flag that is neither is an error. The DirectRunner
runs in its default `in_memory` mode, which was the fastest measured on 2 to 4
cores.

Exit status: 0 on success; 2 with one line on stderr if the config, a flag,
the inputs, the feature spec or the output directory is at fault, or too
many rows were malformed.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from absl import app, flags


def _not_bigquery_notice(record: logging.LogRecord) -> bool:
  return 'apitools not found' not in record.getMessage()


# Beam's import warns that its BigQuery client is missing; no pipeline here uses it.
logging.getLogger().addFilter(_not_bigquery_notice)
from apache_beam.options.pipeline_options import PipelineOptions

from fedpipe.cli import entrypoint as cli
from fedpipe.errors import FedpipeError
from fedpipe.pipelines import feature_spec as feature_spec_lib

logging.getLogger().removeFilter(_not_bigquery_notice)

_CONFIG = cli.define_config_flag()


def main(argv: Sequence[str]) -> None:
  beam_args = list(argv[1:])
  unknown = cli.unknown_beam_args(beam_args)
  if unknown:
    cli.fail(
      f'unknown flag(s) {" ".join(unknown)}: neither a flag of this program (--config, '
      '--config.<section>.<field>) nor a Beam pipeline option; check the spelling '
      "(--helpfull lists this program's flags)."
    )
  config = cli.load_config(_CONFIG)
  data = config.data
  try:
    spec = feature_spec_lib.FeatureSpec.load(data.feature_spec)
  except FedpipeError as e:
    cli.fail(str(e))
  # Imported once flags and spec are known good: it imports TensorFlow (seconds).
  from fedpipe.pipelines import pipeline as preprocess_pipeline

  if not flags.FLAGS['verbosity'].present:
    # Beam logs every step at INFO; --verbosity=0 shows them.
    logging.getLogger('apache_beam').setLevel(logging.WARNING)
  try:
    summary = preprocess_pipeline.run_preprocessing(
      train_files=data.train_files,
      eval_files=data.eval_files or None,
      feature_spec=spec,
      output_dir=data.processed_dir,
      min_examples_per_client=data.min_examples_per_client,
      max_malformed_fraction=data.max_malformed_fraction,
      pipeline_options=PipelineOptions(beam_args),
    )
  except FedpipeError as e:
    cli.fail(str(e))
  print(summary.format())


def run() -> None:
  """Console-script entrypoint."""
  app.run(
    lambda argv: sys.exit(main(argv)),
    flags_parser=lambda argv: cli.parse_flags(argv, known_only=True),
  )


if __name__ == '__main__':
  run()

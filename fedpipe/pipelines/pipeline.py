"""The Beam pipeline that turns raw rows into one client-data SQLite file and a manifest.

    raw files (CSV/JSONL)                       <output_dir>/
      -> ReadAndValidate (one file at a time)     clients.sqlite
           -> valid: (split/client_id, example)   dead_letter/<split>-*.jsonl
           -> dead letters (reason, raw row)      manifest.json
      -> GroupByKey per client
      -> KeepClient (>= min_examples_per_client)
           -> one element per kept client: TFRecord shards in the staging dir

`run_preprocessing` checks everything that can be checked before the pipeline
runs (input files exist and are readable, CSV headers hold the spec's columns,
the output directory is ours to replace), runs it into a staging directory
next to `output_dir`, then builds `clients.sqlite` (`fedpipe.data.client_store`)
from the client shards in one sequential pass, sorted by split and client, so
the same input gives the same file byte for byte whatever the runner, and
deletes the shards. It swaps the staging directory into place only if the
pipeline succeeded and few enough rows were malformed. A failed run leaves an
existing output untouched; the dead letters of a rejected run are kept in
`<output_dir>.rejected/`. The pipeline itself writes only through Beam's
sinks, so it runs on any runner, and the launcher reads and writes through
Beam's filesystems (building the SQLite file in a local temporary directory
and copying it when the output is remote, e.g. on GCS).

Directories written before `clients.sqlite` (one TFRecord file per client,
manifest without `storage`) keep loading and training; this pipeline writes
the new layout.

Each CSV or JSONL file is read by one worker (to number its lines for the dead
letter); shard large inputs into several files to read them in parallel.
The DoFns live in `preprocess_dofns`, which does not import TensorFlow, so
Beam's worker processes start without it.

Without `--runner`, the pipeline runs on Beam's FnApiRunner (the DirectRunner's
batch engine) in `in_memory` mode: on 2 cores it was as fast as
`multi_processing` at 1M rows and faster below, where the worker processes'
start-up dominates (benchmarks/RESULTS.md). See
`resolve_pipeline_options`.
"""

import csv
import dataclasses
import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence

import apache_beam as beam
import tensorflow as tf
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineState

from fedpipe.data import client_store, example_records
from fedpipe.data import manifest as manifest_lib
from fedpipe.errors import FedpipeError
from fedpipe.pipelines import dofns as preprocess_dofns
from fedpipe.pipelines import feature_spec as feature_spec_lib

CSV_FORMAT = preprocess_dofns.CSV_FORMAT
JSONL_FORMAT = preprocess_dofns.JSONL_FORMAT
_FORMAT_BY_EXTENSION = {
  '.csv': CSV_FORMAT,
  '.jsonl': JSONL_FORMAT,
  '.json': JSONL_FORMAT,
  '.ndjson': JSONL_FORMAT,
}
DEAD_LETTER_DIR = 'dead_letter'
_STATS_DIR = '_stats'
# The pipeline's client shards, in the staging dir until clients.sqlite is built.
_CLIENTS_DIR = '_clients'
_SHARD_SUFFIX = '.tfrecord'
STAGING_SUFFIX = '.staging'
PREVIOUS_SUFFIX = '.previous'
REJECTED_SUFFIX = '.rejected'
METRICS_NAMESPACE = preprocess_dofns.METRICS_NAMESPACE
_join = preprocess_dofns.join_path
# The runner when none is given (see `resolve_pipeline_options`).
DEFAULT_RUNNER = 'FnApiRunner'
_LOCAL_RUNNERS = ('DirectRunner', 'direct', 'FnApiRunner', 'SwitchingDirectRunner')
# Runners refused because they lose or repeat elements (see `resolve_pipeline_options`):
# a runner's class name, or the last part of its dotted path, in lower case.
_REFUSED_RUNNERS = ('daskrunner', 'dask')


class PreprocessError(FedpipeError):
  """Base of the errors that stop preprocessing before anything is replaced."""


class InputFilesError(PreprocessError):
  """An input file pattern matches nothing, or a matched file cannot be read or used."""


class OutputDirError(PreprocessError):
  """The output directory cannot be written or is not a preprocessing output to replace."""


class PipelineOptionsError(PreprocessError):
  """The Beam pipeline options ask for a runner setting this pipeline cannot use."""


class TooManyMalformedRecordsError(PreprocessError):
  """More rows than allowed were malformed; the run's dead letters were kept aside."""


class EmptyOutputError(PreprocessError):
  """A split has no rows, or no client is left after filtering."""


class RowAccountingError(PreprocessError):
  """The run's row counts do not add up: the runner lost or repeated elements."""


class PreprocessArgumentError(PreprocessError, ValueError):
  """An argument of `run_preprocessing` is out of range."""


@dataclasses.dataclass(frozen=True)
class InputFile:
  """One matched input file."""

  path: str
  format: str
  size_bytes: int


@dataclasses.dataclass(frozen=True)
class PreprocessSummary:
  """What a preprocessing run read and wrote.

  Attributes:
    output_dir: The output directory.
    rows_read: Split -> rows read (blank lines are not rows).
    rows_valid: Split -> rows that passed validation.
    malformed: Split -> reason -> rows sent to the dead letter.
    clients_written: Split -> number of clients written.
    examples_written: Split -> examples of the written clients.
    excluded_clients: Split -> client id -> examples, for clients below
      `min_examples_per_client`.
    min_examples_per_client: The threshold used.
    seconds: Wall time of the whole run.
    ignored_columns: Split -> input column the feature spec does not use ->
      rows that had it; such columns are read and left out.
  """

  output_dir: str
  rows_read: Mapping[str, int]
  rows_valid: Mapping[str, int]
  malformed: Mapping[str, Mapping[str, int]]
  clients_written: Mapping[str, int]
  examples_written: Mapping[str, int]
  excluded_clients: Mapping[str, Mapping[str, int]]
  min_examples_per_client: int
  seconds: float
  ignored_columns: Mapping[str, Mapping[str, int]] = dataclasses.field(default_factory=dict)

  @property
  def total_rows_read(self) -> int:
    return sum(self.rows_read.values())

  @property
  def total_malformed(self) -> int:
    return sum(sum(m.values()) for m in self.malformed.values())

  @property
  def malformed_by_reason(self) -> dict[str, int]:
    out: dict[str, int] = {}
    for counts in self.malformed.values():
      for reason, n in counts.items():
        out[reason] = out.get(reason, 0) + n
    return dict(sorted(out.items()))

  @property
  def rows_per_second(self) -> float:
    return self.total_rows_read / self.seconds if self.seconds > 0 else float('inf')

  @property
  def dead_letter_dir(self) -> str:
    return _join(self.output_dir, DEAD_LETTER_DIR)

  def format(self) -> str:
    """A readable, multi-line summary of the run."""
    lines = [
      f'Preprocessed {self.total_rows_read} rows into {self.output_dir} in '
      f'{self.seconds:.1f} s ({self.rows_per_second:,.0f} rows/s).'
    ]
    for split in self.rows_read:
      bad = sum(self.malformed.get(split, {}).values())
      excluded = self.excluded_clients.get(split, {})
      lines.append(
        f'  {split + ":":6} {self.rows_read[split]} rows read, {self.rows_valid[split]} valid, '
        f'{bad} malformed; {self.clients_written[split]} clients written '
        f'({self.examples_written[split]} examples), {len(excluded)} excluded '
        f'({sum(excluded.values())} examples).'
      )
    if self.total_malformed:
      reasons = ', '.join(f'{r}={n}' for r, n in self.malformed_by_reason.items())
      lines.append(
        f'  malformed rows by reason: {reasons}; dead letters in {self.dead_letter_dir}/'
      )
    else:
      lines.append('  malformed rows: none.')
    if any(self.ignored_columns.values()):
      names = sorted({name for columns in self.ignored_columns.values() for name in columns})
      described = []
      for name in names:
        counts = ', '.join(
          f'{split}: {_rows(columns[name])}'
          for split, columns in self.ignored_columns.items()
          if name in columns
        )
        described.append(f'{name!r} ({counts})')
      lines.append(
        f'  columns not in the feature spec, ignored: {", ".join(described)}; add '
        'them to data.feature_spec to use them.'
      )
    if any(self.excluded_clients.values()):
      lines.append(
        f'  clients with fewer than min_examples_per_client='
        f'{self.min_examples_per_client} examples are listed under '
        'excluded_clients in manifest.json.'
      )
    return '\n'.join(lines)


def _rows(n: int) -> str:
  return f'{n} row' if n == 1 else f'{n} rows'


def input_format(path: str) -> str:
  """The record format of a file from its extension (`.csv`, `.jsonl`, `.json`, `.ndjson`).

  A compression extension (`.gz`, `.bz2`, ...) after it is allowed.

  Raises:
    InputFilesError: If the extension is not one of those.
  """
  base = path
  if CompressionTypes.detect_compression_type(path) != CompressionTypes.UNCOMPRESSED:
    base = os.path.splitext(path)[0]
  fmt = _FORMAT_BY_EXTENSION.get(os.path.splitext(base)[1].lower())
  if fmt is None:
    raise InputFilesError(
      f'{path}: cannot tell the record format from the file name; name input files '
      f'*.csv or *.jsonl (optionally compressed, e.g. *.csv.gz).'
    )
  return fmt


def resolve_input_files(pattern: str, *, split: str, config_field: str) -> list[InputFile]:
  """Matches an input file pattern and checks each file can be opened.

  Args:
    pattern: A file path or glob (local or any Beam filesystem).
    split: The split it feeds, for messages.
    config_field: The config field the pattern came from, for messages.

  Returns:
    The matched files, sorted by path.

  Raises:
    InputFilesError: If nothing matches, or a file cannot be opened or has
      an unknown extension.
  """
  pattern = _absolute(pattern)
  try:
    result = FileSystems.match([pattern])[0]
  except (OSError, ValueError) as e:  # BeamIOError is an OSError.
    raise InputFilesError(f'cannot list {config_field}={pattern!r} ({split} split): {e}') from e
  files = sorted(result.metadata_list, key=lambda m: m.path)
  if not files:
    raise InputFilesError(
      f'no file matches {config_field}={pattern!r} ({split} split); check the path, or '
      'generate the bundled data with fedpipe-make-data --config=...'
    )
  out = []
  for meta in files:
    fmt = input_format(meta.path)
    try:
      with FileSystems.open(meta.path) as f:
        f.read(1)
    except OSError as e:
      raise InputFilesError(
        f'cannot read input file {meta.path!r} ({split} split, from {config_field}): '
        f'{type(e).__name__}: {e}'
      ) from e
    out.append(InputFile(path=meta.path, format=fmt, size_bytes=int(meta.size_in_bytes)))
  return out


def read_csv_header(path: str) -> list[str]:
  """The column names of a CSV file (its first record).

  Raises:
    InputFilesError: If the file cannot be read or has no header line.
  """
  try:
    with FileSystems.open(path) as f:
      lines = preprocess_dofns.LineReader(f)
      header = next(csv.reader(lines), None)
  except (OSError, csv.Error) as e:
    raise InputFilesError(f'cannot read the header of {path!r}: {type(e).__name__}: {e}') from e
  if not header:
    raise InputFilesError(
      f'{path!r} has no header line; CSV inputs start with a line naming the columns.'
    )
  return preprocess_dofns.clean_header(header)


def resolve_pipeline_options(options: PipelineOptions) -> PipelineOptions:
  """Sets the default runner and rejects runner settings known to lose data.

  With no `--runner`, the pipeline runs on the FnApiRunner, the engine the
  DirectRunner uses for batch pipelines. Beam 2.77's DirectRunner first tries
  to download (from GitHub) and start the Prism runner; naming the engine
  keeps runs offline and reproducible. `--runner=DirectRunner` restores Beam's
  own choice. Every other option is left as given.

  Beam 2.77's local runner in `direct_running_mode=multi_threading` drops
  elements at GroupByKey when a DoFn runs long bundles (measured here: up to
  a few hundred of 50,000 rows), so that mode is refused.

  Beam 2.77's DaskRunner (`apache_beam.runners.dask.dask_runner.DaskRunner`)
  translates only Create, ParDo, GroupByKey and Flatten, silently skips every
  other transform and computes only the last branch; on a dask cluster it
  left WriteToText shards empty and doubled the elements of Partition +
  Flatten. It is refused, by class name or dotted path, whatever the case.
  docs/beam_runners.md gives the options of the runners to use instead.

  Args:
    options: The pipeline options; updated in place.

  Returns:
    `options`.

  Raises:
    PipelineOptionsError: If the local runner is set to multi_threading, or
      the runner is the DaskRunner.
  """
  standard = options.view_as(StandardOptions)
  if standard.runner is None:
    standard.runner = DEFAULT_RUNNER
  runner = standard.runner
  name = runner if isinstance(runner, str) else type(runner).__name__
  if name.rsplit('.', 1)[-1].lower() in _REFUSED_RUNNERS:
    raise PipelineOptionsError(
      f"--runner={name} is refused: Beam 2.77's DaskRunner runs only Create, ParDo, "
      'GroupByKey and Flatten and skips the rest, so it loses and duplicates data (here '
      'WriteToText left empty shards, Partition+Flatten doubled elements, only the last '
      'branch ran). Leave --runner unset for the local runner, or use PortableRunner (Flink '
      'or Spark job server), FlinkRunner, SparkRunner or DataflowRunner: see '
      'docs/beam_runners.md.'
    )
  mode = options.view_as(DirectOptions).direct_running_mode
  if standard.runner in _LOCAL_RUNNERS and mode == 'multi_threading':
    raise PipelineOptionsError(
      '--direct_running_mode=multi_threading loses rows at GroupByKey in this Beam version; '
      'use in_memory (the default, fastest here) or multi_processing.'
    )
  return options


def build_pipeline(
  pipeline: beam.Pipeline,
  *,
  inputs: Mapping[str, Sequence[InputFile]],
  spec: feature_spec_lib.FeatureSpec,
  output_dir: str,
  min_examples_per_client: int,
) -> None:
  """Adds the preprocessing transforms to `pipeline`.

  Args:
    pipeline: The pipeline to extend.
    inputs: Split name -> its input files.
    spec: The feature spec.
    output_dir: Where to write (the staging directory): the kept clients
      as TFRecord shards under `_clients/` (one `dofns.client_element` per
      client), dead letters, and run statistics under `_stats/`.
    min_examples_per_client: Clients with fewer valid rows are not written.
  """
  stats, clients = [], []
  read_fn = preprocess_dofns.ReadAndValidateFn
  keep_fn = preprocess_dofns.KeepClientFn
  for split, files in inputs.items():
    read = (
      pipeline
      | f'{split}/ListFiles' >> beam.Create([(i, f.path, f.format) for i, f in enumerate(files)])
      | f'{split}/SpreadFiles' >> beam.Reshuffle()
      | f'{split}/ReadAndValidate'
      >> beam.ParDo(read_fn(split, spec)).with_outputs(
        read_fn.DEAD_LETTER, read_fn.STATS, main='valid'
      )
    )
    _ = read[read_fn.DEAD_LETTER] | f'{split}/WriteDeadLetter' >> beam.io.WriteToText(
      _join(output_dir, DEAD_LETTER_DIR, split), file_name_suffix='.jsonl'
    )
    kept = (
      read.valid
      | f'{split}/GroupByClient' >> beam.GroupByKey()
      | f'{split}/KeepClients'
      >> beam.ParDo(keep_fn(min_examples_per_client)).with_outputs(keep_fn.CLIENTS, main='stats')
    )
    stats.extend([read[read_fn.STATS], kept.stats])
    clients.append(kept[keep_fn.CLIENTS])
  _ = (
    clients
    | 'FlattenClients' >> beam.Flatten()
    | 'WriteClientShards'
    >> beam.io.WriteToTFRecord(
      _join(output_dir, _CLIENTS_DIR, 'clients'), file_name_suffix=_SHARD_SUFFIX
    )
  )
  _ = (
    stats
    | 'FlattenStats' >> beam.Flatten()
    | 'WriteStats'
    >> beam.io.WriteToText(_join(output_dir, _STATS_DIR, 'stats'), file_name_suffix='.jsonl')
  )


def run_preprocessing(
  *,
  train_files: str,
  eval_files: str | None,
  feature_spec: feature_spec_lib.FeatureSpec,
  output_dir: str,
  min_examples_per_client: int,
  max_malformed_fraction: float,
  pipeline_options: PipelineOptions,
) -> PreprocessSummary:
  """Runs the preprocessing pipeline and swaps its output into `output_dir`.

  Args:
    train_files: File pattern of the training rows (config: data.train_files).
    eval_files: File pattern of the evaluation rows, or None for no eval
      split (config: data.eval_files).
    feature_spec: The feature spec.
    output_dir: The client-data directory to (re)place (config:
      data.processed_dir).
    min_examples_per_client: Clients of either split with fewer valid rows
      are not written but listed as excluded (config:
      data.min_examples_per_client).
    max_malformed_fraction: Largest allowed fraction of malformed rows in any
      split (config: data.max_malformed_fraction).
    pipeline_options: Beam pipeline options (runner and its settings).

  Returns:
    The run summary.

  Raises:
    PreprocessArgumentError: If `min_examples_per_client` or
      `max_malformed_fraction` is out of range.
    PipelineOptionsError: If the options ask for a runner mode that loses data
      (see `resolve_pipeline_options`, which also sets the default runner).
    InputFilesError: If an input pattern matches nothing or a file is
      unreadable (before the pipeline runs).
    feature_spec_lib.FeatureSpecError: If a CSV header lacks columns of the
      spec, or the spec is a draft (a categorical feature without a
      vocabulary: run fedpipe-stats first), before the pipeline runs.
    OutputDirError: If `output_dir` exists and is not a preprocessing output.
    TooManyMalformedRecordsError: If a split's malformed fraction is above
      `max_malformed_fraction`; dead letters are kept in
      `<output_dir>.rejected/`.
    EmptyOutputError: If a split has no rows or no client is written.
    RowAccountingError: If rows read != valid + malformed rows.
  """
  start = time.monotonic()
  if (
    isinstance(min_examples_per_client, bool)
    or not isinstance(min_examples_per_client, int)
    or min_examples_per_client < 1
  ):
    raise PreprocessArgumentError(
      'min_examples_per_client (data.min_examples_per_client) must be an integer >= 1, '
      f'got {min_examples_per_client!r}.'
    )
  if not 0.0 <= max_malformed_fraction <= 1.0:
    raise PreprocessArgumentError(
      'max_malformed_fraction (data.max_malformed_fraction) must be in [0, 1], '
      f'got {max_malformed_fraction!r}.'
    )
  feature_spec.check_not_draft()
  resolve_pipeline_options(pipeline_options)
  patterns = {manifest_lib.TRAIN_SPLIT: ('data.train_files', train_files)}
  if eval_files:
    patterns[manifest_lib.EVAL_SPLIT] = ('data.eval_files', eval_files)
  inputs = {
    split: resolve_input_files(pattern, split=split, config_field=field)
    for split, (field, pattern) in patterns.items()
  }
  _check_disjoint(inputs)
  for files in inputs.values():
    for f in files:
      if f.format == CSV_FORMAT:
        feature_spec.check_columns(read_csv_header(f.path), source=f.path)

  output_dir = _absolute(output_dir).rstrip('/')
  _check_output_dir(output_dir)
  staging = output_dir + STAGING_SUFFIX
  gfile = tf.io.gfile
  try:
    if gfile.exists(staging):
      gfile.rmtree(staging)
    gfile.makedirs(staging)
  except Exception as e:  # tf.errors.OpError and OSError.
    raise OutputDirError(
      f'cannot create the staging directory {staging!r} next to '
      f'data.processed_dir={output_dir!r}: {e}'
    ) from e

  moved = False
  try:
    pipeline = beam.Pipeline(options=pipeline_options)
    build_pipeline(
      pipeline,
      inputs=inputs,
      spec=feature_spec,
      output_dir=staging,
      min_examples_per_client=min_examples_per_client,
    )
    result = pipeline.run()
    state = result.wait_until_finish()
    if state not in (None, PipelineState.DONE):
      raise RuntimeError(f'the preprocessing pipeline ended in state {state}; see the runner logs.')
    stats = _read_stats(staging, inputs)

    for split, (field, pattern) in patterns.items():
      if stats.rows_read[split] == 0:
        raise EmptyOutputError(
          f'{field}={pattern!r} ({split} split) holds no rows; point it at non-empty files.'
        )
    for split, (field, pattern) in patterns.items():
      bad = stats.malformed[split]
      if sum(bad.values()) > max_malformed_fraction * stats.rows_read[split]:
        rejected = output_dir + REJECTED_SUFFIX
        _keep_rejected(staging, rejected)
        moved = True
        reasons = ', '.join(f'{r}={n}' for r, n in sorted(bad.items()))
        raise TooManyMalformedRecordsError(
          f'{split} split: {sum(bad.values())} of {stats.rows_read[split]} rows '
          f'({sum(bad.values()) / stats.rows_read[split]:.1%}) are malformed ({reasons}), '
          f'more than data.max_malformed_fraction={max_malformed_fraction}. Nothing was '
          f'written to {output_dir}. Dead letters: {_join(rejected, DEAD_LETTER_DIR)}/'
          f'{split}-*.jsonl. Fix {field}={pattern!r} or the feature spec, or raise '
          'data.max_malformed_fraction.'
        )
    for split, (field, pattern) in patterns.items():
      excluded = stats.excluded[split]
      if not stats.clients[split] and not excluded:
        raise EmptyOutputError(
          f'{split} split: none of the {stats.rows_read[split]} rows of {field}={pattern!r} '
          'is valid; see the dead letters and fix the input or the feature spec.'
        )
      if not stats.clients[split]:
        raise EmptyOutputError(
          f'{split} split: no client left to write: {len(excluded)} client(s) have fewer '
          f'than data.min_examples_per_client={min_examples_per_client} valid rows (the '
          f'largest has {max(excluded.values(), default=0)}); lower '
          'data.min_examples_per_client.'
        )

    _build_client_store(staging, stats)
    manifest = _make_manifest(stats, feature_spec, min_examples_per_client)
    _write_manifest(staging, manifest)
    gfile.rmtree(_join(staging, _STATS_DIR))
    _swap_into_place(staging, output_dir)
    moved = True
    if gfile.exists(output_dir + REJECTED_SUFFIX):
      gfile.rmtree(output_dir + REJECTED_SUFFIX)
  finally:
    if not moved and gfile.exists(staging):
      gfile.rmtree(staging)

  return PreprocessSummary(
    output_dir=output_dir,
    rows_read=dict(stats.rows_read),
    rows_valid={s: stats.rows_read[s] - sum(stats.malformed[s].values()) for s in patterns},
    malformed={s: dict(sorted(stats.malformed[s].items())) for s in patterns},
    clients_written={s: len(stats.clients[s]) for s in patterns},
    examples_written={s: sum(stats.clients[s].values()) for s in patterns},
    excluded_clients={s: dict(sorted(stats.excluded[s].items())) for s in patterns},
    min_examples_per_client=min_examples_per_client,
    seconds=time.monotonic() - start,
    ignored_columns={s: dict(sorted(stats.ignored_columns[s].items())) for s in patterns},
  )


@dataclasses.dataclass
class _Stats:
  rows_read: dict[str, int]
  blank_lines: dict[str, int]
  malformed: dict[str, dict[str, int]]
  clients: dict[str, dict[str, int]]
  excluded: dict[str, dict[str, int]]
  ignored_columns: dict[str, dict[str, int]]


def _read_stats(staging: str, inputs: Mapping[str, Sequence[InputFile]]) -> _Stats:
  """Reads the per-file and per-client statistics the pipeline wrote, and checks them."""
  stats = _Stats(
    rows_read={s: 0 for s in inputs},
    blank_lines={s: 0 for s in inputs},
    malformed={s: {} for s in inputs},
    clients={s: {} for s in inputs},
    excluded={s: {} for s in inputs},
    ignored_columns={s: {} for s in inputs},
  )
  gfile = tf.io.gfile
  files_seen = {s: set() for s in inputs}
  for path in gfile.glob(_join(staging, _STATS_DIR, 'stats*')):
    with gfile.GFile(path, 'r') as f:
      for line in f:
        if not line.strip():
          continue
        item = json.loads(line)
        split = item['split']
        if item['kind'] == 'file':
          files_seen[split].add(item['file'])
          stats.rows_read[split] += item['rows_read']
          stats.blank_lines[split] += item['blank_lines']
          for reason, n in item['malformed'].items():
            stats.malformed[split][reason] = stats.malformed[split].get(reason, 0) + n
          ignored = stats.ignored_columns[split]
          for name, n in item['ignored_columns'].items():
            ignored[name] = ignored.get(name, 0) + n
        else:
          target = stats.clients if item['written'] else stats.excluded
          target[split][item['client_id']] = item['count']
  for split, files in inputs.items():
    expected = {f.path for f in files}
    valid = sum(stats.clients[split].values()) + sum(stats.excluded[split].values())
    malformed = sum(stats.malformed[split].values())
    if files_seen[split] != expected or stats.rows_read[split] != valid + malformed:
      raise RowAccountingError(
        f"{split} split: the pipeline's statistics do not add up (files {len(files_seen[split])}"
        f'/{len(expected)}, rows read {stats.rows_read[split]} != valid {valid} + malformed '
        f'{malformed}): the runner lost or repeated elements; nothing was written. Rerun, '
        'or use another runner (--direct_running_mode=in_memory).'
      )
  return stats


def _client_elements(staging: str) -> Iterator[tuple[str, str, list[bytes]]]:
  """The kept clients of the pipeline's shards: `(split, client_id, records)`."""
  pattern = _join(staging, _CLIENTS_DIR, f'clients-*{_SHARD_SUFFIX}')
  for meta in sorted(FileSystems.match([pattern])[0].metadata_list, key=lambda m: m.path):
    for data in example_records.read_tfrecord_file(meta.path):
      yield preprocess_dofns.read_client_element(data)


def _build_client_store(staging: str, stats: _Stats) -> None:
  """Builds `<staging>/clients.sqlite` from the client shards, checks it, deletes the shards.

  The file is built in a local directory (inside `staging` when it is local,
  so it is renamed into place; a temporary one otherwise, then copied
  through Beam's filesystems), in one sequential pass over the shards; rows
  go in sorted by split, client and order (`client_store`), so the file's
  bytes depend only on the rows.

  Raises:
    RowAccountingError: If a client comes twice, or the clients and counts
      differ from the pipeline's statistics (the runner lost or repeated
      elements).
    OutputDirError: If the file cannot be built or copied.
  """
  target = _join(staging, manifest_lib.STORE_FILENAME)
  local = '://' not in staging
  build_dir = tempfile.mkdtemp(prefix='.build-', dir=staging if local else None)
  try:
    built = os.path.join(build_dir, manifest_lib.STORE_FILENAME)
    try:
      counts = client_store.write_store_from_clients(built, _client_elements(staging))
    except client_store.ClientStoreError as e:
      raise RowAccountingError(
        f"the pipeline's client shards do not add up: {e} (a runner that repeats elements "
        'does this); nothing was written. Rerun, or use another runner.'
      ) from e
    except (OSError, ValueError, sqlite3.Error) as e:
      raise OutputDirError(
        f'cannot build {manifest_lib.STORE_FILENAME} from the client shards in {staging!r}: '
        f'{type(e).__name__}: {e}'
      ) from e
    expected = {split: clients for split, clients in stats.clients.items() if clients}
    if counts != expected:
      keys = {(s, c) for found in (counts, expected) for s in found for c in found[s]}
      differ = sorted(
        f'{s}/{c}' for s, c in keys if counts.get(s, {}).get(c) != expected.get(s, {}).get(c)
      )
      raise RowAccountingError(
        f"the client shards and the pipeline's statistics disagree on {len(differ)} client(s) "
        f'(first: {differ[:5]}): the runner lost or repeated elements; nothing was written. '
        'Rerun, or use another runner.'
      )
    try:
      if local:
        os.replace(built, target)
      else:
        with (
          open(built, 'rb') as source,
          FileSystems.create(
            target,
            mime_type='application/octet-stream',
            compression_type=CompressionTypes.UNCOMPRESSED,
          ) as sink,
        ):
          shutil.copyfileobj(source, sink, 1 << 20)
    except OSError as e:
      raise OutputDirError(f'cannot write {target!r}: {e}') from e
  finally:
    shutil.rmtree(build_dir, ignore_errors=True)
  shards = _join(staging, _CLIENTS_DIR)
  if tf.io.gfile.exists(shards):
    tf.io.gfile.rmtree(shards)


def _make_manifest(
  stats: _Stats, spec: feature_spec_lib.FeatureSpec, min_examples: int
) -> manifest_lib.Manifest:
  by_reason: dict[str, int] = {}
  for counts in stats.malformed.values():
    for reason, n in counts.items():
      by_reason[reason] = by_reason.get(reason, 0) + n
  return manifest_lib.Manifest(
    feature_spec=spec.to_json(),
    splits={
      s: manifest_lib.SplitManifest(clients=stats.clients[s], excluded_clients=stats.excluded[s])
      for s in stats.clients
    },
    num_features=spec.num_features,
    num_classes=spec.num_classes,
    label_task=spec.label.task,
    weighted=spec.weight is not None,
    dead_letter={
      'files': {s: f'{DEAD_LETTER_DIR}/{s}-*.jsonl' for s in stats.clients},
      'total': sum(by_reason.values()),
      'by_reason': dict(sorted(by_reason.items())),
      'by_split': {s: dict(sorted(stats.malformed[s].items())) for s in stats.clients},
    },
    extra={
      'preprocessing': {
        'rows_read': dict(stats.rows_read),
        'blank_lines': dict(stats.blank_lines),
        'ignored_columns': {s: dict(sorted(c.items())) for s, c in stats.ignored_columns.items()},
        'min_examples_per_client': min_examples,
      }
    },
    storage=manifest_lib.STORAGE_SQLITE,
  )


def _write_manifest(data_dir: str, manifest: manifest_lib.Manifest) -> None:
  if '://' not in data_dir:
    manifest_lib.write_manifest(data_dir, manifest)
    return
  with tf.io.gfile.GFile(manifest_lib.manifest_path(data_dir), 'w') as f:
    f.write(manifest.to_text())


def _swap_into_place(staging: str, output_dir: str) -> None:
  """Renames `staging` to `output_dir`; an existing output is kept until that succeeded."""
  gfile = tf.io.gfile
  previous = output_dir + PREVIOUS_SUFFIX
  if gfile.exists(previous):
    gfile.rmtree(previous)
  had_previous = gfile.exists(output_dir)
  if had_previous:
    gfile.rename(output_dir, previous)
  try:
    gfile.rename(staging, output_dir)
  except BaseException:
    if had_previous:
      gfile.rename(previous, output_dir)
    raise
  if had_previous:
    gfile.rmtree(previous)


def _keep_rejected(staging: str, rejected: str) -> None:
  """Moves a rejected run's staging dir aside, keeping only its dead letters."""
  gfile = tf.io.gfile
  if gfile.exists(rejected):
    gfile.rmtree(rejected)
  for sub in (_CLIENTS_DIR, _STATS_DIR):
    if gfile.exists(_join(staging, sub)):
      gfile.rmtree(_join(staging, sub))
  gfile.rename(staging, rejected)


def _check_output_dir(output_dir: str) -> None:
  gfile = tf.io.gfile
  if not gfile.exists(output_dir):
    return
  if not gfile.isdir(output_dir):
    raise OutputDirError(f'data.processed_dir={output_dir!r} is a file; choose a directory path.')
  if gfile.listdir(output_dir) and not gfile.exists(manifest_lib.manifest_path(output_dir)):
    raise OutputDirError(
      f'data.processed_dir={output_dir!r} exists and is not a preprocessing output (it has '
      f'no {manifest_lib.MANIFEST_FILENAME}); it would be replaced, so choose another '
      'data.processed_dir or remove it.'
    )


def _check_disjoint(inputs: Mapping[str, Sequence[InputFile]]) -> None:
  seen: dict[str, str] = {}
  for split, files in inputs.items():
    for f in files:
      if f.path in seen and seen[f.path] != split:
        raise InputFilesError(
          f'{f.path!r} matches both data.{seen[f.path]}_files and data.{split}_files; '
          'a file may feed one split only.'
        )
      seen[f.path] = split


def _absolute(path: str) -> str:
  return path if '://' in path else os.path.abspath(path)


def run_on_bundled_layout(
  raw_dir: str, output_dir: str, *, min_examples_per_client: int = 1
) -> PreprocessSummary:
  """Preprocesses a raw directory in the bundled layout, on the default local runner.

  The layout `bundled_data` and `silo_partition` write: `train.csv`,
  `test.csv` and `feature_spec.json` in `raw_dir`. For demos, tests and
  benchmarks; the `preprocess` program takes the same from a config.
  """
  return run_preprocessing(
    train_files=os.path.join(raw_dir, 'train.csv'),
    eval_files=os.path.join(raw_dir, 'test.csv'),
    feature_spec=feature_spec_lib.FeatureSpec.load(os.path.join(raw_dir, 'feature_spec.json')),
    output_dir=output_dir,
    min_examples_per_client=min_examples_per_client,
    max_malformed_fraction=0.0,
    pipeline_options=PipelineOptions([]),
  )

"""The Beam pipeline a silo runs on its raw records for a statistics query.

    raw files (CSV/JSONL, the preprocessing pipeline's readers)
      -> ReadStatisticsRecords: validate each row with the query's feature spec;
           malformed rows counted by reason, valid ones keyed by user
      -> GroupByKey per user
      -> BoundUser: keep at most max_rows_per_user rows (those with the
           smallest SHA-256 of user and row: deterministic), then the user's
           row count, per numeric feature the sums of its values clipped to
           [min, max] and centred at their midpoint, and its histogram; per
           categorical feature at most max_values_per_user distinct values
           (again the smallest hashes)
      -> sums over users; users per categorical value

`compute_silo_statistics` runs it on the local runner and returns the exact
`mechanism.ExactStatistics`. They never leave the silo as they are: the
silo's governance gate noises them (`fedpipe.statistics.mechanism.release`).

Records are validated with `FeatureSpec.parse_columns` (feature spec schema
2: raw numeric values and raw categorical strings); with a schema-1 spec,
which has numeric features only, with `parse_record` and the raw values.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineState

from fedpipe.errors import FedpipeError
from fedpipe.pipelines import dofns as preprocess_dofns
from fedpipe.pipelines import feature_spec as feature_spec_lib
from fedpipe.pipelines import pipeline as preprocess_pipeline
from fedpipe.statistics import mechanism
from fedpipe.statistics import query as query_lib

RAW_FORMATS = (preprocess_dofns.CSV_FORMAT, preprocess_dofns.JSONL_FORMAT)
_SPLIT = 'statistics'


class StatisticsInputError(FedpipeError, ValueError):
  """The silo's raw data or the query's feature spec cannot be used for statistics."""


def parse_columns(
  spec: feature_spec_lib.FeatureSpec, record: dict[str, Any]
) -> tuple[str, tuple[float, ...], tuple[str, ...]]:
  """`(client_key, numeric values, categorical values)` of a valid record, in spec order.

  Raises:
    feature_spec_lib.MalformedRecordError: If the record is malformed.
  """
  parse = getattr(spec, 'parse_columns', None)
  if parse is not None:
    parsed = parse(record)
    return parsed.client_key, tuple(parsed.numeric), tuple(parsed.categorical)
  key, _, _ = spec.parse_record(record)  # Schema 1: numeric features only, validated here.
  return key, tuple(float(record[f.name]) for f in spec.features), ()


def spec_columns(spec: feature_spec_lib.FeatureSpec) -> list[tuple[Any, ...]]:
  """What the spec says of each feature that the statistics depend on."""
  out = []
  for f in spec.features:
    kind = getattr(f, 'kind', query_lib.NUMERIC)
    if kind == query_lib.NUMERIC:
      out.append((f.name, kind, f.min, f.max))
    else:
      out.append((f.name, kind, getattr(f, 'max_values_per_user', 1)))
  return out


def check_query_spec(query: query_lib.StatisticsQuery) -> feature_spec_lib.FeatureSpec:
  """The query's feature spec, validated, and checked to say what the query read from it.

  Raises:
    StatisticsInputError: If the spec is invalid or disagrees with the query's columns.
  """
  try:
    spec = feature_spec_lib.FeatureSpec.from_json(
      query.feature_spec, source="the statistics query's feature spec"
    )
  except feature_spec_lib.FeatureSpecError as e:
    raise StatisticsInputError(str(e)) from e
  expected = [
    (c.name, c.kind, c.min, c.max)
    if c.kind == query_lib.NUMERIC
    else (c.name, c.kind, c.max_values_per_user)
    for c in query.columns
  ]
  if spec_columns(spec) != expected:
    raise StatisticsInputError(
      f"the statistics query's feature spec reads as {spec_columns(spec)}, but the query's "
      f'columns are {expected}; send a spec this fedpipe version reads the same way'
    )
  return spec


class ReadStatisticsRecordsFn(preprocess_dofns.ReadAndValidateFn):
  """Reads one raw file with the preprocessing readers; valid rows keyed by user.

  Input: `(file_index, path, format)`. Main output: `(client_key, (row hash,
  file_index, line, numeric values, categorical values))`. Tagged output
  `counts`: one `{'rows_read', 'malformed': {reason: n}}` per file.
  """

  COUNTS = 'counts'

  def __init__(self, spec: feature_spec_lib.FeatureSpec):
    super().__init__(_SPLIT, spec)

  def setup(self):
    self._columns = frozenset(self._spec.columns)

  def process(self, element: tuple[int, str, str]) -> Iterator[Any]:
    file_index, path, fmt = element
    rows, malformed = 0, {}
    with beam.io.filesystems.FileSystems.open(path) as f:
      records = self._csv_records(f) if fmt == preprocess_dofns.CSV_FORMAT else None
      if records is None:
        records = self._jsonl_records(f)
      for line_number, record, raw, error, _ in records:
        if record is None and error is None:
          continue  # A blank line.
        rows += 1
        if error is None:
          try:
            key, numeric, categorical = parse_columns(self._spec, record)
          except feature_spec_lib.MalformedRecordError as e:
            error = e
        if error is not None:
          malformed[error.reason] = malformed.get(error.reason, 0) + 1
          continue
        digest = hashlib.sha256(f'{key}\n{raw}'.encode()).digest()[:8]
        yield key, (digest, file_index, line_number, numeric, categorical)
    yield beam.pvalue.TaggedOutput(
      self.COUNTS, json.dumps({'kind': 'file', 'rows_read': rows, 'malformed': malformed})
    )


def _value_rank(key: str, feature: str, value: str) -> bytes:
  return hashlib.sha256(f'{key}\0{feature}\0{value}'.encode()).digest()


class BoundUserFn(beam.DoFn):
  """One user's bounded contribution (see the module docstring).

  Main output: the user's vector `[rows, users=1, rows over limit, values
  over limit, then per numeric feature: sum, sum of squares, histogram]`.
  Tagged output `values`: `(feature, value)` once per value the user keeps.
  """

  VALUES = 'values'

  def __init__(self, columns: Sequence[query_lib.StatisticsColumn], max_rows_per_user: int):
    self._numeric = [c for c in columns if c.kind == query_lib.NUMERIC]
    self._categorical = [c for c in columns if c.kind == query_lib.CATEGORICAL]
    self._limit = max_rows_per_user

  def process(self, element: tuple[str, Any]) -> Iterator[Any]:
    key, rows = element
    rows = sorted(rows, key=lambda row: row[:3])
    kept = rows[: self._limit]
    vector = np.zeros(vector_length(self._numeric))
    vector[0], vector[1], vector[2] = len(kept), 1, len(rows) - len(kept)
    at = 4
    for i, c in enumerate(self._numeric):
      values = np.clip(np.array([row[3][i] for row in kept], dtype=float), c.min, c.max)
      centred = values - c.center
      vector[at] = centred.sum()
      vector[at + 1] = (centred**2).sum()
      bins = np.minimum(((values - c.min) / (c.max - c.min) * c.bins).astype(int), c.bins - 1)
      vector[at + 2 : at + 2 + c.bins] = np.bincount(bins, minlength=c.bins)
      at += 2 + c.bins
    over = 0
    for i, c in enumerate(self._categorical):
      values = sorted({row[4][i] for row in kept}, key=lambda v: _value_rank(key, c.name, v))
      over += max(len(values) - c.max_values_per_user, 0)
      for value in values[: c.max_values_per_user]:
        yield beam.pvalue.TaggedOutput(self.VALUES, (c.name, value))
    vector[3] = over
    yield vector


def vector_length(numeric: Sequence[query_lib.StatisticsColumn]) -> int:
  return 4 + sum(2 + c.bins for c in numeric)


class _SumVectors(beam.CombineFn):
  def __init__(self, length: int):
    self._length = length

  def create_accumulator(self):
    return np.zeros(self._length)

  def add_input(self, accumulator, element):
    return accumulator + element

  def merge_accumulators(self, accumulators):
    return sum(accumulators, np.zeros(self._length))

  def extract_output(self, accumulator):
    return accumulator


def build_pipeline(
  pipeline: beam.Pipeline,
  *,
  files: Sequence[preprocess_pipeline.InputFile],
  spec: feature_spec_lib.FeatureSpec,
  query: query_lib.StatisticsQuery,
  output: str,
) -> None:
  """Adds the statistics transforms to `pipeline`; results go to `output` as JSON lines."""
  read = (
    pipeline
    | 'ListFiles' >> beam.Create([(i, f.path, f.format) for i, f in enumerate(files)])
    | 'SpreadFiles' >> beam.Reshuffle()
    | 'ReadStatisticsRecords'
    >> beam.ParDo(ReadStatisticsRecordsFn(spec)).with_outputs(
      ReadStatisticsRecordsFn.COUNTS, main='valid'
    )
  )
  users = (
    read.valid
    | 'GroupByUser' >> beam.GroupByKey()
    | 'BoundUser'
    >> beam.ParDo(BoundUserFn(query.columns, query.max_rows_per_user)).with_outputs(
      BoundUserFn.VALUES, main='vectors'
    )
  )
  totals = (
    users.vectors
    | 'SumUsers' >> beam.CombineGlobally(_SumVectors(vector_length(query.numeric)))
    | 'TotalsJson' >> beam.Map(lambda v: json.dumps({'kind': 'totals', 'vector': v.tolist()}))
  )
  values = (
    users[BoundUserFn.VALUES]
    | 'UsersPerValue' >> beam.combiners.Count.PerElement()
    | 'ValuesJson'
    >> beam.Map(
      lambda kv: json.dumps(
        {'kind': 'value', 'feature': kv[0][0], 'value': kv[0][1], 'users': kv[1]}
      )
    )
  )
  _ = (
    (totals, values, read[ReadStatisticsRecordsFn.COUNTS])
    | 'FlattenResults' >> beam.Flatten()
    | 'WriteResults' >> beam.io.WriteToText(output, shard_name_template='')
  )


def resolve_raw_files(raw_data: str, raw_format: str | None) -> list[preprocess_pipeline.InputFile]:
  """The raw files a silo computes statistics on.

  Args:
    raw_data: A path or glob (`fedpipe-silo --raw_data`).
    raw_format: `csv` or `jsonl`; None to tell it from each file's extension.

  Raises:
    StatisticsInputError: If nothing matches or a file cannot be read.
  """
  if raw_format is not None and raw_format not in RAW_FORMATS:
    raise StatisticsInputError(f'--raw_format must be one of {RAW_FORMATS}, got {raw_format!r}')
  pattern = os.path.abspath(raw_data) if '://' not in raw_data else raw_data
  try:
    if raw_format is None:
      return preprocess_pipeline.resolve_input_files(
        pattern, split=_SPLIT, config_field='--raw_data'
      )
    matches = beam.io.filesystems.FileSystems.match([pattern])[0].metadata_list
  except preprocess_pipeline.InputFilesError as e:
    raise StatisticsInputError(str(e)) from e
  except OSError as e:
    raise StatisticsInputError(f'cannot list --raw_data={raw_data!r}: {e}') from e
  if not matches:
    raise StatisticsInputError(f'no file matches --raw_data={raw_data!r}; check the path')
  return [
    preprocess_pipeline.InputFile(m.path, raw_format, int(m.size_in_bytes))
    for m in sorted(matches, key=lambda m: m.path)
  ]


def compute_silo_statistics(
  query: query_lib.StatisticsQuery,
  *,
  raw_data: str,
  raw_format: str | None = None,
  pipeline_options: PipelineOptions | None = None,
) -> mechanism.ExactStatistics:
  """Runs the statistics pipeline on a silo's raw records.

  Args:
    query: The approved query (its feature spec validates the records).
    raw_data: The raw files (a path or glob).
    raw_format: `csv`, `jsonl`, or None to tell it from the file names.
    pipeline_options: Beam options; default: the local runner.

  Returns:
    The exact, un-noised statistics (they stay at the silo).

  Raises:
    StatisticsInputError: If the files cannot be read, a CSV header lacks a
      column of the spec, or the spec is invalid.
    preprocess_pipeline.PipelineOptionsError: If the options name a runner
      that loses data.
  """
  spec = check_query_spec(query)
  files = resolve_raw_files(raw_data, raw_format)
  for f in files:
    if f.format == preprocess_dofns.CSV_FORMAT:
      try:
        spec.check_columns(preprocess_pipeline.read_csv_header(f.path), source=f.path)
      except (feature_spec_lib.FeatureSpecError, preprocess_pipeline.InputFilesError) as e:
        raise StatisticsInputError(str(e)) from e
  options = preprocess_pipeline.resolve_pipeline_options(pipeline_options or PipelineOptions([]))
  work = tempfile.mkdtemp(prefix='fedpipe-statistics-')  # Mode 0700: exact sums stay private.
  try:
    output = os.path.join(work, 'results.jsonl')
    pipeline = beam.Pipeline(options=options)
    build_pipeline(pipeline, files=files, spec=spec, query=query, output=output)
    state = pipeline.run().wait_until_finish()
    if state not in (None, PipelineState.DONE):
      raise StatisticsInputError(f'the statistics pipeline ended in state {state}')
    with open(output, encoding='utf-8') as f:
      items = [json.loads(line) for line in f if line.strip()]
  finally:
    shutil.rmtree(work, ignore_errors=True)
  return _statistics(items, query)


def _statistics(items: list[dict[str, Any]], query: query_lib.StatisticsQuery):
  (totals,) = [np.array(i['vector']) for i in items if i['kind'] == 'totals']
  numeric, at = {}, 4
  for c in query.numeric:
    numeric[c.name] = mechanism.NumericSums(
      sum=float(totals[at]),
      sum_of_squares=float(totals[at + 1]),
      histogram=tuple(float(v) for v in totals[at + 2 : at + 2 + c.bins]),
    )
    at += 2 + c.bins
  categorical = {c.name: {} for c in query.categorical}
  for i in items:
    if i['kind'] == 'value':
      categorical[i['feature']][i['value']] = float(i['users'])
  malformed: dict[str, int] = {}
  rows_read = 0
  for i in items:
    if i['kind'] == 'file':
      rows_read += i['rows_read']
      for reason, n in i['malformed'].items():
        malformed[reason] = malformed.get(reason, 0) + n
  return mechanism.ExactStatistics(
    rows=float(totals[0]),
    numeric=numeric,
    categorical=categorical,
    users=int(totals[1]),
    rows_read=rows_read,
    malformed=malformed,
    rows_over_limit=int(totals[2]),
    values_over_limit=int(totals[3]),
  )

"""The Beam DoFns of preprocessing: read and validate raw files, keep or exclude each client.

They run in Beam's workers, so this module does not import TensorFlow: each
worker process would spend seconds importing it (see `example_records`).
Examples are encoded with `example_records.ExampleEncoder`, wire-compatible
with `tf.train.Example`; the pipeline around them is in `preprocess_pipeline`.

A kept client leaves the pipeline as one element of its TFRecord shards
(`client_element`: the client's split, id and records, in order); the
launcher builds `clients.sqlite` from the shards (`read_client_element`).
"""

import csv
import functools
import json
import os
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from fedpipe.data import client_ids, example_records
from fedpipe.pipelines import feature_spec as feature_spec_lib

CSV_FORMAT = 'csv'
JSONL_FORMAT = 'jsonl'
# Dead-letter `raw` fields are cut to this many characters.
MAX_RAW_CHARS = 10_000
METRICS_NAMESPACE = 'fedpipe.pipelines'


def join_path(*parts: str) -> str:
  """Joins path parts: Beam's join for URLs (gs://...), os.path.join for local paths."""
  return FileSystems.join(*parts) if '://' in parts[0] else os.path.join(*parts)


class LineReader:
  """Iterates a binary file's lines as text, remembering what the current record consumed."""

  def __init__(self, f):
    self._f = f
    self.line_number = 0
    self.consumed: list[str] = []
    self.bad_encoding = False

  def start_record(self) -> None:
    self.consumed = []
    self.bad_encoding = False

  def raw(self) -> str:
    text = ''.join(self.consumed).rstrip('\r\n')
    return text if len(text) <= MAX_RAW_CHARS else text[:MAX_RAW_CHARS] + '...[truncated]'

  def __iter__(self) -> 'LineReader':
    return self

  def __next__(self) -> str:
    data = self._f.readline()
    if not data:
      raise StopIteration
    self.line_number += 1
    try:
      text = data.decode('utf-8')
    except UnicodeDecodeError:
      text = data.decode('utf-8', 'replace')
      self.bad_encoding = True
    if self.line_number == 1 and text.startswith('\ufeff'):
      text = text[1:]
    self.consumed.append(text)
    return text


def clean_header(header: Sequence[str]) -> list[str]:
  return [name.strip() for name in header]


class ReadAndValidateFn(beam.DoFn):
  """Reads one input file and validates its rows against the feature spec.

  Input: `(file_index, path, format)`. Main output: `(split/client_id,
  (file_index, [(line_number, serialized tf.train.Example), ...]))`: rows are
  combined per client before the shuffle (at most `MAX_BUFFERED_ROWS` held at
  once), so GroupByKey moves a few elements per client instead of one per row.
  Tagged outputs: `dead_letter` (JSON lines) and `stats` (one JSON line per
  file with its row and reason counts, and the rows that had each column the
  spec does not use).
  """

  MAX_BUFFERED_ROWS = 20_000

  DEAD_LETTER = 'dead_letter'
  STATS = 'stats'

  def __init__(self, split: str, spec: feature_spec_lib.FeatureSpec):
    self._split = split
    self._spec = spec

  def setup(self):
    self._encode = example_records.ExampleEncoder(
      label_task=self._spec.label.task, weighted=self._spec.weight is not None
    ).encode
    # (client key, x, y) or, with a weight column, (client key, x, y, w).
    self._parse = (
      self._spec.parse_record if self._spec.weight is None else self._spec.parse_weighted_record
    )
    self._client_id = functools.lru_cache(maxsize=65536)(client_ids.client_id_for_key)
    self._columns = frozenset(self._spec.columns)
    self._rows = Metrics.counter(METRICS_NAMESPACE, f'{self._split}_rows_read')
    self._valid = Metrics.counter(METRICS_NAMESPACE, f'{self._split}_rows_valid')
    self._reasons = {
      r: Metrics.counter(METRICS_NAMESPACE, f'{self._split}_malformed_{r}')
      for r in feature_spec_lib.REASONS
    }

  def _flush(self, buffers: dict[str, list], file_index: int) -> Iterator[Any]:
    for client_id, rows in buffers.items():
      yield f'{self._split}/{client_id}', (file_index, rows)
    buffers.clear()

  def process(self, element: tuple[int, str, str]) -> Iterator[Any]:
    file_index, path, fmt = element
    rows, valid, malformed, blank, ignored = 0, 0, {}, 0, {}
    buffers: dict[str, list] = {}
    buffered = 0
    with FileSystems.open(path) as f:
      records = self._csv_records(f) if fmt == CSV_FORMAT else self._jsonl_records(f)
      for line_number, record, raw, error, extra_columns in records:
        if record is None and error is None:
          blank += 1
          continue
        rows += 1
        for name in extra_columns:
          ignored[name] = ignored.get(name, 0) + 1
        if error is None:
          try:
            key, *example = self._parse(record)
          except feature_spec_lib.MalformedRecordError as e:
            error = e
        if error is not None:
          malformed[error.reason] = malformed.get(error.reason, 0) + 1
          self._reasons[error.reason].inc()
          yield beam.pvalue.TaggedOutput(
            self.DEAD_LETTER,
            json.dumps(
              {
                'file': path,
                'line_number': line_number,
                'reason': error.reason,
                'detail': error.detail,
                'raw': raw,
              }
            ),
          )
          continue
        valid += 1
        buffers.setdefault(self._client_id(key), []).append((line_number, self._encode(*example)))
        buffered += 1
        if buffered >= self.MAX_BUFFERED_ROWS:
          yield from self._flush(buffers, file_index)
          buffered = 0
    yield from self._flush(buffers, file_index)
    self._valid.inc(valid)
    self._rows.inc(rows)
    yield beam.pvalue.TaggedOutput(
      self.STATS,
      json.dumps(
        {
          'kind': 'file',
          'split': self._split,
          'file': path,
          'rows_read': rows,
          'blank_lines': blank,
          'malformed': malformed,
          'ignored_columns': ignored,
        }
      ),
    )

  def _csv_records(self, f) -> Iterator[tuple[int, Any, str, Any, Collection[str]]]:
    """Yields `(line_number, record | None, raw, error | None, columns not in the spec)`.

    Record and error are both None for blank lines; the columns are those of
    the header for each row read as a record, and () for other lines.
    """
    lines = LineReader(f)
    reader = csv.reader(lines)
    try:
      header = clean_header(next(reader))
    except StopIteration:
      return
    extra = tuple(name for name in header if name not in self._columns)
    while True:
      lines.start_record()
      line_number = lines.line_number + 1
      try:
        row = next(reader)
      except StopIteration:
        return
      except csv.Error as e:
        yield (
          line_number,
          None,
          lines.raw(),
          feature_spec_lib.MalformedRecordError(feature_spec_lib.BAD_CSV, str(e)),
          (),
        )
        continue
      if lines.bad_encoding:
        yield (
          line_number,
          None,
          lines.raw(),
          feature_spec_lib.MalformedRecordError(
            feature_spec_lib.BAD_ENCODING, 'the line is not valid UTF-8'
          ),
          (),
        )
      elif not row:
        yield line_number, None, '', None, ()
      elif len(row) != len(header):
        yield (
          line_number,
          None,
          lines.raw(),
          feature_spec_lib.MalformedRecordError(
            feature_spec_lib.WRONG_COLUMN_COUNT, f'{len(row)} columns, the header has {len(header)}'
          ),
          (),
        )
      else:
        yield line_number, dict(zip(header, row)), lines.raw(), None, extra

  def _jsonl_records(self, f) -> Iterator[tuple[int, Any, str, Any, Collection[str]]]:
    """As `_csv_records`; the columns not in the spec are each object's own."""
    lines = LineReader(f)
    for text in lines:
      raw = lines.raw()
      bad_encoding = lines.bad_encoding
      lines.start_record()
      if bad_encoding:
        yield (
          lines.line_number,
          None,
          raw,
          feature_spec_lib.MalformedRecordError(
            feature_spec_lib.BAD_ENCODING, 'the line is not valid UTF-8'
          ),
          (),
        )
        continue
      if not text.strip():
        yield lines.line_number, None, '', None, ()
        continue
      try:
        record = json.loads(text)
      except (json.JSONDecodeError, RecursionError) as e:
        yield (
          lines.line_number,
          None,
          raw,
          feature_spec_lib.MalformedRecordError(feature_spec_lib.BAD_JSON, f'not JSON: {e}'),
          (),
        )
        continue
      if not isinstance(record, dict):
        yield (
          lines.line_number,
          None,
          raw,
          feature_spec_lib.MalformedRecordError(
            feature_spec_lib.BAD_JSON, f'a JSON {type(record).__name__}, not an object'
          ),
          (),
        )
        continue
      yield lines.line_number, record, raw, None, record.keys() - self._columns


# The features of a client element (an Example: split, client id, records).
_SPLIT_KEY = 'split'
_CLIENT_ID_KEY = 'client_id'
_RECORDS_KEY = 'records'


def client_element(split: str, client_id: str, records: Sequence[bytes]) -> bytes:
  """One client's records as one shard element: a serialized Example.

  Features `split` and `client_id` (one bytes value each) and `records`
  (the client's serialized Examples, in order), so the element reads back
  with `read_client_element` or TensorFlow's Example parser.
  """
  element = example_records.Example()
  feature = element.features.feature
  feature[_SPLIT_KEY].bytes_list.value.append(split.encode('utf-8'))
  feature[_CLIENT_ID_KEY].bytes_list.value.append(client_id.encode('utf-8'))
  feature[_RECORDS_KEY].bytes_list.value.extend(records)
  return element.SerializeToString()


def read_client_element(data: bytes) -> tuple[str, str, list[bytes]]:
  """`(split, client_id, records)` of a `client_element`.

  Raises:
    ValueError: If `data` is not a client element.
  """
  try:
    feature = example_records.Example.FromString(data).features.feature
    (split,) = feature[_SPLIT_KEY].bytes_list.value
    (client_id,) = feature[_CLIENT_ID_KEY].bytes_list.value
    return (
      split.decode('utf-8'),
      client_id.decode('utf-8'),
      list(feature[_RECORDS_KEY].bytes_list.value),
    )
  except Exception as e:  # DecodeError, ValueError (unpacking), UnicodeDecodeError.
    raise ValueError(f'not a client element ({type(e).__name__}: {e})') from e


class KeepClientFn(beam.DoFn):
  """Keeps a client with at least `min_examples` examples as one shard element, or excludes it.

  Input: `(split/client_id, chunks)` after GroupByKey. Main output: one
  JSON line with the client's count and whether it was kept (`written`).
  Tagged output `clients`: the kept client's `client_element`, its examples
  in input order (file, line), so reruns and other runners give the same
  records in the same order.
  """

  CLIENTS = 'clients'

  def __init__(self, min_examples: int):
    self._min_examples = min_examples

  def setup(self):
    self._written = Metrics.counter(METRICS_NAMESPACE, 'clients_written')
    self._excluded = Metrics.counter(METRICS_NAMESPACE, 'clients_excluded')
    self._examples = Metrics.counter(METRICS_NAMESPACE, 'examples_written')

  def process(self, element: tuple[str, Any]) -> Iterator[Any]:
    key, chunks = element
    split, client_id = key.split('/', 1)
    examples = sorted(
      (file_index, line, example) for file_index, rows in chunks for line, example in rows
    )
    written = len(examples) >= self._min_examples
    if written:
      records = [example for _, _, example in examples]
      yield beam.pvalue.TaggedOutput(self.CLIENTS, client_element(split, client_id, records))
      self._written.inc()
      self._examples.inc(len(examples))
    else:
      self._excluded.inc()
    yield json.dumps(
      {
        'kind': 'client',
        'split': split,
        'client_id': client_id,
        'count': len(examples),
        'written': written,
      }
    )

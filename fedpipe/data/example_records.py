"""`tf.train.Example` records and TFRecord files without importing TensorFlow.

Beam workers that write client files only need to build Example protos and
frame them as TFRecords. Importing TensorFlow for that costs each worker
process seconds of start-up (measured by
benchmarks/preprocess_throughput_measure_startup.py), which dominates small
preprocessing runs. This module declares the Example messages
in a private protobuf descriptor pool (the same fields and numbers as
tensorflow/core/example/{example,feature}.proto, so the bytes are the same as
`tf.train.Example.SerializeToString()`), encodes examples in the record
schema (`ExampleEncoder`, see `record_schema`; `encode_rows` for whole arrays
at a time, byte for byte the same) and writes and reads TFRecord files with
Beam's TFRecord coder (CRC32C from google-crc32c): `write_tfrecord_file`,
the one TFRecord writer of fedpipe's client data, and `read_tfrecord_file`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from apache_beam.io import tfrecordio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from fedpipe.data import atomic_files, record_schema

_FIELD = descriptor_pb2.FieldDescriptorProto


def _example_file() -> descriptor_pb2.FileDescriptorProto:
  """The Example/Features/Feature messages, as declared by TensorFlow (proto3)."""
  f = descriptor_pb2.FileDescriptorProto(
    name='fedpipe/tf_example.proto', package='tensorflow', syntax='proto3'
  )

  def message(name: str, fields: Iterable[tuple[str, int, int, int, str]]):
    m = f.message_type.add(name=name)
    for field_name, number, label, kind, type_name in fields:
      m.field.add(
        name=field_name, number=number, label=label, type=kind, type_name=type_name or None
      )
    return m

  repeated, optional = _FIELD.LABEL_REPEATED, _FIELD.LABEL_OPTIONAL
  message('BytesList', [('value', 1, repeated, _FIELD.TYPE_BYTES, '')])
  message('FloatList', [('value', 1, repeated, _FIELD.TYPE_FLOAT, '')])
  message('Int64List', [('value', 1, repeated, _FIELD.TYPE_INT64, '')])
  feature = message(
    'Feature',
    [
      ('bytes_list', 1, optional, _FIELD.TYPE_MESSAGE, '.tensorflow.BytesList'),
      ('float_list', 2, optional, _FIELD.TYPE_MESSAGE, '.tensorflow.FloatList'),
      ('int64_list', 3, optional, _FIELD.TYPE_MESSAGE, '.tensorflow.Int64List'),
    ],
  )
  feature.oneof_decl.add(name='kind')
  for field in feature.field:
    field.oneof_index = 0
  features = message(
    'Features', [('feature', 1, repeated, _FIELD.TYPE_MESSAGE, '.tensorflow.Features.FeatureEntry')]
  )
  entry = features.nested_type.add(name='FeatureEntry')
  entry.options.map_entry = True
  entry.field.add(name='key', number=1, label=optional, type=_FIELD.TYPE_STRING)
  entry.field.add(
    name='value',
    number=2,
    label=optional,
    type=_FIELD.TYPE_MESSAGE,
    type_name='.tensorflow.Feature',
  )
  message('Example', [('features', 1, optional, _FIELD.TYPE_MESSAGE, '.tensorflow.Features')])
  return f


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_example_file())

Example = message_factory.GetMessageClass(_POOL.FindMessageTypeByName('tensorflow.Example'))
"""`tensorflow.Example`, wire-compatible with `tf.train.Example`."""


class ExampleEncoder:
  """Serializes examples in the record schema (`record_schema`) as `tf.train.Example` bytes.

  One message is reused for every example: building a new one per example
  costs more than serializing it, in loops over millions of rows.

  Args:
    label_task: The label task (`record_schema.LABEL_TASKS`): int64 labels
      for 'multiclass' and 'binary', float32 for 'regression'.
    weighted: Whether records carry an example weight `w`.
  """

  def __init__(self, *, label_task: str = record_schema.MULTICLASS, weighted: bool = False):
    label = record_schema.label_feature(label_task)
    self._int_label = label.dtype == record_schema.LABEL.dtype
    self._example = Example()
    feature = self._example.features.feature
    self._x = getattr(feature[record_schema.FEATURES.key], record_schema.FEATURES.list_field).value
    self._y = getattr(feature[label.key], label.list_field).value
    self._w = None
    if weighted:
      self._w = getattr(feature[record_schema.WEIGHT.key], record_schema.WEIGHT.list_field).value
    # (num_features, label) -> the bytes before and after the values (`encode_rows`).
    self._frames: dict[tuple[int, int], tuple[bytes, bytes]] = {}

  def encode(self, x: Sequence[float], y: float, w: float | None = None) -> bytes:
    """The serialized Example of features `x`, label `y` and, if weighted, weight `w`.

    Raises:
      ValueError: If `w` is given to an unweighted encoder or missing for a
        weighted one.
    """
    self._x[:] = x
    self._y[:] = [y]
    if self._w is not None:
      if w is None:
        raise ValueError('this encoder writes weighted records: pass the example weight w')
      self._w[:] = [w]
    elif w is not None:
      raise ValueError('this encoder writes records without weights; build it with weighted=True')
    return self._example.SerializeToString()

  def encode_rows(self, x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> list[bytes]:
    """The serialized Examples of the rows of `x` `[n, num_features]`, labels `y` `[n]` (weights `w` `[n]`).

    The same bytes as `encode(row, label[, weight])` for each row. For int
    labels without weights about 20 times faster: every record of one width
    has the same framing around its float32 values except for the label's
    varint, so the framing is built once per width and label (and kept) and
    the values are copied in as they are in memory.

    Args:
      x: Features, float32 (other float dtypes are converted), 2-D.
      y: Labels, one per row: integers, or floats for 'regression'.
      w: Example weights, one per row (a weighted encoder), or None.

    Returns:
      One serialized `tf.train.Example` per row, in order.
    """
    x = np.ascontiguousarray(x, dtype='<f4')
    y = np.asarray(y)
    if x.ndim != 2 or y.shape != (x.shape[0],):
      raise ValueError(f'x must be [n, num_features] and y [n], got {x.shape} and {y.shape}')
    if w is not None:
      w = np.asarray(w, dtype=np.float32)
      if w.shape != y.shape:
        raise ValueError(f'w must be [n] as y is, got {w.shape} and {y.shape}')
    width = x.shape[1]
    if not self._int_label or self._w is not None or w is not None:
      rows = x.tolist()
      if w is None:
        return [self.encode(row, label) for row, label in zip(rows, y.tolist())]
      return [self.encode(row, a, b) for row, a, b in zip(rows, y.tolist(), w.tolist())]
    if width == 0:  # An empty packed list is left out altogether: the general path.
      return [self.encode([], label) for label in y.tolist()]
    values = x.tobytes()
    row_bytes = 4 * width
    out = []
    for i, label in enumerate(y.tolist()):
      frame = self._frames.get((width, label))
      if frame is None:
        frame = self._frames[width, label] = _frame(width, label)
      out.append(b''.join((frame[0], values[i * row_bytes : (i + 1) * row_bytes], frame[1])))
    return out


def _frame(width: int, label: int) -> tuple[bytes, bytes]:
  """The bytes of an Example before and after its `width` float32 values, for `label`.

  The map entries in the order the protobuf runtime writes them (`x`, then
  `y`); `encode_rows`'s equality with `encode` is tested.
  """
  row_bytes = 4 * width
  x_entry = _field(1, _field(1, b'x') + _field(2, _field(2, _field(1, bytes(row_bytes)))))
  y_entry = _field(1, _field(1, b'y') + _field(2, _field(3, _field(1, _varint(label)))))
  head = b'\x0a' + _varint(len(x_entry) + len(y_entry)) + x_entry[: len(x_entry) - row_bytes]
  return head, y_entry


def _varint(value: int) -> bytes:
  """`value` as a protobuf varint (negative int64 as its 64-bit two's complement)."""
  value &= (1 << 64) - 1
  out = bytearray()
  while value > 0x7F:
    out.append((value & 0x7F) | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
  """A length-delimited field: its tag, the payload's length, the payload."""
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def write_tfrecord_file(path: str, records: Iterable[bytes]) -> int:
  """Writes `records` as an uncompressed TFRecord file (any Beam filesystem), atomically.

  The file is written under a temporary name next to `path` and renamed into
  place, so a reader never sees a part of it and a retried writer (a Beam
  bundle run again) replaces it whole.

  Args:
    path: The file to create; replaced if it exists.
    records: The serialized records, in file order.

  Returns:
    The number of records written.
  """
  tmp = atomic_files.temp_path(path)
  count = 0
  try:
    with FileSystems.create(
      tmp, mime_type='application/octet-stream', compression_type=CompressionTypes.UNCOMPRESSED
    ) as f:
      for record in records:
        tfrecordio._TFRecordUtil.write_record(f, record)
        count += 1
    FileSystems.rename([tmp], [path])
  except BaseException:
    if FileSystems.exists(tmp):
      FileSystems.delete([tmp])
    raise
  return count


def read_tfrecord_file(path: str) -> Iterator[bytes]:
  """The records of an uncompressed TFRecord file (any Beam filesystem), in order.

  Each record's length and data checksums are verified.

  Raises:
    ValueError: If the file is not a valid TFRecord file (truncated, or a
      checksum does not match).
  """
  with FileSystems.open(
    path, mime_type='application/octet-stream', compression_type=CompressionTypes.UNCOMPRESSED
  ) as f:
    while (record := tfrecordio._TFRecordUtil.read_record(f)) is not None:
      yield record

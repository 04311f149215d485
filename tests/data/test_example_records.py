"""Tests of fedpipe.data.example_records: Example bytes and TFRecord files as TensorFlow writes them."""

import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from fedpipe.data import example_records
from tests.conftest import REPO_ROOT


def _tf_example(x, y, extra=None):
  e = tf.train.Example()
  e.features.feature['x'].float_list.value[:] = x
  e.features.feature['y'].int64_list.value[:] = y
  if extra is not None:
    e.features.feature['id'].bytes_list.value[:] = extra
  return e


def _ours(x, y, extra=None):
  e = example_records.Example()
  e.features.feature['x'].float_list.value[:] = x
  e.features.feature['y'].int64_list.value[:] = y
  if extra is not None:
    e.features.feature['id'].bytes_list.value[:] = extra
  return e


@pytest.mark.parametrize(
  'x,y,extra',
  [
    ([0.5, -1.25, 3.0], [7], None),
    ([], [0], None),
    (list(np.linspace(-3, 3, 64, dtype=np.float32)), [9], None),
    ([1e-38, 3.4e38, -0.0], [-1, 2**40], [b'client-7', b'']),
  ],
)
def test_example_bytes_equal_tf_train_example(x, y, extra):
  ours = _ours(x, y, extra).SerializeToString()
  assert ours == _tf_example(x, y, extra).SerializeToString()
  parsed = tf.train.Example.FromString(ours)
  np.testing.assert_array_equal(
    parsed.features.feature['x'].float_list.value, np.float32(x) if x else []
  )
  assert list(parsed.features.feature['y'].int64_list.value) == y


def test_tfrecord_file_equals_tf_writer_and_reads_back(tmp_path):
  records = [_ours([float(i), -i / 3], [i % 10]).SerializeToString() for i in range(50)]
  records.append(b'')  # An empty record is framed too.
  ours, theirs = tmp_path / 'ours.tfrecord', tmp_path / 'theirs.tfrecord'
  assert example_records.write_tfrecord_file(str(ours), iter(records)) == len(records)
  with tf.io.TFRecordWriter(str(theirs)) as writer:
    for r in records:
      writer.write(r)
  assert ours.read_bytes() == theirs.read_bytes()
  # TF checks the CRCs when it reads.
  read = [r.numpy() for r in tf.data.TFRecordDataset(str(ours))]
  assert read == records


def test_corrupted_byte_fails_tf_crc_check(tmp_path):
  path = tmp_path / 'one.tfrecord'
  example_records.write_tfrecord_file(str(path), [_ours([1.0, 2.0], [1]).SerializeToString()])
  data = bytearray(path.read_bytes())
  data[20] ^= 0xFF
  path.write_bytes(bytes(data))
  with pytest.raises(tf.errors.DataLossError):
    list(tf.data.TFRecordDataset(str(path)))


def test_rewrite_replaces_the_file(tmp_path):
  path = str(tmp_path / 'f.tfrecord')
  example_records.write_tfrecord_file(path, [b'a' * 100, b'b'])
  assert example_records.write_tfrecord_file(path, [b'c']) == 1
  assert [r.numpy() for r in tf.data.TFRecordDataset(path)] == [b'c']


@pytest.mark.parametrize(
  'module',
  [
    'fedpipe.data.example_records',
    'fedpipe.pipelines.dofns',
    'fedpipe.data.client_store',
    'fedpipe.data.client_data_writer',
  ],
)
def test_worker_side_modules_do_not_import_tensorflow(module):
  # Beam's worker processes import these; TensorFlow would add seconds to each.
  code = (
    f'import sys, {module}; '
    'bad = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras")); '
    'print(bad); sys.exit(1 if bad else 0)'
  )
  result = subprocess.run(
    [sys.executable, '-c', code],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
  'x,y', [([0.5, -1.25, 3.0], 7), ([], 0), (list(np.linspace(-3, 3, 64)), 9), ([1e-38], 2**40)]
)
def test_encoder_writes_the_record_schema_as_tf_does(x, y):
  encoder = example_records.ExampleEncoder()
  encoder.encode([9.0] * 70, 1)  # A reused message keeps nothing of the previous example.
  assert encoder.encode(x, y) == _tf_example(x, [y]).SerializeToString()


def test_record_schema_is_what_the_manifest_declares_and_the_reader_parses():
  from fedpipe.computations import client_data
  from fedpipe.data import manifest as manifest_lib
  from fedpipe.data import record_schema

  assert record_schema.record_format(5) == {
    'x': {'dtype': 'float32', 'shape': [5]},
    'y': {'dtype': 'int64', 'shape': []},
  }
  manifest = manifest_lib.Manifest(feature_spec={}, splits={}, num_features=5, num_classes=2)
  assert manifest.to_json()['record_format'] == record_schema.record_format(5)
  assert client_data.batch_spec(5) == {
    'x': tf.TensorSpec([None, 5], tf.float32),
    'y': tf.TensorSpec([None], tf.int64),
  }
  parsed = tf.io.parse_example(
    [example_records.ExampleEncoder().encode([1, 2, 3, 4, 5], 1)],
    client_data._feature_description(5),
  )
  assert parsed['x'].dtype == tf.float32 and parsed['x'].shape == (1, 5)
  assert parsed['y'].numpy().tolist() == [1]


def test_a_failed_write_keeps_the_old_file_and_no_temporary_file(tmp_path):
  path = str(tmp_path / 'c.tfrecord')
  example_records.write_tfrecord_file(path, [b'old'])

  def failing():
    yield b'new'
    raise RuntimeError('the bundle failed')

  with pytest.raises(RuntimeError, match='the bundle failed'):
    example_records.write_tfrecord_file(path, failing())
  assert [r.numpy() for r in tf.data.TFRecordDataset(path)] == [b'old']
  assert [p.name for p in tmp_path.iterdir()] == ['c.tfrecord']


@pytest.mark.parametrize('width', [1, 3, 31, 64, 784])
def test_encode_rows_writes_the_bytes_of_encode_row_by_row(width):
  rng = np.random.default_rng(width)
  x = (rng.normal(size=(40, width)) * 10.0 ** rng.integers(-30, 30, size=(40, width))).astype(
    np.float32
  )
  x[0, 0], x[1, 0] = -0.0, np.finfo(np.float32).tiny / 4  # Negative zero, a subnormal.
  # Labels of 1, 2, 3 and 6 varint bytes, and one that is negative (10 bytes).
  y = np.array([0, 1, 127, 128, 16383, 16384, 2**40, -1] * 5)
  encoder = example_records.ExampleEncoder()
  expected = [encoder.encode(row, label) for row, label in zip(x.tolist(), y.tolist())]
  assert encoder.encode_rows(x, y) == expected
  assert encoder.encode_rows(x, y) == expected  # Again, from the kept framing.
  assert expected[0] == _tf_example(x[0].tolist(), [0]).SerializeToString()
  # float64 values are written as float32, as `encode` does.
  assert encoder.encode_rows(x.astype(np.float64), y) == expected


def test_encode_rows_of_no_features_and_bad_shapes():
  encoder = example_records.ExampleEncoder()
  assert encoder.encode_rows(np.zeros((2, 0)), np.array([1, 2])) == [
    encoder.encode([], 1),
    encoder.encode([], 2),
  ]
  with pytest.raises(ValueError, match='x must be'):
    encoder.encode_rows(np.zeros((2, 3)), np.array([1]))


def test_read_tfrecord_file_reads_what_tf_wrote_and_checks_it(tmp_path):
  path = str(tmp_path / 'r.tfrecord')
  records = [b'', b'one', bytes(range(256)) * 40]
  with tf.io.TFRecordWriter(path) as writer:
    for r in records:
      writer.write(r)
  assert list(example_records.read_tfrecord_file(path)) == records
  data = bytearray(open(path, 'rb').read())
  data[-5] ^= 0xFF
  with open(path, 'wb') as f:
    f.write(bytes(data))
  with pytest.raises(ValueError, match='Not a valid TFRecord'):
    list(example_records.read_tfrecord_file(path))

"""write_client_data: arrays in, the preprocessing pipeline's layout and manifest out."""

import hashlib
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from fedpipe.computations import client_data
from fedpipe.data import client_store
from fedpipe.data import manifest as manifest_lib
from fedpipe.data.client_data_writer import (
  ClientDataDirError,
  ClientDataError,
  write_client_data,
)
from fedpipe.errors import FedpipeError

NUM_FEATURES = 3


def _clients(sizes, *, seed=0, num_classes=4):
  rng = np.random.default_rng(seed)
  return {
    client_id: (
      rng.normal(size=(n, NUM_FEATURES)),
      rng.integers(0, num_classes, size=n),
    )
    for client_id, n in sizes.items()
  }


def _parse_with_tf(records):
  description = {
    'x': tf.io.FixedLenFeature([NUM_FEATURES], tf.float32),
    'y': tf.io.FixedLenFeature([], tf.int64),
  }
  xs, ys = [], []
  for record in records:
    parsed = tf.io.parse_single_example(record, description)
    xs.append(parsed['x'].numpy())
    ys.append(int(parsed['y']))
  return np.array(xs), np.array(ys)


def _tfrecords(path):
  return [r.numpy() for r in tf.data.TFRecordDataset(str(path))]


def _store(directory):
  return str(directory / manifest_lib.STORE_FILENAME)


def test_round_trip_through_tensorflow_and_the_client_data_reader(tmp_path, monkeypatch):
  train = _clients({'alice': 5, 'bob': 1, 'c-3.x_y': 17})
  eval_ = _clients({'alice': 2, 'dora': 4}, seed=1)
  out = tmp_path / 'clients'
  written = write_client_data(out, train, eval_, num_classes=4)

  # One SQLite file for every client, whatever their number.
  assert sorted(os.listdir(out)) == ['clients.sqlite', 'manifest.json']
  # Nothing left beside it (staging directories are renamed away).
  assert os.listdir(tmp_path) == ['clients']
  assert client_store.client_counts(_store(out)) == {
    'train': {'alice': 5, 'bob': 1, 'c-3.x_y': 17},
    'eval': {'alice': 2, 'dora': 4},
  }

  manifest = manifest_lib.read_manifest(str(out))
  assert manifest.storage == manifest_lib.STORAGE_SQLITE
  assert manifest.to_json() == written.to_json()
  assert manifest.num_features == NUM_FEATURES
  assert manifest.num_classes == 4
  assert dict(manifest.split('train').clients) == {'alice': 5, 'bob': 1, 'c-3.x_y': 17}
  assert dict(manifest.split('eval').clients) == {'alice': 2, 'dora': 4}
  assert manifest.feature_spec['label'] == {'name': 'y', 'num_classes': 4}
  assert [f['name'] for f in manifest.feature_spec['features']] == ['x0', 'x1', 'x2']

  for split, clients in (('train', train), ('eval', eval_)):
    for client_id, (x, y) in clients.items():
      got_x, got_y = _parse_with_tf(client_store.read_client(_store(out), split, client_id))
      np.testing.assert_array_equal(got_x, x.astype(np.float32))
      np.testing.assert_array_equal(got_y, y)

  # The reader training uses, relative to the worker's working directory.
  monkeypatch.chdir(out)
  dataset_fn = client_data.make_dataset_fn(
    split='train', num_features=NUM_FEATURES, batch_size=4, shuffle=False, storage=manifest.storage
  )
  batches = list(dataset_fn(tf.constant('c-3.x_y')))
  x, y = train['c-3.x_y']
  np.testing.assert_array_equal(np.concatenate([b['x'] for b in batches]), x.astype(np.float32))
  np.testing.assert_array_equal(np.concatenate([b['y'] for b in batches]), y)


def test_the_per_client_layout_on_request_holds_the_same_records(tmp_path, monkeypatch):
  train = _clients({'alice': 5, 'bob': 1, 'c-3.x_y': 17})
  eval_ = _clients({'alice': 2, 'dora': 4}, seed=1)
  old, new = tmp_path / 'old', tmp_path / 'new'
  legacy = write_client_data(
    old, train, eval_, num_classes=4, storage=manifest_lib.STORAGE_TFRECORD_PER_CLIENT
  )
  write_client_data(new, train, eval_, num_classes=4)

  assert sorted(os.listdir(old)) == ['eval', 'manifest.json', 'train']
  assert sorted(os.listdir(old / 'train')) == ['alice.tfrecord', 'bob.tfrecord', 'c-3.x_y.tfrecord']
  assert sorted(os.listdir(old / 'eval')) == ['alice.tfrecord', 'dora.tfrecord']
  assert legacy.storage == manifest_lib.read_manifest(str(old)).storage == 'tfrecord_per_client'
  for split, clients in (('train', train), ('eval', eval_)):
    for client_id in clients:
      # Byte for byte the records of the SQLite layout, in the same order.
      assert _tfrecords(old / manifest_lib.client_file(split, client_id)) == (
        client_store.read_client(_store(new), split, client_id)
      )

  monkeypatch.chdir(old)
  dataset_fn = client_data.make_dataset_fn(
    split='eval',
    num_features=NUM_FEATURES,
    batch_size=4,
    shuffle=False,
    storage=legacy.storage,
  )
  (batch,) = list(dataset_fn(tf.constant('dora')))
  np.testing.assert_array_equal(batch['x'], eval_['dora'][0].astype(np.float32))


def test_the_same_data_writes_the_same_bytes(tmp_path):
  def digest(directory):
    return hashlib.sha256((directory / manifest_lib.STORE_FILENAME).read_bytes()).hexdigest()

  train = _clients({f'user{i:03d}': 1 + i % 7 for i in range(300)})
  write_client_data(tmp_path / 'a', train, num_classes=4)
  reordered = dict(reversed(list(train.items())))
  write_client_data(tmp_path / 'b', reordered, num_classes=4)
  assert digest(tmp_path / 'a') == digest(tmp_path / 'b')


def test_an_unknown_storage_is_refused(tmp_path):
  with pytest.raises(ClientDataError, match=r"storage must be one of .*got 'parquet'"):
    write_client_data(tmp_path / 'd', _clients({'a': 2}), num_classes=4, storage='parquet')
  assert os.listdir(tmp_path) == []


def test_records_are_tf_train_examples_with_the_pipelines_features(tmp_path):
  x = np.array([[0.5, -1.25, 3.0]], dtype=np.float32)
  write_client_data(tmp_path / 'd', {'u1': (x, [2])}, num_classes=3)
  (record,) = client_store.read_client(_store(tmp_path / 'd'), 'train', 'u1')
  expected = tf.train.Example(
    features=tf.train.Features(
      feature={
        'x': tf.train.Feature(float_list=tf.train.FloatList(value=x[0])),
        'y': tf.train.Feature(int64_list=tf.train.Int64List(value=[2])),
      }
    )
  )
  assert tf.train.Example.FromString(record) == expected
  assert record == expected.SerializeToString()


def test_manifest_has_the_pipelines_fields_and_no_eval_split_without_eval(tmp_path):
  write_client_data(tmp_path / 'd', _clients({'a': 3, 'b': 2}))
  with open(tmp_path / 'd' / 'manifest.json', encoding='utf-8') as f:
    data = json.load(f)
  assert set(data) >= {
    'schema_version',
    'record_format',
    'num_features',
    'num_classes',
    'feature_spec',
    'splits',
    'dead_letter',
    'storage',
  }
  assert data['storage'] == 'sqlite'
  assert data['record_format'] == {
    'x': {'dtype': 'float32', 'shape': [NUM_FEATURES]},
    'y': {'dtype': 'int64', 'shape': []},
  }
  assert list(data['splits']) == ['train']
  assert data['splits']['train']['num_examples'] == 5
  assert list(client_store.client_counts(_store(tmp_path / 'd'))) == ['train']


def test_num_classes_is_inferred_or_taken_from_the_feature_spec(tmp_path):
  inferred = write_client_data(tmp_path / 'a', {'a': ([[1.0], [2.0]], [0, 6])})
  assert inferred.num_classes == 7
  spec = {
    'schema_version': 1,
    'client_key': 'user',
    'label': {'name': 'digit', 'num_classes': 10},
    'features': [{'name': 'pixel', 'min': 0.0, 'max': 16.0}],
  }
  given = write_client_data(tmp_path / 'b', {'a': ([[1.0], [2.0]], [0, 6])}, feature_spec=spec)
  assert given.num_classes == 10
  assert manifest_lib.read_manifest(str(tmp_path / 'b')).feature_spec == spec


def test_an_existing_client_data_directory_is_replaced(tmp_path):
  out = tmp_path / 'd'
  write_client_data(out, _clients({'old1': 3, 'old2': 3}), num_classes=4)
  write_client_data(out, _clients({'new': 4}), num_classes=4)
  assert client_store.client_counts(_store(out)) == {'train': {'new': 4}}
  assert dict(manifest_lib.read_manifest(str(out)).split('train').clients) == {'new': 4}
  assert os.listdir(tmp_path) == ['d']


def test_a_directory_that_is_not_client_data_is_refused_and_left_alone(tmp_path):
  out = tmp_path / 'mine'
  out.mkdir()
  (out / 'notes.txt').write_text('keep me')
  with pytest.raises(ClientDataDirError, match='not a client-data directory') as error:
    write_client_data(out, _clients({'a': 2}))
  assert isinstance(error.value, FedpipeError)
  assert os.listdir(out) == ['notes.txt']
  (tmp_path / 'file').write_text('')
  with pytest.raises(ClientDataDirError, match='not a directory'):
    write_client_data(tmp_path / 'file', _clients({'a': 2}))
  assert sorted(os.listdir(tmp_path)) == ['file', 'mine']


def _xy(n=2, width=NUM_FEATURES):
  return np.zeros((n, width)), np.zeros(n, dtype=int)


@pytest.mark.parametrize(
  'train, eval_, kwargs, message',
  [
    ({'../evil': _xy()}, None, {}, r"client id '../evil' is not a valid client id"),
    ({'.hidden': _xy()}, None, {}, r"client id '.hidden' is not a valid client id"),
    ({'a': (np.zeros(3), [0, 1, 2])}, None, {}, r"client 'a': x has shape \(3,\); it must be 2-D"),
    ({'a': (np.zeros((0, 3)), [])}, None, {}, r"client 'a'.*at least one example"),
    ({'a': (np.zeros((3, 2)), [0, 1])}, None, {}, r"client 'a': y has shape \(2,\).*shape \(3,\)"),
    ({'a': np.zeros((3, 2))}, None, {}, r"client 'a': expected a pair \(x, y\)"),
    (
      {'a': _xy(), 'b': ([[0.0, np.nan, 1.0]], [0])},
      None,
      {},
      r"train split, client 'b': x holds NaN or infinite values in 1 row\(s\) \(first: row 0\)",
    ),
    ({'a': ([[1e39]], [0])}, None, {}, r"client 'a': x holds values beyond float32 range"),
    ({'a': ([['one']], [0])}, None, {}, r"client 'a': x is not a numeric array"),
    ({'a': ([[0.0], [1.0]], [0.0, 1.0])}, None, {}, r"client 'a': y has dtype float64"),
    (
      {'a': _xy(3), 'b': (np.zeros((2, 3)), [0, 5])},
      None,
      {'num_classes': 3},
      r"train split, client 'b': label 5 \(row 1\) is not a class index \[0, 3\)",
    ),
    ({'a': ([[0.0], [1.0]], [1, -1])}, None, {}, r"client 'a': label -1 \(row 1\)"),
    (
      {'a': _xy(width=3)},
      {'e1': _xy(width=4)},
      {},
      r"eval split, client 'e1': x has 4 features, but train split, client 'a' has 3",
    ),
    ({}, None, {}, r'train split has no clients'),
    ({'a': _xy()}, {}, {}, r'eval split has no clients.*eval=None'),
    ({'a': _xy()}, None, {}, r'every label is 0.*pass num_classes='),
    ({'a': _xy()}, None, {'num_classes': 1}, r'num_classes must be an integer >= 2, got 1'),
    (
      {'a': ([[0.0]], [1])},
      None,
      {'feature_spec': {'features': [{'name': 'f1'}, {'name': 'f2'}]}},
      r'feature_spec lists 2 features but x has 1 columns',
    ),
    (
      {'a': ([[0.0]], [1])},
      None,
      {'num_classes': 3, 'feature_spec': {'label': {'name': 'y', 'num_classes': 4}}},
      r'num_classes=3 but feature_spec "label.num_classes" is 4',
    ),
  ],
)
def test_bad_inputs_are_refused_naming_the_client_and_nothing_is_written(
  tmp_path, train, eval_, kwargs, message
):
  with pytest.raises(ClientDataError, match=message) as error:
    write_client_data(tmp_path / 'd', train, eval_, **kwargs)
  assert isinstance(error.value, FedpipeError)
  assert isinstance(error.value, ValueError)
  assert os.listdir(tmp_path) == []


def test_a_symlinked_output_dir_replaces_the_directory_it_points_to(tmp_path):
  target = tmp_path / 'target'
  write_client_data(target, _clients({'old': 2}), num_classes=4)
  (tmp_path / 'link').symlink_to(target)
  write_client_data(tmp_path / 'link', _clients({'new': 3}), num_classes=4)
  assert (tmp_path / 'link').is_symlink()
  assert client_store.client_counts(_store(target)) == {'train': {'new': 3}}
  assert sorted(os.listdir(tmp_path)) == ['link', 'target']

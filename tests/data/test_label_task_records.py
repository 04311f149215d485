"""Records of the label tasks 'binary' and 'regression', with and without example weights."""

import json

import numpy as np
import pytest
import tensorflow as tf

from fedpipe.data import client_store, example_records, record_schema
from fedpipe.data import manifest as manifest_lib
from fedpipe.data.client_data_writer import ClientDataError, write_client_data


def _parse(record, num_features, *, label_task='multiclass', weighted=False):
  description = {
    f.key: tf.io.FixedLenFeature(f.shape(num_features), tf.as_dtype(f.dtype))
    for f in record_schema.record_features(label_task=label_task, weighted=weighted)
  }
  return {k: v.numpy() for k, v in tf.io.parse_single_example(record, description).items()}


def test_record_format_says_what_records_hold():
  assert record_schema.record_format(3) == {
    'x': {'dtype': 'float32', 'shape': [3]},
    'y': {'dtype': 'int64', 'shape': []},
  }
  assert record_schema.record_format(3, label_task='binary', weighted=True) == {
    'x': {'dtype': 'float32', 'shape': [3]},
    'y': {'dtype': 'int64', 'shape': []},
    'w': {'dtype': 'float32', 'shape': []},
  }
  assert record_schema.record_format(3, label_task='regression')['y'] == {
    'dtype': 'float32',
    'shape': [],
  }
  with pytest.raises(record_schema.LabelTaskError, match="'ordinal'"):
    record_schema.record_format(3, label_task='ordinal')


def test_float_labels_and_weights_encode_as_tf_parses_them():
  encoder = example_records.ExampleEncoder(label_task='regression', weighted=True)
  parsed = _parse(encoder.encode([1.0, 2.0], 2.5, 0.25), 2, label_task='regression', weighted=True)
  assert parsed['x'].tolist() == [1.0, 2.0]
  assert parsed['y'] == np.float32(2.5) and parsed['w'] == np.float32(0.25)
  rows = encoder.encode_rows(np.ones((3, 2)), np.array([0.5, 1.5, -2.0]), np.array([1, 2, 3]))
  assert rows == [
    encoder.encode([1.0, 1.0], y, w) for y, w in ((0.5, 1.0), (1.5, 2.0), (-2.0, 3.0))
  ]
  with pytest.raises(ValueError, match='pass the example weight'):
    encoder.encode([1.0], 1.0)
  with pytest.raises(ValueError, match='weighted=True'):
    example_records.ExampleEncoder().encode([1.0], 1, 0.5)


def test_an_unweighted_multiclass_encoder_writes_what_it_wrote_before():
  # The v1 records: x then y, int64; encode_rows' framing path.
  encoder = example_records.ExampleEncoder()
  x, y = np.array([[0.5, -1.0], [2.0, 3.0]]), np.array([1, 7])
  expected = [
    tf.train.Example(
      features=tf.train.Features(
        feature={
          'x': tf.train.Feature(float_list=tf.train.FloatList(value=row)),
          'y': tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        }
      )
    ).SerializeToString()
    for row, label in zip(x.tolist(), y.tolist())
  ]
  assert encoder.encode_rows(x, y) == expected


def _legacy_manifest_json():
  return {
    'schema_version': 1,
    'record_format': {
      'x': {'dtype': 'float32', 'shape': [2]},
      'y': {'dtype': 'int64', 'shape': []},
    },
    'num_features': 2,
    'num_classes': 3,
    'feature_spec': {},
    'splits': {'train': {'clients': {'a': 3}, 'excluded_clients': {}}},
    'dead_letter': {},
  }


def test_an_old_manifest_is_multiclass_without_weights():
  manifest = manifest_lib.Manifest.from_json(_legacy_manifest_json())
  assert manifest.label_task == 'multiclass' and not manifest.weighted
  assert manifest.weight_column is None
  data = manifest.to_json()
  assert data['label_task'] == 'multiclass'
  assert data['record_format'] == _legacy_manifest_json()['record_format']
  assert manifest_lib.Manifest.from_json(data) == manifest


def test_a_manifest_records_the_task_and_the_weight():
  manifest = manifest_lib.Manifest(
    feature_spec={'weight': {'name': 'importance'}},
    splits={},
    num_features=4,
    num_classes=0,
    label_task='regression',
    weighted=True,
  )
  data = manifest.to_json()
  assert data['label_task'] == 'regression'
  assert data['record_format']['y'] == {'dtype': 'float32', 'shape': []}
  assert data['record_format']['w'] == {'dtype': 'float32', 'shape': []}
  again = manifest_lib.Manifest.from_json(json.loads(json.dumps(data)))
  assert again == manifest and again.weight_column == 'importance'
  with pytest.raises(manifest_lib.ManifestError, match="'label_task'.*re-run fedpipe-preprocess"):
    manifest_lib.Manifest.from_json({**data, 'label_task': 'ranking'}, source='m.json')


def test_write_client_data_of_binary_labels_with_weights(tmp_path):
  rng = np.random.default_rng(0)
  clients = {
    f'u{i}': (rng.normal(size=(4, 2)), np.array([0, 1, True, False]), rng.random(4))
    for i in range(3)
  }
  manifest = write_client_data(tmp_path / 'd', clients, label_task='binary')
  assert (manifest.label_task, manifest.weighted, manifest.num_classes) == ('binary', True, 2)
  assert manifest.feature_spec['label'] == {'name': 'y', 'task': 'binary'}
  assert manifest.feature_spec['weight'] == {'name': 'w'}
  records = list(client_store.read_client(str(tmp_path / 'd' / 'clients.sqlite'), 'train', 'u1'))
  parsed = [_parse(r, 2, label_task='binary', weighted=True) for r in records]
  assert [int(p['y']) for p in parsed] == [0, 1, 1, 0]
  np.testing.assert_allclose([p['w'] for p in parsed], clients['u1'][2], rtol=1e-6)


def test_write_client_data_of_regression_labels(tmp_path):
  clients = {'u0': ([[1.0], [2.0]], [0.5, -3.25]), 'u1': ([[3.0]], [7])}
  manifest = write_client_data(tmp_path / 'd', clients, clients, label_task='regression')
  assert (manifest.label_task, manifest.weighted, manifest.num_classes) == ('regression', False, 0)
  records = client_store.read_client(str(tmp_path / 'd' / 'clients.sqlite'), 'eval', 'u0')
  assert [float(_parse(r, 1, label_task='regression')['y']) for r in records] == [0.5, -3.25]


@pytest.mark.parametrize(
  'clients, kwargs, message',
  [
    ({'u0': ([[1.0]], [2])}, {'label_task': 'binary'}, 'not 0 or 1'),
    ({'u0': ([[1.0]], [np.nan])}, {'label_task': 'regression'}, 'finite numbers'),
    ({'u0': ([[1.0]], [1], [-1.0])}, {'label_task': 'binary'}, 'w must be finite'),
    ({'u0': ([[1.0]], [1], [1.0]), 'u1': ([[1.0]], [0])}, {'label_task': 'binary'}, 'for none'),
    ({'u0': ([[1.0]], [1])}, {'label_task': 'ranking'}, 'label_task must be'),
    ({'u0': ([[1.0]], [1])}, {'label_task': 'binary', 'num_classes': 3}, 'num_classes=3'),
    (
      {'u0': ([[1.0]], [1])},
      {'label_task': 'binary', 'feature_spec': {'label': {'name': 'y', 'task': 'regression'}}},
      'make them agree',
    ),
  ],
)
def test_write_client_data_refuses_bad_task_data(tmp_path, clients, kwargs, message):
  with pytest.raises(ClientDataError, match=message):
    write_client_data(tmp_path / 'd', clients, **kwargs)
  assert not (tmp_path / 'd').exists()

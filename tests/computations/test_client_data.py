"""Tests of fedpipe.computations.client_data: client datasets read from real TFRecord files."""

import os

import numpy as np
import pytest
import tensorflow as tf

from fedpipe.computations import client_data
from fedpipe.data import example_records, manifest

NUM_FEATURES = 3


def _write_client(directory, split, client_id, num_examples):
  """Writes `num_examples` examples in the manifest's format; returns (x, y)."""
  x = np.arange(num_examples * NUM_FEATURES, dtype=np.float32).reshape(num_examples, NUM_FEATURES)
  y = np.arange(num_examples, dtype=np.int64) % 5
  path = os.path.join(directory, manifest.client_file(split, client_id))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  encoder = example_records.ExampleEncoder()
  example_records.write_tfrecord_file(
    path, (encoder.encode(features, label) for features, label in zip(x.tolist(), y.tolist()))
  )
  return x, y


@pytest.fixture
def in_data_dir(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # Client files are read relative to the working directory.
  return tmp_path


def _batches(dataset):
  return [(b['x'].numpy(), b['y'].numpy()) for b in dataset]


@pytest.mark.parametrize('num_examples', [1, 7, 512, 1300])  # Around the parse chunk.
def test_reads_every_example_in_file_order_in_batches(in_data_dir, num_examples):
  x, y = _write_client(in_data_dir, 'train', 'c1', num_examples)
  dataset_fn = client_data.make_dataset_fn(
    split='train', num_features=NUM_FEATURES, batch_size=4, shuffle=False
  )

  batches = _batches(dataset_fn(tf.constant('c1')))

  assert [len(b[1]) for b in batches[:-1]] == [4] * (len(batches) - 1)
  np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), x)
  np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y)
  assert batches[0][0].dtype == np.float32 and batches[0][1].dtype == np.int64


def test_epochs_repeat_and_shuffle_keeps_every_example(in_data_dir):
  x, y = _write_client(in_data_dir, 'train', 'c1', 50)
  dataset_fn = client_data.make_dataset_fn(
    split='train', num_features=NUM_FEATURES, batch_size=8, epochs=2, shuffle=True
  )

  batches = _batches(dataset_fn(tf.constant('c1')))
  seen_y = np.concatenate([b[1] for b in batches])
  seen_x = np.concatenate([b[0] for b in batches])

  assert len(seen_y) == 100
  # Each example exactly twice, features still attached to their label.
  rows = sorted(map(tuple, np.concatenate([seen_x, seen_y[:, None]], axis=1)))
  expected = sorted(map(tuple, np.concatenate([x, y[:, None]], axis=1))) * 2
  assert rows == sorted(expected)
  assert not np.array_equal(seen_x[:50], x)  # 50! orders: shuffled.


def test_reads_the_eval_split_from_its_own_folder(in_data_dir):
  _write_client(in_data_dir, 'train', 'c1', 10)
  _, y_eval = _write_client(in_data_dir, 'eval', 'c1', 3)
  comp = client_data.build_dataset_computation(
    split='eval', num_features=NUM_FEATURES, batch_size=8, shuffle=False
  )
  # The type TFF checks compositions (evaluation) against: the model's input spec.
  assert str(comp.type_signature) == '(str -> <x=float32[?,3],y=int64[?]>*)'
  batches = _batches(
    client_data.make_dataset_fn(
      split='eval', num_features=NUM_FEATURES, batch_size=8, shuffle=False
    )(tf.constant('c1'))
  )
  np.testing.assert_array_equal(batches[0][1], y_eval)


def test_a_client_id_with_a_path_is_refused_before_any_read(in_data_dir):
  _write_client(in_data_dir, 'train', 'c1', 2)
  dataset_fn = client_data.make_dataset_fn(split='train', num_features=NUM_FEATURES, batch_size=2)
  with pytest.raises(tf.errors.InvalidArgumentError, match='invalid client id'):
    _batches(dataset_fn(tf.constant('../train/c1')))


def test_a_missing_client_file_names_the_file(in_data_dir):
  dataset_fn = client_data.make_dataset_fn(split='train', num_features=NUM_FEATURES, batch_size=2)
  with pytest.raises(tf.errors.NotFoundError, match='train/nobody.tfrecord'):
    _batches(dataset_fn(tf.constant('nobody')))


def test_a_record_of_the_wrong_width_fails_to_parse(in_data_dir):
  _write_client(in_data_dir, 'train', 'c1', 3)
  dataset_fn = client_data.make_dataset_fn(
    split='train', num_features=NUM_FEATURES + 1, batch_size=2
  )
  with pytest.raises(tf.errors.InvalidArgumentError, match='x'):
    _batches(dataset_fn(tf.constant('c1')))


@pytest.mark.parametrize(
  'kwargs, message',
  [
    ({'split': 'test'}, 'split must be one of'),
    ({'batch_size': 0}, 'must be >= 1'),
    ({'epochs': 0}, 'must be >= 1'),
  ],
)
def test_bad_arguments_say_which(kwargs, message):
  args = {'split': 'train', 'num_features': NUM_FEATURES, 'batch_size': 2, **kwargs}
  with pytest.raises(ValueError, match=message):
    client_data.make_dataset_fn(**args)

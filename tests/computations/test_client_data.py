"""Tests of fedpipe.computations.client_data: client datasets read from real files, both layouts."""

import numpy as np
import pytest
import tensorflow as tf

from fedpipe.computations import client_data
from fedpipe.data import client_store, manifest
from fedpipe.data.client_data_writer import write_client_data

NUM_FEATURES = 3
STORAGES = [manifest.STORAGE_SQLITE, manifest.STORAGE_TFRECORD_PER_CLIENT]
# Ids the id check refuses: a path, and SQL that would select every client.
HOSTILE_IDS = ['../train/c1', "a' OR '1'='1", "c1' --", 'c1;DROP TABLE records']


def _arrays(num_examples, offset=0):
  x = np.arange(num_examples * NUM_FEATURES, dtype=np.float32).reshape(num_examples, NUM_FEATURES)
  return x + offset, (np.arange(num_examples, dtype=np.int64) + offset) % 5


@pytest.fixture(params=STORAGES)
def storage(request):
  return request.param


@pytest.fixture
def write(tmp_path, monkeypatch, storage):
  """Writes clients with `write_client_data` in `storage`, then works in that directory."""

  def write(train, eval_=None):
    out = tmp_path / storage
    write_client_data(out, train, eval_, num_classes=5, storage=storage)
    monkeypatch.chdir(out)  # Client data is read relative to the working directory.
    return out

  return write


def _batches(dataset):
  return [(b['x'].numpy(), b['y'].numpy()) for b in dataset]


@pytest.mark.parametrize('num_examples', [1, 7, 512, 1300])  # Around the parse chunk.
def test_reads_every_example_in_file_order_in_batches(write, storage, num_examples):
  x, y = _arrays(num_examples)
  write({'c1': (x, y), 'c0': _arrays(2, 100), 'c2': _arrays(3, 200)})
  dataset_fn = client_data.make_dataset_fn(
    split='train', num_features=NUM_FEATURES, batch_size=4, shuffle=False, storage=storage
  )

  batches = _batches(dataset_fn(tf.constant('c1')))

  assert [len(b[1]) for b in batches[:-1]] == [4] * (len(batches) - 1)
  np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), x)
  np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y)
  assert batches[0][0].dtype == np.float32 and batches[0][1].dtype == np.int64


def test_epochs_repeat_and_shuffle_keeps_every_example(write, storage):
  x, y = _arrays(50)
  write({'c1': (x, y)})
  dataset_fn = client_data.make_dataset_fn(
    split='train', num_features=NUM_FEATURES, batch_size=8, epochs=2, storage=storage
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


def test_reads_the_eval_split_of_the_same_client_id(write, storage):
  _, y_eval = _arrays(3, 7)
  write({'c1': _arrays(10)}, {'c1': _arrays(3, 7)})
  comp = client_data.build_dataset_computation(
    split='eval', num_features=NUM_FEATURES, batch_size=8, shuffle=False, storage=storage
  )
  # The type TFF checks compositions (evaluation) against: the model's input spec.
  assert str(comp.type_signature) == '(str -> <x=float32[?,3],y=int64[?]>*)'
  batches = _batches(
    client_data.make_dataset_fn(
      split='eval', num_features=NUM_FEATURES, batch_size=8, shuffle=False, storage=storage
    )(tf.constant('c1'))
  )
  np.testing.assert_array_equal(batches[0][1], y_eval)


def test_both_layouts_give_byte_identical_batches(tmp_path, monkeypatch):
  rng = np.random.default_rng(5)
  train = {
    f'user-{i}': (rng.normal(size=(n, NUM_FEATURES)), rng.integers(0, 5, n))
    for i, n in enumerate([1, 4, 9, 600])
  }
  eval_ = {'e.1': (rng.normal(size=(5, NUM_FEATURES)), rng.integers(0, 5, 5))}
  batches = {}
  for storage in STORAGES:
    out = tmp_path / storage
    write_client_data(out, train, eval_, num_classes=5, storage=storage)
    monkeypatch.chdir(out)
    for split, ids in (('train', list(train)), ('eval', list(eval_))):
      dataset_fn = client_data.make_dataset_fn(
        split=split,
        num_features=NUM_FEATURES,
        batch_size=4,
        epochs=2,
        shuffle=False,
        storage=storage,
      )
      for client_id in ids:
        batches[storage, split, client_id] = [
          (b['x'].numpy().tobytes(), b['y'].numpy().tobytes())
          for b in dataset_fn(tf.constant(client_id))
        ]
  for (storage, split, client_id), value in batches.items():
    if storage == manifest.STORAGE_SQLITE:
      assert value == batches[manifest.STORAGE_TFRECORD_PER_CLIENT, split, client_id]
      assert value  # Nothing vacuous.


def test_sqlite_blobs_come_back_as_the_tfrecord_bytes(tmp_path, monkeypatch):
  train = {'c1': _arrays(20), 'c2': _arrays(3, 1)}
  write_client_data(tmp_path / 'old', train, storage=manifest.STORAGE_TFRECORD_PER_CLIENT)
  write_client_data(tmp_path / 'new', train)
  tfrecords = [
    r.numpy() for r in tf.data.TFRecordDataset(str(tmp_path / 'old' / 'train' / 'c1.tfrecord'))
  ]
  monkeypatch.chdir(tmp_path / 'new')
  before, after = client_store.client_query('train')
  query = tf.constant(before + 'c1' + after)

  read = [r.numpy() for r in client_data.read_store_records(query)]

  assert read == tfrecords and len(read) == 20
  assert all(isinstance(r, bytes) for r in read) and any(b'\0' in r for r in read)


@pytest.mark.parametrize('client_id', HOSTILE_IDS)
def test_a_hostile_client_id_is_refused_at_run_time_and_reads_nothing(write, storage, client_id):
  out = write({'c1': _arrays(2), 'a': _arrays(3)})
  if storage == manifest.STORAGE_SQLITE:
    # Any query would now fail with 'file is not a database': refusing with
    # the id error shows that no query ran.
    (out / manifest.STORE_FILENAME).write_bytes(b'not a database ' * 20)
  dataset_fn = client_data.make_dataset_fn(
    split='train', num_features=NUM_FEATURES, batch_size=2, storage=storage
  )
  # Traced in a graph too, the id is a run-time value: the check runs first there.
  in_graph = tf.function(lambda ids: dataset_fn(ids).reduce(np.int64(0), lambda n, _: n + 1))
  for run in (lambda: _batches(dataset_fn(tf.constant(client_id))), lambda: in_graph(client_id)):
    with pytest.raises(tf.errors.InvalidArgumentError, match='invalid client id') as error:
      run()
    assert 'not a database' not in str(error.value)
  if storage == manifest.STORAGE_SQLITE:
    with pytest.raises(tf.errors.InvalidArgumentError, match="not a database.*client_id = 'c1'"):
      _batches(dataset_fn(tf.constant('c1')))


@pytest.mark.parametrize('storage', [manifest.STORAGE_TFRECORD_PER_CLIENT])
def test_a_missing_client_file_names_the_file(write, storage):
  write({'c1': _arrays(2)})
  dataset_fn = client_data.make_dataset_fn(
    split='train', num_features=NUM_FEATURES, batch_size=2, storage=storage
  )
  with pytest.raises(tf.errors.NotFoundError, match='train/nobody.tfrecord'):
    _batches(dataset_fn(tf.constant('nobody')))


@pytest.mark.parametrize('storage', [manifest.STORAGE_SQLITE])
def test_an_id_without_rows_reads_as_an_empty_dataset(write, storage):
  write({'c1': _arrays(2)})
  dataset_fn = client_data.make_dataset_fn(
    split='train', num_features=NUM_FEATURES, batch_size=2, storage=storage
  )
  assert _batches(dataset_fn(tf.constant('nobody'))) == []
  assert _batches(dataset_fn(tf.constant('c1')))  # The same split has rows.


def test_a_record_of_the_wrong_width_fails_to_parse(write, storage):
  write({'c1': _arrays(3)})
  dataset_fn = client_data.make_dataset_fn(
    split='train', num_features=NUM_FEATURES + 1, batch_size=2, storage=storage
  )
  with pytest.raises(tf.errors.InvalidArgumentError, match='x'):
    _batches(dataset_fn(tf.constant('c1')))


def test_the_default_layout_is_the_per_client_one(tmp_path, monkeypatch):
  x, y = _arrays(3)
  write_client_data(tmp_path / 'd', {'c1': (x, y)}, storage=manifest.STORAGE_TFRECORD_PER_CLIENT)
  monkeypatch.chdir(tmp_path / 'd')
  dataset_fn = client_data.make_dataset_fn(
    split='train', num_features=NUM_FEATURES, batch_size=4, shuffle=False
  )
  (batch,) = _batches(dataset_fn(tf.constant('c1')))
  np.testing.assert_array_equal(batch[0], x)


@pytest.mark.parametrize(
  'kwargs, message',
  [
    ({'split': 'test'}, 'split must be one of'),
    ({'batch_size': 0}, 'must be >= 1'),
    ({'epochs': 0}, 'must be >= 1'),
    ({'storage': 'parquet'}, r"storage must be one of .*storage=manifest.storage\), got 'parquet'"),
  ],
)
def test_bad_arguments_say_which(kwargs, message):
  args = {'split': 'train', 'num_features': NUM_FEATURES, 'batch_size': 2, **kwargs}
  with pytest.raises(ValueError, match=message):
    client_data.make_dataset_fn(**args)


@pytest.mark.parametrize('storage', STORAGES)
def test_the_reader_passes_a_silos_review_in_both_layouts(storage):
  import tensorflow_federated as tff

  from fedpipe.governance import review
  from fedpipe.runtime import execution_context

  dataset_fn = client_data.make_dataset_fn(
    split='train', num_features=NUM_FEATURES, batch_size=2, storage=storage
  )

  @tff.tensorflow.computation(np.str_)
  def count(client_id):
    return dataset_fn(client_id).reduce(np.int64(0), lambda n, _: n + 1)

  @tff.federated_computation(tff.FederatedType(np.str_, tff.CLIENTS))
  def total(client_ids):
    return tff.federated_sum(tff.federated_map(count, client_ids))

  described = review.describe(execution_context.wire_computation(total))
  assert described.problems == ()
  reader = 'SqlDataset' if storage == manifest.STORAGE_SQLITE else 'TFRecordDataset'
  assert reader in described.to_json()['io_ops']

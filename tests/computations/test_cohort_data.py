"""Tests of fedpipe.computations.cohort_data: a cohort's padded batches read by client id.

The computations run in the session's isolated TFF worker, which reads the
client data relative to its working directory, as at a silo, in both layouts
(`clients.sqlite` and one TFRecord file per client); the per-client engine
they are compared with reads the same data.
"""

import functools
import os
import shutil

import grpc
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from fedpipe.computations import client_data, cohort_data, cohort_training
from fedpipe.data import client_data_writer, manifest

_BATCH_FIELDS = cohort_data.CohortBatches._fields

NUM_FEATURES = 3
BATCH_SIZE = 4
# Skewed sizes: less than a batch, a partial batch, several batches.
SIZES = {'cohort-a': 1, 'cohort-b': 3, 'cohort-c': 17}
COHORT = ['cohort-c', 'cohort-a', 'cohort-b']
STORAGES = [manifest.STORAGE_SQLITE, manifest.STORAGE_TFRECORD_PER_CLIENT]


@pytest.fixture(scope='module')
def clients(worker_dir, tmp_path_factory):
  """The clients' (x, y), written by `write_client_data` and put where the worker reads them."""
  rng = np.random.default_rng(11)
  data = {
    client_id: (
      rng.normal(size=(n, NUM_FEATURES)).astype(np.float32),
      rng.integers(0, 5, size=n).astype(np.int64),
    )
    for client_id, n in SIZES.items()
  }
  root = tmp_path_factory.mktemp('cohort')
  for storage in STORAGES:
    client_data_writer.write_client_data(root / storage, data, num_classes=5, storage=storage)
  # The worker's directory holds other tests' per-client files: copy in these
  # clients' files, and the SQLite file (which only this module writes there).
  legacy = root / manifest.STORAGE_TFRECORD_PER_CLIENT
  os.makedirs(os.path.join(worker_dir, manifest.TRAIN_SPLIT), exist_ok=True)
  for client_id in SIZES:
    relative = manifest.client_file(manifest.TRAIN_SPLIT, client_id)
    shutil.copy(os.path.join(legacy, relative), os.path.join(worker_dir, relative))
  store = root / manifest.STORAGE_SQLITE / manifest.STORE_FILENAME
  shutil.copy(store, os.path.join(worker_dir, manifest.STORE_FILENAME))
  return data


@functools.cache
def _computation(epochs: int, shuffle: bool, storage: str) -> tff.Computation:
  cohort_fn = cohort_data.make_cohort_fn(
    split=manifest.TRAIN_SPLIT,
    num_features=NUM_FEATURES,
    batch_size=BATCH_SIZE,
    epochs=epochs,
    shuffle=shuffle,
    storage=storage,
  )

  @tff.tensorflow.computation(tff.TensorType(np.str_, [None]))
  def cohort(client_ids):
    return cohort_fn(client_ids)

  return cohort


def _per_client_batches(worker_dir, client_id, epochs, storage):
  """The per-client engine's (x, y) batches of a client, unshuffled."""
  dataset_fn = client_data.make_dataset_fn(
    split=manifest.TRAIN_SPLIT,
    num_features=NUM_FEATURES,
    batch_size=BATCH_SIZE,
    epochs=epochs,
    shuffle=False,
    storage=storage,
  )
  cwd = os.getcwd()
  os.chdir(worker_dir)  # Read as the worker reads: relative to its directory.
  try:
    return [(b['x'].numpy(), b['y'].numpy()) for b in dataset_fn(tf.constant(client_id))]
  finally:
    os.chdir(cwd)


@pytest.mark.usefixtures('tff_worker')
@pytest.mark.parametrize('storage', STORAGES)
@pytest.mark.parametrize('epochs', [1, 3])
def test_unshuffled_cohort_holds_the_per_client_engines_batches(
  clients, worker_dir, epochs, storage
):
  result = _computation(epochs, False, storage)(COHORT)

  per_client = [_per_client_batches(worker_dir, c, epochs, storage) for c in COHORT]
  steps = max(len(batches) for batches in per_client)
  assert steps == -(-max(SIZES.values()) * epochs // BATCH_SIZE)
  assert result.x.shape == (len(COHORT), steps, BATCH_SIZE, NUM_FEATURES)
  assert result.x.dtype == np.float32 and result.y.dtype == np.int64
  assert result.mask.dtype == np.float32
  assert result.y.shape == result.mask.shape == (len(COHORT), steps, BATCH_SIZE)
  np.testing.assert_array_equal(result.num_examples, [SIZES[c] * epochs for c in COHORT])
  for k, batches in enumerate(per_client):
    expected_x = np.zeros((steps, BATCH_SIZE, NUM_FEATURES), np.float32)
    expected_y = np.zeros((steps, BATCH_SIZE), np.int64)
    expected_mask = np.zeros((steps, BATCH_SIZE), np.float32)
    for s, (x, y) in enumerate(batches):
      expected_x[s, : len(y)], expected_y[s, : len(y)], expected_mask[s, : len(y)] = x, y, 1.0
    np.testing.assert_array_equal(result.x[k], expected_x)
    np.testing.assert_array_equal(result.y[k], expected_y)
    np.testing.assert_array_equal(result.mask[k], expected_mask)

  # And what `stack_cohort` builds from the same arrays in NumPy.
  stacked = cohort_training.stack_cohort(
    [clients[c] for c in COHORT], batch_size=BATCH_SIZE, epochs=epochs
  )
  for name in ('x', 'y', 'mask', 'num_examples'):
    np.testing.assert_array_equal(getattr(result, name), getattr(stacked, name))


@pytest.mark.usefixtures('tff_worker')
@pytest.mark.parametrize(
  'cohort', [COHORT, ['cohort-b', 'cohort-c', 'cohort-b', 'cohort-a'], ['cohort-a']]
)
def test_both_layouts_give_byte_identical_cohorts_in_the_ids_order(clients, cohort):
  del clients
  results = [_computation(2, False, storage)(cohort) for storage in STORAGES]
  for name in _BATCH_FIELDS:
    sqlite, legacy = (getattr(r, name) for r in results)
    assert sqlite.dtype == legacy.dtype and sqlite.shape == legacy.shape
    assert sqlite.tobytes() == legacy.tobytes(), name
  # An id given twice gets its records twice (as reading its file twice does).
  expected = [SIZES[c] * 2 for c in cohort]
  np.testing.assert_array_equal(results[0].num_examples, expected)


@pytest.mark.usefixtures('tff_worker')
@pytest.mark.parametrize('storage', STORAGES)
def test_shuffled_cohort_permutes_each_epoch_afresh(clients, storage):
  epochs = 3
  computation = _computation(epochs, True, storage)
  assert str(computation.type_signature) == (
    '(str[?] -> <x=float32[?,?,4,3],y=int64[?,?,4],mask=float32[?,?,4],num_examples=int64[?]>)'
  )

  result = computation(COHORT)

  orders = []
  for k, client_id in enumerate(COHORT):
    x, y = clients[client_id]
    n = SIZES[client_id]
    mask = result.mask[k].reshape(-1)
    # Real slots first, then padding only: batches span epochs.
    np.testing.assert_array_equal(mask, np.arange(mask.size) < n * epochs)
    seen_x = result.x[k].reshape(-1, NUM_FEATURES)[: n * epochs]
    seen_y = result.y[k].reshape(-1)[: n * epochs]
    assert not result.x[k].reshape(-1, NUM_FEATURES)[n * epochs :].any()
    for e in range(epochs):
      # Each epoch is a permutation of the client's examples, labels still attached.
      epoch_x, epoch_y = seen_x[e * n : (e + 1) * n], seen_y[e * n : (e + 1) * n]
      order = np.array([np.flatnonzero((x == row).all(axis=1))[0] for row in epoch_x])
      np.testing.assert_array_equal(np.sort(order), np.arange(n))
      np.testing.assert_array_equal(epoch_y, y[order])
      orders.append((client_id, e, tuple(order)))
  big = [order for client_id, _, order in orders if client_id == 'cohort-c']
  assert len(set(big)) == epochs  # 17! orders: a fresh one each epoch.
  assert tuple(range(17)) not in big

  again = computation(COHORT)
  assert not np.array_equal(again.x, result.x)  # A new draw per run.


@pytest.mark.usefixtures('tff_worker')
@pytest.mark.parametrize('storage', STORAGES)
@pytest.mark.parametrize(
  'bad_id, shown',
  [
    ('../train/cohort-b', r'\.\./train/cohort-b'),
    ("a' OR '1'='1", r"a\\' OR \\'1\\'=\\'1"),  # Quotes escaped in the message.
  ],
)
def test_an_id_with_a_path_or_a_quote_fails_with_the_id_pattern_error(
  clients, storage, bad_id, shown
):
  del clients
  # Refused at the worker by the id pattern check, naming only the bad id.
  with pytest.raises(grpc.RpcError, match=rf'invalid client id:\] \[{shown}\]'):
    _computation(1, False, storage)(['cohort-a', bad_id])


@pytest.mark.parametrize('bad_id', ["a' OR '1'='1", "x') OR 1=1 --", '../clients'])
def test_a_hostile_id_is_refused_before_any_query(clients, tmp_path, monkeypatch, bad_id):
  client_data_writer.write_client_data(tmp_path / 'd', clients, num_classes=5)
  # Any query would now fail with 'file is not a database': refusing with the
  # id error shows that no query ran.
  (tmp_path / 'd' / manifest.STORE_FILENAME).write_bytes(b'not a database ' * 20)
  monkeypatch.chdir(tmp_path / 'd')
  cohort_fn = cohort_data.make_cohort_fn(
    split=manifest.TRAIN_SPLIT,
    num_features=NUM_FEATURES,
    batch_size=BATCH_SIZE,
    storage=manifest.STORAGE_SQLITE,
  )
  traced = tf.function(cohort_fn)
  for run in (cohort_fn, traced):
    with pytest.raises(tf.errors.InvalidArgumentError, match='invalid client id') as error:
      run(tf.constant(['cohort-a', bad_id]))
    assert 'not a database' not in str(error.value)
  with pytest.raises(tf.errors.InvalidArgumentError, match='not a database'):
    cohort_fn(tf.constant(['cohort-a']))


@pytest.fixture
def in_worker_dir(clients, worker_dir, monkeypatch):
  monkeypatch.chdir(worker_dir)
  return clients


@pytest.mark.parametrize('storage', STORAGES)
def test_a_statically_known_cohort_keeps_its_size_and_runs_eagerly(in_worker_dir, storage):
  cohort_fn = cohort_data.make_cohort_fn(
    split=manifest.TRAIN_SPLIT,
    num_features=NUM_FEATURES,
    batch_size=BATCH_SIZE,
    shuffle=False,
    storage=storage,
  )
  traced = tf.function(cohort_fn).get_concrete_function(tf.TensorSpec([2], tf.string))
  assert traced.structured_outputs.x.shape.as_list() == [2, None, BATCH_SIZE, NUM_FEATURES]

  result = cohort_fn(tf.constant(['cohort-b']))

  x, y = in_worker_dir['cohort-b']
  np.testing.assert_array_equal(result.x[0, 0, :3], x)
  np.testing.assert_array_equal(result.y[0, 0, :3], y)
  np.testing.assert_array_equal(result.mask, [[[1, 1, 1, 0]]])


def test_a_missing_client_file_names_the_file(in_worker_dir):
  cohort_fn = cohort_data.make_cohort_fn(
    split=manifest.TRAIN_SPLIT,
    num_features=NUM_FEATURES,
    batch_size=BATCH_SIZE,
    storage=manifest.STORAGE_TFRECORD_PER_CLIENT,
  )
  with pytest.raises(tf.errors.NotFoundError, match='train/nobody.tfrecord'):
    cohort_fn(tf.constant(['cohort-a', 'nobody']))


def test_an_id_without_rows_in_the_sqlite_file_is_named(in_worker_dir):
  sqlite = manifest.STORAGE_SQLITE
  cohort_fn = cohort_data.make_cohort_fn(
    split=manifest.TRAIN_SPLIT, num_features=NUM_FEATURES, batch_size=BATCH_SIZE, storage=sqlite
  )
  with pytest.raises(
    tf.errors.InvalidArgumentError,
    match=r'(?s)no records in clients.sqlite \(split train\).*nobody',
  ):
    cohort_fn(tf.constant(['cohort-a', 'nobody']))
  # The eval split is another set of clients: none of these.
  eval_fn = cohort_data.make_cohort_fn(
    split=manifest.EVAL_SPLIT, num_features=NUM_FEATURES, batch_size=BATCH_SIZE, storage=sqlite
  )
  with pytest.raises(tf.errors.InvalidArgumentError, match='no records'):
    eval_fn(tf.constant(['cohort-a']))


def test_a_large_cohort_is_one_query_in_the_ids_order(tmp_path, monkeypatch):
  # 3,000 ids of 128 characters: a query of about 400 kB.
  ids = [f'{i:04d}'.ljust(128, 'x') for i in range(3000)]
  rng = np.random.default_rng(2)
  sizes = rng.integers(1, 4, size=len(ids))
  data = {
    c: (np.full((n, NUM_FEATURES), i, np.float32), np.arange(n) % 5)
    for i, (c, n) in enumerate(zip(ids, sizes))
  }
  client_data_writer.write_client_data(tmp_path / 'd', data, num_classes=5)
  monkeypatch.chdir(tmp_path / 'd')
  order = rng.permutation(len(ids))
  cohort_fn = cohort_data.make_cohort_fn(
    split=manifest.TRAIN_SPLIT,
    num_features=NUM_FEATURES,
    batch_size=BATCH_SIZE,
    shuffle=False,
    storage=manifest.STORAGE_SQLITE,
  )

  result = cohort_fn(tf.constant([ids[k] for k in order]))

  np.testing.assert_array_equal(result.num_examples, sizes[order])
  # Client k's examples are those of the k-th id given.
  np.testing.assert_array_equal(result.x[:, 0, 0, 0], order.astype(np.float32))


@pytest.mark.parametrize(
  'kwargs, message',
  [
    ({'split': 'test'}, 'split must be one of'),
    ({'batch_size': 0}, 'batch_size must be a positive integer'),
    ({'epochs': 1.5}, 'epochs must be a positive integer'),
    ({'num_features': True}, 'num_features must be a positive integer'),
    ({'storage': 'csv'}, r"storage must be one of .*got 'csv'"),
  ],
)
def test_bad_arguments_say_which(kwargs, message):
  args = {'split': 'train', 'num_features': NUM_FEATURES, 'batch_size': 2, **kwargs}
  with pytest.raises(cohort_data.CohortDataError, match=message):
    cohort_data.make_cohort_fn(**args)


@pytest.mark.parametrize(
  'ids, message',
  [(tf.constant([['a']]), '1-D string tensor'), (tf.constant([], tf.string), 'empty')],
)
def test_ids_that_are_not_one_cohort_are_refused(ids, message):
  cohort_fn = cohort_data.make_cohort_fn(split='train', num_features=NUM_FEATURES, batch_size=2)
  with pytest.raises(cohort_data.CohortDataError, match=message):
    cohort_fn(ids)

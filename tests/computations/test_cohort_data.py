"""Tests of fedpipe.computations.cohort_data: a cohort's padded batches read by client id.

The computations run in the session's isolated TFF worker, which reads the
client files relative to its working directory, as at a silo; the
per-client engine they are compared with reads the same files.
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

NUM_FEATURES = 3
BATCH_SIZE = 4
# Skewed sizes: less than a batch, a partial batch, several batches.
SIZES = {'cohort-a': 1, 'cohort-b': 3, 'cohort-c': 17}
COHORT = ['cohort-c', 'cohort-a', 'cohort-b']


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
  written = tmp_path_factory.mktemp('cohort') / 'clients'
  client_data_writer.write_client_data(written, data, num_classes=5)
  # The worker's directory holds other tests' clients: copy in this split's files.
  os.makedirs(os.path.join(worker_dir, manifest.TRAIN_SPLIT), exist_ok=True)
  for client_id in SIZES:
    relative = manifest.client_file(manifest.TRAIN_SPLIT, client_id)
    shutil.copy(os.path.join(written, relative), os.path.join(worker_dir, relative))
  return data


@functools.cache
def _computation(epochs: int, shuffle: bool) -> tff.Computation:
  cohort_fn = cohort_data.make_cohort_fn(
    split=manifest.TRAIN_SPLIT,
    num_features=NUM_FEATURES,
    batch_size=BATCH_SIZE,
    epochs=epochs,
    shuffle=shuffle,
  )

  @tff.tensorflow.computation(tff.TensorType(np.str_, [None]))
  def cohort(client_ids):
    return cohort_fn(client_ids)

  return cohort


def _per_client_batches(worker_dir, client_id, epochs):
  """The per-client engine's (x, y) batches of a client, unshuffled."""
  dataset_fn = client_data.make_dataset_fn(
    split=manifest.TRAIN_SPLIT,
    num_features=NUM_FEATURES,
    batch_size=BATCH_SIZE,
    epochs=epochs,
    shuffle=False,
  )
  cwd = os.getcwd()
  os.chdir(worker_dir)  # Read as the worker reads: relative to its directory.
  try:
    return [(b['x'].numpy(), b['y'].numpy()) for b in dataset_fn(tf.constant(client_id))]
  finally:
    os.chdir(cwd)


@pytest.mark.usefixtures('tff_worker')
@pytest.mark.parametrize('epochs', [1, 3])
def test_unshuffled_cohort_holds_the_per_client_engines_batches(clients, worker_dir, epochs):
  result = _computation(epochs, False)(COHORT)

  per_client = [_per_client_batches(worker_dir, c, epochs) for c in COHORT]
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
def test_shuffled_cohort_permutes_each_epoch_afresh(clients):
  epochs = 3
  computation = _computation(epochs, True)
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
def test_an_id_with_a_path_fails_with_the_id_pattern_error(clients):
  del clients
  # Refused at the worker by the id pattern check, naming only the bad id.
  with pytest.raises(grpc.RpcError, match=r'invalid client id:\] \[\.\./train/cohort-b\]'):
    _computation(1, False)(['cohort-a', '../train/cohort-b'])


@pytest.fixture
def in_worker_dir(clients, worker_dir, monkeypatch):
  monkeypatch.chdir(worker_dir)
  return clients


def test_a_statically_known_cohort_keeps_its_size_and_runs_eagerly(in_worker_dir):
  cohort_fn = cohort_data.make_cohort_fn(
    split=manifest.TRAIN_SPLIT, num_features=NUM_FEATURES, batch_size=BATCH_SIZE, shuffle=False
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
    split=manifest.TRAIN_SPLIT, num_features=NUM_FEATURES, batch_size=BATCH_SIZE
  )
  with pytest.raises(tf.errors.NotFoundError, match='train/nobody.tfrecord'):
    cohort_fn(tf.constant(['cohort-a', 'nobody']))


@pytest.mark.parametrize(
  'kwargs, message',
  [
    ({'split': 'test'}, 'split must be one of'),
    ({'batch_size': 0}, 'batch_size must be a positive integer'),
    ({'epochs': 1.5}, 'epochs must be a positive integer'),
    ({'num_features': True}, 'num_features must be a positive integer'),
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

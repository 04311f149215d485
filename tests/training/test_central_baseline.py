"""The centralized reference pools real client-data directories and trains the same model on them."""

import functools

import numpy as np
import pytest

from fedpipe.computations import keras_model
from fedpipe.data import client_data_writer, manifest
from fedpipe.training import central_baseline


def _silo(rng, prefix, *, label_task, n_clients=20, storage=manifest.STORAGE_SQLITE):
  def client():
    x = rng.normal(size=(12, 4))
    score = x[:, 0] - x[:, 1]
    y = (score > 0).astype(np.int64) if label_task == 'binary' else 2.0 * score
    return x, y

  train = {f'{prefix}{i}': client() for i in range(n_clients)}
  evaluation = {f'{prefix}e{i}': client() for i in range(n_clients // 2)}
  return train, evaluation, storage


@pytest.mark.parametrize('label_task', ['binary', 'regression'])
def test_pools_every_silos_records_and_learns_the_signal(tmp_path, label_task):
  rng = np.random.default_rng(0)
  dirs = []
  # One directory in each storage layout: both are read.
  for name, storage in (
    ('a', manifest.STORAGE_SQLITE),
    ('b', manifest.STORAGE_TFRECORD_PER_CLIENT),
  ):
    train, evaluation, storage = _silo(rng, name, label_task=label_task, storage=storage)
    client_data_writer.write_client_data(
      tmp_path / name, train, evaluation, storage=storage, label_task=label_task
    )
    dirs.append(str(tmp_path / name))
  pooled = central_baseline.read_pooled_split(dirs, manifest.TRAIN_SPLIT)
  assert pooled['x'].shape == (2 * 20 * 12, 4)
  builder = functools.partial(
    keras_model.build_mlp,
    num_features=4,
    num_classes=2,
    hidden_units=(8,),
    num_outputs=1,
  )
  result = central_baseline.train_central(dirs, builder, epochs=30, learning_rate=0.01)
  assert result.train_examples == 480 and result.eval_examples == 240
  if label_task == 'binary':
    assert result.metrics['accuracy'] > 0.9 and result.metrics['auc'] > 0.95
  else:
    assert result.metrics['rmse'] < 0.5  # The labels' own spread is about 2.8.


def test_directories_of_different_record_formats_are_refused_naming_them(tmp_path):
  rng = np.random.default_rng(1)
  for name, task in (('a', 'binary'), ('b', 'regression')):
    train, evaluation, _ = _silo(rng, name, label_task=task)
    client_data_writer.write_client_data(tmp_path / name, train, evaluation, label_task=task)
  with pytest.raises(central_baseline.CentralBaselineError, match='different record formats'):
    central_baseline.read_pooled_split([str(tmp_path / 'a'), str(tmp_path / 'b')], 'train')

"""The cohort engine's round and evaluation equal the per-client engine's for binary and regression.

Both engines read the same records where the worker runs (int64 labels for
'binary', float32 for 'regression'), from the same model built for the label
task; with the DP noise off a round gives the same server model and the
same finalized training metrics (AUC and accuracy, or MAE and RMSE, with the
loss), and evaluation the same metrics.
"""

import os

import numpy as np
import pytest
import tensorflow_federated as tff

from fedpipe.computations import (
  client_data,
  cohort_data,
  cohort_evaluation,
  cohort_fedavg,
  dp_fedavg,
  evaluation,
  keras_model,
)
from fedpipe.data import example_records, manifest

pytestmark = pytest.mark.usefixtures('tff_worker')

NUM_FEATURES = 5
BATCH_SIZE = 4
TASKS = ('binary', 'regression')
# Skewed, partial last batches included.
CLIENT_SIZES = {'a': 1, 'b': 3, 'c': 6, 'd': 9, 'e': 14, 'f': 30}


def _ids(task):
  return [f'{task[:3]}-{c}' for c in sorted(CLIENT_SIZES)]


def _sizes(task):
  return {f'{task[:3]}-{c}': n for c, n in CLIENT_SIZES.items()}


@pytest.fixture(scope='module')
def task_records(worker_dir):
  rng = np.random.default_rng(13)
  for task in TASKS:
    encoder = example_records.ExampleEncoder(label_task=task)
    for split in (manifest.TRAIN_SPLIT, manifest.EVAL_SPLIT):
      for client_id, n in _sizes(task).items():
        x = rng.normal(size=(n, NUM_FEATURES)).astype(np.float32)
        if task == 'binary':
          y = (x[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(np.int64)
        else:
          y = (x[:, 0] - x[:, 1] + 0.3 * rng.normal(size=n)).astype(np.float32)
        path = os.path.join(worker_dir, manifest.client_file(split, client_id))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        example_records.write_tfrecord_file(path, encoder.encode_rows(x, y))
  return True


def _builder():
  return keras_model.build_mlp(
    num_features=NUM_FEATURES, num_classes=2, hidden_units=(8,), seed=3, num_outputs=1
  )


def _data(task, split, **kwargs):
  return dict(
    split=split,
    num_features=NUM_FEATURES,
    storage=manifest.STORAGE_TFRECORD_PER_CLIENT,  # The files written above.
    label_task=task,
    shuffle=False,
    **kwargs,
  )


def _assert_same_metrics(actual, expected):
  assert sorted(actual) == sorted(expected)
  for name in expected:
    assert float(actual[name]) == pytest.approx(float(expected[name]), rel=1e-5), name


@pytest.mark.parametrize('task', TASKS)
def test_a_cohort_round_equals_a_per_client_round(task_records, task):
  model_fn = keras_model.build_model_fn(_builder, num_features=NUM_FEATURES, label_task=task)
  server = tff.learning.optimizers.build_sgdm(learning_rate=1.0, momentum=0.9)
  dp = dict(
    noise_multiplier=0.0,
    clip_norm=0.3,  # Binds for some users.
    weight_cap=8.0,
    expected_total_weight=4.0,
    expected_clients_per_round=float(len(CLIENT_SIZES)),
  )
  data = _data(task, manifest.TRAIN_SPLIT, batch_size=BATCH_SIZE, epochs=2)
  per_client = dp_fedavg.build_dp_fedavg_process(
    model_fn,
    **dp,
    client_optimizer=tff.learning.optimizers.build_sgdm(learning_rate=0.2),
    server_optimizer=server,
    dataset_fn=client_data.make_dataset_fn(**data),
  )
  cohort = cohort_fedavg.build_cohort_dp_fedavg_process(
    model_fn,
    _builder,
    num_features=NUM_FEATURES,
    aggregator=dp_fedavg.build_dp_aggregator(**dp),
    cohort_fn=cohort_data.make_cohort_fn(**data),
    client_learning_rate=0.2,
    server_optimizer=server,
    label_task=task,
  )
  expected = per_client.next(per_client.initialize(), _ids(task))
  cohorts = cohort_fedavg.group_into_cohorts(_ids(task), _sizes(task), max_cohort_size=4)
  assert len(cohorts) == 2
  actual = cohort.next(cohort.initialize(), cohorts)

  for a, e in zip(
    cohort.get_model_weights(actual.state).trainable,
    per_client.get_model_weights(expected.state).trainable,
  ):
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)
  train = actual.metrics['client_work']['train']
  _assert_same_metrics(train, expected.metrics['client_work']['train'])
  assert train['num_examples'] == 2 * sum(CLIENT_SIZES.values())
  names = {'binary': ('auc', 'accuracy'), 'regression': ('mae', 'rmse')}[task]
  assert all(name in train for name in names) and 'loss' in train


@pytest.mark.parametrize('task', TASKS)
def test_cohort_evaluation_equals_per_client_evaluation(task_records, task):
  model_fn = keras_model.build_model_fn(_builder, num_features=NUM_FEATURES, label_task=task)
  data = _data(task, manifest.EVAL_SPLIT, batch_size=BATCH_SIZE)
  per_client = evaluation.build_federated_evaluation(
    model_fn, dataset_computation=client_data.build_dataset_computation(**data)
  )
  cohort = cohort_evaluation.build_cohort_evaluation(
    model_fn,
    _builder,
    num_features=NUM_FEATURES,
    cohort_fn=cohort_data.make_cohort_fn(**data),
    label_task=task,
  )
  # Weights away from the initial ones, so that the metrics are not trivial.
  rng = np.random.default_rng(0)
  weights = per_client.get_model_weights(per_client.initialize())
  weights = weights._replace(
    trainable=[
      (w + rng.normal(scale=0.5, size=np.shape(w))).astype(np.float32) for w in weights.trainable
    ]
  )

  def evaluate(process, clients):
    state = process.set_model_weights(process.initialize(), weights)
    return evaluation.metrics_of(process.next(state, clients))

  expected = evaluate(per_client, _ids(task))
  for size in (1, len(CLIENT_SIZES)):
    cohorts = cohort_fedavg.group_into_cohorts(_ids(task), _sizes(task), max_cohort_size=size)
    _assert_same_metrics(evaluate(cohort, cohorts), expected)
  if task == 'binary':
    assert 0.0 < expected['auc'] < 1.0 and 0.0 < expected['accuracy'] < 1.0


def test_a_model_fn_of_another_label_task_is_refused(task_records):
  model_fn = keras_model.build_model_fn(_builder, num_features=NUM_FEATURES, label_task='binary')
  with pytest.raises(cohort_fedavg.CohortProcessError, match=r"\['auc', 'accuracy'\].*'regr"):
    cohort_evaluation.build_cohort_evaluation(
      model_fn,
      _builder,
      num_features=NUM_FEATURES,
      cohort_fn=cohort_data.make_cohort_fn(
        **_data('regression', manifest.EVAL_SPLIT, batch_size=BATCH_SIZE)
      ),
      label_task='regression',
    )

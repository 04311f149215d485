"""Which engine `build_experiment` trains with: `runtime.engine=auto` picks the cohort engine where it runs."""

import logging
import os

import pytest
import tensorflow as tf

from fedpipe.computations import cohort_training
from fedpipe.config import base, validation
from fedpipe.data import manifest as manifest_lib
from fedpipe.training import experiment as experiment_lib

NUM_FEATURES = 6
NUM_CLASSES = 3


def _manifest():
  def split(prefix, n):
    return manifest_lib.SplitManifest(clients={f'{prefix}{i}': 3 + i % 5 for i in range(n)})

  return manifest_lib.Manifest(
    feature_spec={},
    splits={manifest_lib.TRAIN_SPLIT: split('u', 40), manifest_lib.EVAL_SPLIT: split('e', 10)},
    num_features=NUM_FEATURES,
    num_classes=NUM_CLASSES,
  )


def _config(**overrides):
  config = base.get_default_config()
  config.training.clients_per_round = 10
  config.training.rounds = 3
  validation.apply_overrides(config, overrides)
  validation.validate(config)
  return config


def _lines(caplog, level):
  return [
    r.getMessage()
    for r in caplog.records
    if r.name == experiment_lib.__name__ and r.levelno >= level
  ]


def _batch_norm_model():
  return tf.keras.Sequential(
    [
      tf.keras.Input(shape=(NUM_FEATURES,)),
      tf.keras.layers.Dense(8),
      tf.keras.layers.BatchNormalization(name='the_batch_norm'),
      tf.keras.layers.Dense(NUM_CLASSES),
    ]
  )


def test_auto_trains_local_dp_fedavg_as_cohorts(caplog):
  with caplog.at_level(logging.INFO, logger=experiment_lib.__name__):
    experiment = experiment_lib.build_experiment(_config(), _manifest())
  assert experiment.engine == 'cohort'
  assert not _lines(caplog, logging.WARNING)
  # A round's users become cohorts, one per core at least; the evaluation users too.
  for group, users in (
    (experiment.round_input, [f'u{i}' for i in range(12)]),
    (experiment.eval_input, experiment.eval_client_ids),
  ):
    cohorts = group(users)
    assert sorted(','.join(cohorts).split(',')) == sorted(users)
    assert len(cohorts) == min(os.cpu_count(), len(users))


def test_auto_falls_back_to_the_per_client_engine_with_one_line_saying_why(caplog):
  with caplog.at_level(logging.INFO, logger=experiment_lib.__name__):
    experiment = experiment_lib.build_experiment(
      _config(), _manifest(), keras_model_builder=_batch_norm_model
    )
  assert experiment.engine == 'per_client'
  assert experiment.round_input(['u1', 'u2']) == ['u1', 'u2']
  warnings = _lines(caplog, logging.WARNING)
  assert len(warnings) == 1, warnings
  assert 'per-client engine' in warnings[0] and 'the_batch_norm' in warnings[0]

  caplog.clear()
  with caplog.at_level(logging.INFO, logger=experiment_lib.__name__):
    experiment = experiment_lib.build_experiment(_config(dp__enabled=False), _manifest())
  assert experiment.engine == 'per_client'
  (line,) = _lines(caplog, logging.INFO)
  assert 'dp.enabled is False; the cohort engine needs True' in line


def test_an_explicit_cohort_engine_names_the_layer_it_cannot_vectorize():
  with pytest.raises(cohort_training.CohortNotVectorizableError, match='the_batch_norm'):
    experiment_lib.build_experiment(
      _config(runtime__engine='cohort'), _manifest(), keras_model_builder=_batch_norm_model
    )

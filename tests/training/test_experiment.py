"""Which engine `build_experiment` trains with: `runtime.engine=auto` picks the cohort engine where it runs."""

import logging
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from fedpipe.computations import cohort_training
from fedpipe.config import base, validation
from fedpipe.data import manifest as manifest_lib
from fedpipe.runtime import execution_context
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


def _silos_manifest():
  """Users of two silos ('silo-a/u0', ...), as the coordinator's union of their manifests."""

  def split(prefix, n):
    return manifest_lib.SplitManifest(
      clients={f'silo-{s}/{prefix}{i}': 3 + i % 5 for s in 'ab' for i in range(n)}
    )

  return manifest_lib.Manifest(
    feature_spec={},
    splits={manifest_lib.TRAIN_SPLIT: split('u', 20), manifest_lib.EVAL_SPLIT: split('e', 5)},
    num_features=NUM_FEATURES,
    num_classes=NUM_CLASSES,
  )


def _silos_config(**overrides):
  return _config(
    runtime__mode='silos',
    runtime__silos='silo-a=127.0.0.1:1,silo-b=127.0.0.1:2',
    runtime__tls_ca='ca.pem',
    runtime__tls_cert='c.pem',
    runtime__tls_key='k.pem',
    **overrides,
  )


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


def test_auto_trains_dp_fedavg_across_silos_as_cohorts_of_one_silo_each(caplog):
  manifest = _silos_manifest()
  config = _silos_config()
  with caplog.at_level(logging.INFO, logger=experiment_lib.__name__):
    experiment = experiment_lib.build_experiment(config, manifest)
  assert experiment.engine == 'cohort'
  assert not _lines(caplog, logging.INFO)  # Nothing to explain: no fallback.
  # Each silo's users become its own cohorts (two at least: the coordinator
  # does not know a silo's cores), the silo named once in each.
  for group, users in (
    (experiment.round_input, ['silo-a/u1', 'silo-b/u2', 'silo-a/u3', 'silo-a/u4', 'silo-b/u5']),
    (experiment.eval_input, experiment.eval_client_ids),
  ):
    cohorts = group(users)
    for silo in ('silo-a', 'silo-b'):
      own = [c.split('/')[1] for c in cohorts if c.startswith(f'{silo}/')]
      assert len(own) == 2
      assert sorted(','.join(own).split(',')) == sorted(
        u.split('/')[1] for u in users if u.startswith(f'{silo}/')
      )
    assert all(c.count('/') == 1 for c in cohorts)


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


def test_secure_placement_trains_as_cohorts_with_the_update_sum_where_silos_noise_it(tmp_path):
  manifest = _silos_manifest()
  config = _silos_config(dp__placement='secure', dp__accountant='rdp')
  experiment = experiment_lib.build_experiment(config, manifest)
  assert experiment.engine == 'cohort'
  privacy = experiment.privacy
  assert privacy.placement == 'secure' and privacy.noised_path == (0,)
  # The silo half of a round holds exactly the model's trainable values at that
  # path (what each silo encodes, noises and masks), as floats.
  form = tff.backends.native.compile_to_mergeable_comp_form(experiment.train_process.next)
  node = form.up_to_merge.type_signature.result.member
  for index in privacy.noised_path:
    node = node[index]
  leaves = tff.structure.flatten(node)
  assert all(t.dtype == np.float32 for t in leaves)
  assert sum(int(np.prod(t.shape)) for t in leaves) == privacy.secure_dim > 0
  # The server adds no noise of its own: the silos' shares are the noise.
  with execution_context.local_worker_context(str(tmp_path)):
    state = experiment.train_process.initialize()
  assert state.aggregator.numerator_state.stddev == 0.0
  assert state.aggregator.numerator_state.l2_norm_clip > 0


def test_auto_trains_fedavg_without_dp_as_cohorts_too():
  experiment = experiment_lib.build_experiment(_config(dp__enabled=False), _manifest())
  assert experiment.engine == 'cohort' and experiment.privacy is None


def test_an_explicit_cohort_engine_names_the_layer_it_cannot_vectorize():
  with pytest.raises(cohort_training.CohortNotVectorizableError, match='the_batch_norm'):
    experiment_lib.build_experiment(
      _config(runtime__engine='cohort'), _manifest(), keras_model_builder=_batch_norm_model
    )

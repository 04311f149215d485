"""Training on binary and regression client data, from raw rows through Beam to metrics."""

import logging

import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from fedpipe.config import base as config_base
from fedpipe.config import validation
from fedpipe.data import manifest as manifest_lib
from fedpipe.data.client_data_writer import write_client_data
from fedpipe.pipelines import feature_spec as fs
from fedpipe.pipelines import pipeline as pp
from fedpipe.training import experiment as experiment_lib
from fedpipe.training import loop as training_loop

NUM_CLIENTS = 6


def _spec(task):
  label = {'name': 'label', 'task': task}
  return fs.FeatureSpec.from_json(
    {
      'schema_version': 2,
      'client_key': 'client_id',
      'label': label,
      'features': [
        {'name': 'a', 'mean': 0.0, 'std': 1.0},
        {'name': 'b', 'min': -3.0, 'max': 3.0},
        {'name': 'color', 'type': 'categorical', 'vocabulary': ['red', 'green']},
      ],
    }
  )


def _raw(path, task, rows, seed):
  rng = np.random.default_rng(seed)
  lines = ['client_id,label,a,b,color']
  for i in range(rows):
    a, b = rng.normal(), float(np.clip(rng.normal(), -3, 3))
    color = ['red', 'green', 'blue'][i % 3]
    score = 2 * a - b + (1.0 if color == 'red' else 0.0)
    label = int(score > 0.5) if task == 'binary' else round(score, 3)
    lines.append(f'u{i % NUM_CLIENTS},{label},{a:.4f},{b:.4f},{color}')
  path.write_text('\n'.join(lines) + '\n')
  return path


def _preprocess(tmp_path, task):
  out = tmp_path / f'{task}_clients'
  pp.run_preprocessing(
    train_files=str(_raw(tmp_path / f'{task}_train.csv', task, 120, 0)),
    eval_files=str(_raw(tmp_path / f'{task}_eval.csv', task, 60, 1)),
    feature_spec=_spec(task),
    output_dir=str(out),
    min_examples_per_client=1,
    max_malformed_fraction=0.0,
    pipeline_options=PipelineOptions([]),
  )
  return str(out)


def _config(**overrides):
  config = config_base.get_base_config()
  validation.apply_overrides(
    config,
    {
      'training__rounds': 2,
      'training__clients_per_round': 3,
      'training__batch_size': 8,
      'training__client_learning_rate': 0.1,
      'model__hidden_units': (8,),
      'dp__enabled': False,
      **overrides,
    },
  )
  return config


@pytest.mark.slow  # Beam, then two rounds of a real local runtime.
@pytest.mark.parametrize(
  'task, metrics',
  [('binary', ('auc', 'accuracy')), ('regression', ('mae', 'rmse'))],
)
def test_trains_from_raw_rows_and_reports_the_task_metrics(tmp_path, caplog, task, metrics):
  import fedpipe

  data = _preprocess(tmp_path, task)
  assert manifest_lib.read_manifest(data).label_task == task
  with caplog.at_level(logging.INFO, logger='fedpipe'):
    result = fedpipe.train(
      None,
      data,
      config=_config(),
      output_dir=str(tmp_path / 'run'),
      progress=lambda p: None,
      training__eval_every=1,
    )
  assert 'engine: cohort' in caplog.text  # runtime.engine=auto trains every task as cohorts.
  assert result.model.output_shape == (None, 1)
  assert [m['round'] for m in result.metrics] == [1, 2]
  for name in metrics:
    assert np.isfinite(result.metrics[-1][f'train_{name}'])
    assert np.isfinite(result.metrics[-1][f'eval_{name}'])
    assert np.isfinite(result.test_metrics[name])
    assert f'test_{name}=' in result.summary()
  if task == 'regression':
    assert 'accuracy' not in result.test_metrics
    assert 'test_accuracy' not in result.summary()
  assert result.test_metrics['num_examples'] == 60
  line = training_loop._format_progress(2, 2, dict(result.metrics[-1], round_seconds=1.0))
  assert all(f'{name}=' in line for name in metrics)


def _manifest(tmp_path, task, weighted=False):
  rng = np.random.default_rng(0)
  y = {'binary': lambda: rng.integers(0, 2, 5), 'regression': lambda: rng.normal(size=5)}[task]
  clients = {
    f'u{i}': (rng.normal(size=(5, 3)), y(), *([rng.random(5)] if weighted else []))
    for i in range(4)
  }
  return write_client_data(tmp_path / 'd', clients, clients, label_task=task)


@pytest.mark.parametrize('engine', ['cohort', 'auto'])
@pytest.mark.parametrize('task', ['binary', 'regression'])
def test_the_cohort_engine_trains_binary_and_regression(tmp_path, task, engine):
  experiment = experiment_lib.build_experiment(
    _config(runtime__engine=engine, training__clients_per_round=2), _manifest(tmp_path, task)
  )
  assert experiment.engine == 'cohort' and experiment.label_task == task
  assert validation.label_task_conflicts(task) == []
  assert validation.cohort_engine_conflicts(_config(), label_task=task) == []


def test_weighted_data_is_refused_at_training_time(tmp_path):
  manifest = _manifest(tmp_path, 'binary', weighted=True)
  assert manifest.weighted
  with pytest.raises(experiment_lib.ExperimentError, match="weight column 'w'.*not supported yet"):
    experiment_lib.build_experiment(_config(training__clients_per_round=2), manifest)


SEEN = {}


def spec_builder(*, num_features, num_classes, num_outputs, feature_spec):
  """A model builder that takes the spec and the output width (named by model.builder)."""
  import tensorflow as tf

  SEEN.update(num_outputs=num_outputs, feature_spec=feature_spec, num_classes=num_classes)
  return tf.keras.Sequential(
    [tf.keras.Input(shape=(num_features,)), tf.keras.layers.Dense(num_outputs)]
  )


def test_a_builder_that_takes_the_spec_and_num_outputs_gets_them():
  spec = _spec('binary')
  make = experiment_lib.keras_builder(
    _config(model__builder=f'{__name__}:spec_builder'),
    num_features=spec.num_features,
    num_classes=2,
    label_task='binary',
    feature_spec=spec,
  )
  assert make().output_shape == (None, 1)
  assert SEEN == {'num_outputs': 1, 'feature_spec': spec, 'num_classes': 2}
  assert spec.input_layout()[2].width == 3  # 'red', 'green' and the out-of-vocabulary slot.

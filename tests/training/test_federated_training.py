"""`federated_training.train`, the library call: config assembly, progress, event loops, a real run.

The fast tests replace the run (`program.execute`) with a fake; the slow
ones train a data scientist's own Keras model on real preprocessed client
data with a real isolated worker.
"""

import asyncio
import copy
import json
import threading
import time
import types

import numpy as np
import pytest

from fedpipe.computations import keras_model, privacy_accounting
from fedpipe.config import base, validation
from fedpipe.datasets import bundled_data
from fedpipe.pipelines import feature_spec as feature_spec_lib
from fedpipe.training import federated_training, program, run_directory
from fedpipe.training import loop as training_loop

NUM_CLIENTS = 30


def _progress(round_num, rounds=3, **metrics):
  values = {'clients': 10.0, 'train_loss': 0.5, 'train_accuracy': 0.75, 'epsilon': 0.25}
  values.update(metrics, round_seconds=1.5)
  return training_loop.RoundProgress(
    round=round_num, rounds=rounds, metrics=values, epsilon=0.25, last_checkpoint=round_num
  )


# --- The config a call trains with -------------------------------------------


def test_defaults_to_the_demo_dp_config_with_the_data_and_overrides():
  config = federated_training.make_config(
    None, 'data/mine', overrides={'training__rounds': 5, 'name': 'try1'}
  )
  assert config.data.processed_dir == 'data/mine' and config.runtime.mode == 'local'
  assert (config.training.rounds, config.name) == (5, 'try1')
  expected = base.get_default_config()
  assert config.dp.noise_multiplier == expected.dp.noise_multiplier == 1.76
  assert config.dp.enabled and config.model.builder == ''


def test_a_given_config_is_copied_not_changed():
  mine = base.get_default_config()
  before = copy.deepcopy(mine)
  config = federated_training.make_config(
    None, 'data/mine', config=mine, overrides={'dp__noise_multiplier': 3.0}
  )
  assert config.dp.noise_multiplier == 3.0
  assert mine == before


def test_a_federation_sets_the_silos_and_tls_files():
  federation = types.SimpleNamespace(
    silos_spec='a=127.0.0.1:1,b=127.0.0.1:2',
    tls=types.SimpleNamespace(ca='ca.pem', cert='me.pem', key='me.key'),
  )
  config = federated_training.make_config(None, federation)
  runtime = config.runtime
  assert (runtime.mode, runtime.silos) == ('silos', 'a=127.0.0.1:1,b=127.0.0.1:2')
  assert (runtime.tls_ca, runtime.tls_cert, runtime.tls_key) == ('ca.pem', 'me.pem', 'me.key')


def test_data_that_is_neither_a_directory_nor_a_federation_is_refused():
  with pytest.raises(federated_training.TrainingDataError, match='fedpipe.connect'):
    federated_training.make_config(None, 42)


def test_bad_overrides_are_config_errors_naming_the_keyword():
  with pytest.raises(validation.ConfigError) as error:
    federated_training.make_config(
      None, 'data/mine', overrides={'rounds': 5, 'training__sampling': 'random'}
    )
  message = str(error.value)
  assert 'did you mean training__rounds?' in message
  assert "config.training.sampling: got 'random'" in message


def test_a_model_fn_and_a_configured_builder_are_one_too_many():
  with pytest.raises(validation.ConfigError, match='pass one of them'):
    federated_training.make_config(
      lambda: None,
      'data/mine',
      overrides={'model__builder': 'fedpipe.computations.keras_model:build_mlp'},
    )
  with pytest.raises(keras_model.ModelMismatchError, match='zero-argument function'):
    federated_training.make_config('not a function', 'data/mine')


# --- Progress reporting ------------------------------------------------------


def test_outside_jupyter_progress_is_one_line_per_round(capsys):
  report = federated_training.default_progress()
  assert report is federated_training.print_progress
  report(_progress(2))
  assert capsys.readouterr().out == (
    'round 2/3  clients=10  loss=0.5000  accuracy=0.7500  epsilon=0.250  1.50s\n'
  )


def test_in_jupyter_progress_is_a_bar_updated_in_place(monkeypatch):
  shell = types.SimpleNamespace(kernel=object())
  monkeypatch.setitem(
    __import__('sys').modules, 'IPython', types.SimpleNamespace(get_ipython=lambda: shell)
  )
  report = federated_training.default_progress()
  assert isinstance(report, federated_training.NotebookProgress)
  monkeypatch.undo()

  from IPython import display

  shown, updates = [], []

  class Handle:
    def update(self, content):
      updates.append(content.data)

  def fake_display(content, display_id=False):
    shown.append((content.data, display_id))
    return Handle()

  monkeypatch.setattr(display, 'display', fake_display)
  report(_progress(1, eval_accuracy=0.5))
  report(_progress(2))
  assert len(shown) == 1 and shown[0][1] is True
  assert '<progress value="1" max="3"' in shown[0][0] and 'eval accuracy 0.5000' in shown[0][0]
  assert len(updates) == 1 and '<progress value="2" max="3"' in updates[0]
  assert 'ε 0.250' in updates[0] and 'loss 0.5000' in updates[0]


def _fake_execute(rounds=3, delay_s=0.0, seen=None):
  """Stands in for program.execute: reports `rounds` rounds, notes whether a loop was running."""

  def execute(config, output_dir, *, keras_model_builder, overwrite, on_round):
    try:
      asyncio.get_running_loop()
      seen['loop_running'] = True
    except RuntimeError:
      seen['loop_running'] = False
    seen['thread'] = threading.current_thread()
    for r in range(1, rounds + 1):
      seen.setdefault('rounds', []).append(r)
      on_round(_progress(r, rounds))
      time.sleep(delay_s)
    return 'result'

  return execute


def test_outside_an_event_loop_training_runs_on_the_calling_thread(monkeypatch, tmp_path):
  seen = {}
  monkeypatch.setattr(program, 'execute', _fake_execute(seen=seen))
  calls = []
  result = federated_training.train(None, str(tmp_path), output_dir=tmp_path, progress=calls.append)
  assert result == 'result' and seen['thread'] is threading.current_thread()
  assert [p.round for p in calls] == [1, 2, 3]


def test_inside_an_event_loop_training_runs_on_its_own_thread_progress_on_this_one(
  monkeypatch, tmp_path
):
  seen = {}
  monkeypatch.setattr(program, 'execute', _fake_execute(seen=seen))
  calls = []

  def record(p):
    calls.append((p.round, threading.current_thread()))

  async def in_a_notebook_cell():
    return federated_training.train(None, str(tmp_path), output_dir=tmp_path, progress=record)

  assert asyncio.run(in_a_notebook_cell()) == 'result'
  assert seen['loop_running'] is False and seen['thread'] is not threading.current_thread()
  assert calls == [(r, threading.current_thread()) for r in (1, 2, 3)]


def test_inside_an_event_loop_a_failing_progress_stops_training_after_the_round(
  monkeypatch, tmp_path
):
  seen = {}
  monkeypatch.setattr(program, 'execute', _fake_execute(rounds=10, delay_s=0.2, seen=seen))

  def fail_at_two(p):
    if p.round == 2:
      raise ValueError('my callback broke')

  async def in_a_notebook_cell():
    return federated_training.train(None, str(tmp_path), output_dir=tmp_path, progress=fail_at_two)

  with pytest.raises(ValueError, match='my callback broke'):
    asyncio.run(in_a_notebook_cell())
  assert len(seen['rounds']) < 10


def test_without_an_output_dir_a_new_temporary_directory_is_used(monkeypatch, tmp_path):
  dirs = []

  def execute(config, output_dir, **kwargs):
    dirs.append(output_dir)
    return None

  monkeypatch.setattr(program, 'execute', execute)
  federated_training.train(None, str(tmp_path), progress=print)
  federated_training.train(None, str(tmp_path), progress=print)
  assert dirs[0] != dirs[1] and all('fedpipe-dp_fedavg-' in d for d in dirs)


# --- Real training -----------------------------------------------------------


@pytest.fixture(scope='module')
def client_data(tmp_path_factory):
  """Digits over 30 clients, preprocessed by the real Beam pipeline."""
  from apache_beam.options.pipeline_options import PipelineOptions

  from fedpipe.pipelines import pipeline as preprocess_pipeline

  root = tmp_path_factory.mktemp('library_data')
  raw = bundled_data.write_bundled_dataset(
    source='sklearn:digits', raw_dir=str(root / 'raw'), num_clients=NUM_CLIENTS, seed=0
  )
  processed = str(root / 'clients')
  preprocess_pipeline.run_preprocessing(
    train_files=raw.train_file,
    eval_files=raw.test_file,
    feature_spec=feature_spec_lib.FeatureSpec.load(raw.feature_spec_file),
    output_dir=processed,
    min_examples_per_client=1,
    max_malformed_fraction=0.0,
    pipeline_options=PipelineOptions([]),
  )
  return processed


def _small_model():
  import tensorflow as tf

  return tf.keras.Sequential(
    [
      tf.keras.Input(shape=(64,)),
      tf.keras.layers.Dense(16, activation='relu'),
      tf.keras.layers.Dense(10),
    ]
  )


def _same_weights(a, b):
  return all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights()))


@pytest.mark.slow
def test_trains_a_custom_model_in_an_event_loop_then_resumes_outside_one(client_data, tmp_path):
  import tensorflow as tf

  out = tmp_path / 'run'
  calls = []

  def record(p):
    calls.append((p.round, p.rounds, threading.current_thread()))

  async def in_a_notebook_cell():
    return federated_training.train(
      _small_model,
      client_data,
      output_dir=out,
      progress=record,
      training__rounds=2,
      training__clients_per_round=10,
    )

  first = asyncio.run(in_a_notebook_cell())
  assert calls == [(1, 2, threading.current_thread()), (2, 2, threading.current_thread())]
  assert isinstance(first, federated_training.TrainResult) and first.output_dir == str(out)
  assert [m['round'] for m in first.metrics] == [1, 2]
  assert {'train_loss', 'train_accuracy', 'clients', 'epsilon'} <= set(first.metrics[0])
  report = json.loads((out / 'privacy_report.json').read_text())
  assert first.privacy.as_dict() == report and first.privacy.rounds == 2
  expected = privacy_accounting.compute_epsilon(
    noise_multiplier=1.76,
    sampling=privacy_accounting.SamplingScheme('poisson', NUM_CLIENTS, 10),
    rounds=2,
    delta=1e-5,
    accountant='pld',
  )
  assert first.privacy.epsilon == pytest.approx(expected, rel=1e-9)
  assert first.privacy.noise_multiplier == 1.76 and first.privacy.mechanism
  assert first.test_metrics['accuracy'] == pytest.approx(report['test_accuracy'])
  # The model holds the trained weights, as exported.
  assert [w.shape for w in first.model.get_weights()] == [(64, 16), (16,), (16, 10), (10,)]
  assert not _same_weights(first.model, _small_model())
  assert _same_weights(first.model, tf.keras.models.load_model(out / 'model.keras'))

  # More rounds, outside an event loop: resumes after round 2.
  calls.clear()
  second = federated_training.train(
    _small_model,
    client_data,
    output_dir=out,
    progress=record,
    training__rounds=3,
    training__clients_per_round=10,
  )
  assert [c[0] for c in calls] == [3]
  assert [m['round'] for m in second.metrics] == [1, 2, 3] and second.privacy.rounds == 3

  # Complete: the same call returns the result without training.
  calls.clear()
  third = federated_training.train(
    _small_model,
    client_data,
    output_dir=out,
    progress=record,
    training__rounds=3,
    training__clients_per_round=10,
  )
  assert calls == [] and _same_weights(third.model, second.model)
  assert third.privacy == second.privacy

  # Another model cannot take over the run.
  def wider():
    return tf.keras.Sequential([tf.keras.Input(shape=(64,)), tf.keras.layers.Dense(10)])

  with pytest.raises(run_directory.RunDirectoryError, match='different model'):
    federated_training.train(
      wider, client_data, output_dir=out, training__rounds=3, training__clients_per_round=10
    )


@pytest.mark.slow
def test_a_model_of_the_wrong_shape_names_the_shape_it_must_have(client_data, tmp_path):
  import tensorflow as tf

  def for_other_data():
    return tf.keras.Sequential([tf.keras.Input(shape=(30,)), tf.keras.layers.Dense(10)])

  with pytest.raises(keras_model.ModelMismatchError) as error:
    federated_training.train(
      for_other_data,
      client_data,
      output_dir=tmp_path / 'run',
      training__rounds=1,
      training__clients_per_round=10,
    )
  message = str(error.value)
  assert 'takes inputs of shape (None, 30)' in message
  assert 'must take inputs of shape (None, 64)' in message and '(None, 10)' in message
  assert not (tmp_path / 'run').exists()  # Refused before the first round: nothing written.

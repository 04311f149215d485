"""`config.model.builder` names a model function as module:function; keyword overrides set fields."""

import importlib

import numpy as np
import pytest

from fedpipe.config import base, validation

THIS_MODULE = 'tests.config.test_model_builder'
NOT_A_FUNCTION = 3
received = {}


def small_model(*, num_features, num_classes):
  """A builder that takes only what it must."""
  import tensorflow as tf

  return tf.keras.Sequential(
    [tf.keras.Input(shape=(num_features,)), tf.keras.layers.Dense(num_classes)]
  )


def with_options(num_features, num_classes, hidden_units, seed):
  """A builder that also takes the config's hidden_units and seed."""
  received.update(hidden_units=hidden_units, seed=seed)
  return small_model(num_features=num_features, num_classes=num_classes)


def without_classes(num_features):
  return None


def _config(builder):
  config = base.get_default_config()
  config.model.builder = builder
  return config


def test_the_default_config_is_the_digits_demo_under_another_name():
  demo = importlib.import_module('configs.digits_dp').get_config()
  default = base.get_default_config()
  assert (demo.name, default.name) == ('digits_dp', 'dp_fedavg')
  default.name = demo.name
  assert default == demo


def test_a_builder_is_called_with_the_data_shape_and_what_it_takes():
  from fedpipe.training import experiment

  config = validation.validate(_config(f'{THIS_MODULE}:small_model'))
  model = experiment.keras_builder(config, num_features=5, num_classes=3)()
  assert model.output_shape == (None, 3) and model.input_shape == (None, 5)

  config = validation.validate(_config(f'{THIS_MODULE}:with_options'))
  config.model.hidden_units = (7,)
  config.seed = 11
  experiment.keras_builder(config, num_features=5, num_classes=3)()
  assert received == {'hidden_units': (7,), 'seed': 11}


def test_naming_the_bundled_mlp_builds_what_the_default_builds():
  from fedpipe.training import experiment

  named = _config('fedpipe.computations.keras_model:build_mlp')
  default = _config('')
  a = experiment.keras_builder(validation.validate(named), num_features=64, num_classes=10)()
  b = experiment.keras_builder(validation.validate(default), num_features=64, num_classes=10)()
  assert all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights()))
  assert [w.shape for w in a.get_weights()] == [(64, 64), (64,), (64, 10), (10,)]


def test_the_mlp_takes_its_activation_and_input_centring_from_the_config():
  from fedpipe.computations import keras_model
  from fedpipe.training import experiment

  plain = validation.validate(_config(''))
  plain.model.activation = 'tanh'
  plain.model.center_inputs = False
  centred = validation.validate(_config(''))
  centred.model.activation = 'tanh'
  centred.model.center_inputs = True
  a = experiment.keras_builder(plain, num_features=4, num_classes=3)()
  b = experiment.keras_builder(centred, num_features=4, num_classes=3)()
  assert a.get_layer('hidden_0').activation.__name__ == 'tanh'
  # Same weights; the centred model sees 2x - 1 where the plain one sees x.
  x = np.random.default_rng(0).uniform(size=(5, 4)).astype(np.float32)
  np.testing.assert_allclose(b(x), a(2 * x - 1), rtol=1e-5, atol=1e-6)
  assert validation.MLP_ACTIVATIONS == keras_model.ACTIVATIONS
  with pytest.raises(keras_model.UnknownActivationError, match="got 'swish'"):
    keras_model.build_mlp(num_features=4, num_classes=3, activation='swish')


def test_a_bad_activation_or_centring_is_a_config_error_naming_the_field():
  config = _config('')
  config.model.activation = 'swish'
  config.model.center_inputs = None
  with pytest.raises(validation.ConfigError) as error:
    validation.validate(config)
  assert error.value.problems == [
    "config.model.activation: got 'swish'; must be one of relu, tanh, elu, sigmoid",
    'config.model.center_inputs: is None; must be true or false',
  ]


@pytest.mark.parametrize(
  'builder,expected',
  [
    ('no_colon', "not of the form 'module:function'"),
    ('no_such_module_xyz:build', "module 'no_such_module_xyz' cannot be imported"),
    (f'{THIS_MODULE}:no_such_function', f"module '{THIS_MODULE}' has no attribute"),
    (f'{THIS_MODULE}:NOT_A_FUNCTION', "'NOT_A_FUNCTION' is a int, not a function"),
    (f'{THIS_MODULE}:without_classes', 'does not take the keyword argument(s) num_classes'),
  ],
)
def test_a_bad_builder_is_a_config_error_naming_the_field_and_the_fix(builder, expected):
  with pytest.raises(validation.ConfigError) as error:
    validation.validate(_config(builder))
  (problem,) = error.value.problems
  assert problem.startswith(f'config.model.builder: got {builder!r}')
  assert expected in problem and "'module:function'" in problem


def test_a_bad_builder_is_reported_with_the_other_problems():
  config = _config('no_colon')
  config.training.rounds = 0
  with pytest.raises(validation.ConfigError) as error:
    validation.validate(config)
  assert len(error.value.problems) == 2


def test_overrides_set_fields_with_double_underscores_for_dots():
  config = base.get_default_config()
  validation.apply_overrides(
    config, {'training__rounds': 5, 'dp__noise_multiplier': 2, 'name': 'x', 'model__builder': ''}
  )
  assert (config.training.rounds, config.dp.noise_multiplier, config.name) == (5, 2.0, 'x')


def test_bad_overrides_are_all_named_with_the_fix():
  config = base.get_default_config()
  with pytest.raises(validation.ConfigError) as error:
    validation.apply_overrides(
      config,
      {'rounds': 5, 'training__roudns': 5, 'dp': 1, 'training__batch_size': 'big'},
    )
  problems = error.value.problems
  assert len(problems) == 4
  assert problems[0].startswith('rounds: the config has no field config.rounds; did you mean ')
  assert 'training__rounds?' in problems[0]
  assert 'config.training.roudns' in problems[1]
  assert problems[2].startswith('config.dp: is a section; set its fields (dp__')
  assert problems[3] == (
    "config.training.batch_size (training__batch_size=): got 'big' (str); the field takes "
    'int values'
  )
  assert config.training.batch_size == base.get_default_config().training.batch_size

"""Keras models and their TFF wrapping.

`build_model_fn` turns a Keras model builder into the no-argument
`tff.learning.models.VariableModel` constructor that TFF's learning builders
take; a new Keras model is built inside each TFF graph, as TFF requires.
`check_keras_model` says, before any TFF tracing, whether a builder's model
fits the client data: it takes `num_features` floats and outputs one value
per class (logits, or probabilities from a final softmax) for the label task
'multiclass', one logit for 'binary' and one value for 'regression'.

Loss and metrics follow the label task (the manifest's `label_task`):

* multiclass: sparse categorical cross-entropy (from logits, or from
  probabilities after a softmax), `accuracy`;
* binary: binary cross-entropy from the one logit, `auc` and `accuracy`
  (the logit's sign: threshold 0);
* regression: mean squared error, `mae` and `rmse`.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import json
import random
import weakref
from collections.abc import Callable, Iterator, Sequence

import tensorflow as tf
import tensorflow_federated as tff

from fedpipe.computations import client_data
from fedpipe.data import record_schema
from fedpipe.errors import FedpipeError

# What each label task's model outputs, for messages.
_OUTPUTS = {
  record_schema.MULTICLASS: 'one logit or probability per class',
  record_schema.BINARY: "one logit: label.task is 'binary'",
  record_schema.REGRESSION: "one value: label.task is 'regression'",
}

KerasModelBuilder = Callable[[], tf.keras.Model]

# The bundled MLP's hidden activations: Keras names whose ops silos' review allows.
ACTIVATIONS = ('relu', 'tanh', 'elu', 'sigmoid')


class ModelMismatchError(FedpipeError, ValueError):
  """A model builder's model cannot be trained on the client data; the message says why."""


class UnknownActivationError(FedpipeError, ValueError):
  """`build_mlp` was asked for a hidden activation it does not offer."""


def build_mlp(
  *,
  num_features: int,
  num_classes: int,
  hidden_units: Sequence[int] = (64, 64),
  seed: int = 0,
  num_outputs: int | None = None,
  activation: str = 'relu',
  center_inputs: bool = False,
) -> tf.keras.Model:
  """A multi-layer perceptron that outputs class logits (or one logit or value).

  Categorical features need nothing special: each is a one-hot slice of `x`
  (see `fedpipe.pipelines.feature_spec`), and the first Dense layer's rows
  for that slice are an embedding of its values (a learned vector per
  value, the out-of-vocabulary slot included), summed with the numeric
  features' contributions.

  Args:
    num_features: Input width.
    num_classes: Number of output classes (the output width when
      `num_outputs` is None).
    hidden_units: Width of each hidden layer.
    seed: Seed of the weight initializers (the initial global model).
    num_outputs: The output width the label task needs: `num_classes` for
      'multiclass', 1 for 'binary' (a logit) and 'regression'; None:
      `num_classes`.
    activation: The hidden layers' activation, one of `ACTIVATIONS`.
    center_inputs: Map the features from [0, 1] (where the feature spec
      scales them) to [-1, 1] before the first layer: x -> 2x - 1. The same
      functions are reachable either way (the first layer has biases); zero-
      centred inputs make tanh units train faster, which under DP's fixed
      noise means a better model for the same ε.

  Returns:
    An uncompiled `tf.keras.Model`.

  Raises:
    UnknownActivationError: If `activation` is not one of `ACTIVATIONS`.
  """
  if activation not in ACTIVATIONS:
    raise UnknownActivationError(
      f'build_mlp: activation must be one of {ACTIVATIONS}, got {activation!r}'
    )
  inputs = tf.keras.Input(shape=(num_features,), name=record_schema.FEATURES.key)
  x = inputs
  if center_inputs:
    x = tf.keras.layers.Rescaling(2.0, offset=-1.0, name='center_inputs')(x)
  for i, units in enumerate(hidden_units):
    x = tf.keras.layers.Dense(
      int(units),
      activation=activation,
      kernel_initializer=tf.keras.initializers.GlorotUniform(seed=seed + i),
      name=f'hidden_{i}',
    )(x)
  logits = tf.keras.layers.Dense(
    num_classes if num_outputs is None else num_outputs,
    kernel_initializer=tf.keras.initializers.GlorotUniform(seed=seed + len(hidden_units)),
    name='logits',
  )(x)
  # A fixed name keeps the traced graphs (and so approved computation
  # fingerprints) independent of how many models the process built before.
  return tf.keras.Model(inputs=inputs, outputs=logits, name='mlp')


def outputs_probabilities(model: tf.keras.Model) -> bool:
  """Whether `model` ends in a softmax (probabilities) rather than logits."""
  last = model.layers[-1] if model.layers else None
  if isinstance(last, tf.keras.layers.Softmax):
    return True
  activation = getattr(last, 'activation', None)
  return activation is tf.keras.activations.softmax or (
    getattr(activation, '__name__', None) == 'softmax'
  )


def _describe(builder: KerasModelBuilder) -> str:
  name = getattr(builder, '__qualname__', None) or type(builder).__name__
  module = getattr(builder, '__module__', None)
  return f'{module}.{name}' if module else name


@contextlib.contextmanager
def reproducible_keras_build(seed: int = 0) -> Iterator[None]:
  """Models built in the block come out the same however often they are built.

  Two things make a rebuilt Keras model differ, and both end up in the traced
  TFF computations, whose fingerprints silos approve (a notebook that rebuilt
  a model would otherwise ask for a new approval each time):
  - names: an unnamed model or layer takes the next free name of a
    process-wide record (`dense_7` if seven were built before, in any graph);
  - initial weights: Keras computes them eagerly and TFF captures them as
    constants, and an initializer without a seed draws one at random.
  Inside the block the name record is empty and unseeded initializers draw
  their seeds from `random.Random(seed)`; both are restored after. Models
  whose initializers have seeds (the bundled MLP) are unaffected.
  """
  from keras.src import backend as keras_backend  # TF 2.14's tf.keras.

  saved = (
    keras_backend.PER_GRAPH_OBJECT_NAME_UIDS,
    keras_backend.OBSERVED_NAMES,
    getattr(keras_backend._SEED_GENERATOR, 'generator', None),
  )
  keras_backend.PER_GRAPH_OBJECT_NAME_UIDS = weakref.WeakKeyDictionary()
  keras_backend.OBSERVED_NAMES = set()
  keras_backend._SEED_GENERATOR.generator = random.Random(seed)
  try:
    yield
  finally:
    (
      keras_backend.PER_GRAPH_OBJECT_NAME_UIDS,
      keras_backend.OBSERVED_NAMES,
      keras_backend._SEED_GENERATOR.generator,
    ) = saved


def _build_checked(builder: KerasModelBuilder) -> tf.keras.Model:
  """Calls `builder` and checks that it returned an uncompiled Keras model."""
  try:
    inspect.signature(builder).bind()
  except TypeError as e:
    raise ModelMismatchError(
      f'the model builder {_describe(builder)} cannot be called without arguments ({e}); '
      'pass a zero-argument function (e.g. a lambda or functools.partial) that returns '
      'a new tf.keras.Model'
    ) from e
  except ValueError:
    pass  # No signature to check (a builtin): calling it says.
  model = builder()
  if not isinstance(model, tf.keras.Model):
    raise ModelMismatchError(
      f'the model builder {_describe(builder)} returned {type(model).__name__}, not a '
      'tf.keras.Model; return a new, uncompiled Keras model'
    )
  if model._is_compiled:  # TFF compiles the model itself (loss, metrics, optimizer).
    raise ModelMismatchError(
      f'the model builder {_describe(builder)} returned a compiled model; return it '
      'without calling compile(): federated training sets the loss, metrics and optimizers'
    )
  return model


def check_keras_model(
  keras_model_builder: KerasModelBuilder,
  *,
  num_features: int,
  num_classes: int,
  label_task: str = record_schema.MULTICLASS,
) -> None:
  """Checks that the builder's model can be trained on the client data.

  The model is built in a scratch graph, so the check leaves no variables
  behind and does not change the names Keras gives later models.

  Args:
    keras_model_builder: Builds a fresh Keras model.
    num_features: Input width of the client data.
    num_classes: Number of label values in the client data.
    label_task: The label task (the manifest's `label_task`): the model
      outputs `num_classes` values for 'multiclass', 1 for 'binary' and
      'regression'.

  Raises:
    ModelMismatchError: If the builder fails without arguments, returns
      something other than an uncompiled `tf.keras.Model`, or its model does
      not map a batch of shape (None, num_features) to (None, outputs).
  """
  outputs_wanted = num_outputs(label_task, num_classes)
  expected = (
    f'it must take inputs of shape (None, {num_features}) (the {num_features} features of '
    f'the client data) and output shape (None, {outputs_wanted}) ({_OUTPUTS[label_task]})'
  )
  if label_task != record_schema.MULTICLASS:
    expected += '; a model builder that takes num_outputs is called with it'
  with tf.Graph().as_default(), reproducible_keras_build():
    model = _build_checked(keras_model_builder)
    inputs = getattr(model, 'inputs', None) or []
    if len(inputs) > 1:
      raise ModelMismatchError(
        f'the model of {_describe(keras_model_builder)} has {len(inputs)} inputs; {expected}'
      )
    if inputs and not tf.TensorShape(inputs[0].shape).is_compatible_with([None, num_features]):
      raise ModelMismatchError(
        f'the model of {_describe(keras_model_builder)} takes inputs of shape '
        f'{_shape(inputs[0].shape)}; {expected}'
      )
    try:
      outputs = model(tf.zeros([2, num_features], tf.float32))
    except (ValueError, TypeError, tf.errors.OpError) as e:
      detail = ' '.join(str(e).split())[:300]
      raise ModelMismatchError(
        f'the model of {_describe(keras_model_builder)} cannot take a batch of '
        f'{num_features} features ({detail}); {expected}'
      ) from e
    if not isinstance(outputs, tf.Tensor) or outputs.shape != (2, outputs_wanted):
      found = _shape(outputs.shape) if isinstance(outputs, tf.Tensor) else type(outputs).__name__
      raise ModelMismatchError(
        f'the model of {_describe(keras_model_builder)} outputs {found} for a batch of 2; '
        f'{expected}'
      )


def num_outputs(label_task: str, num_classes: int) -> int:
  """The model's output width for a label task: `num_classes` for 'multiclass', else 1."""
  return (
    num_classes if record_schema.check_label_task(label_task) == record_schema.MULTICLASS else 1
  )


def _shape(shape) -> str:
  dims = ['None' if d is None else str(d) for d in tf.TensorShape(shape).as_list()]
  return f'({", ".join(dims)})' if len(dims) != 1 else f'({dims[0]},)'


def architecture(keras_model_builder: KerasModelBuilder) -> str:
  """A text that identifies the builder's model: its Keras JSON, built in a scratch graph.

  Layer names come out the same however many models the process built
  before, so equal builders give equal texts.
  """
  with tf.Graph().as_default(), reproducible_keras_build():
    model = keras_model_builder()
    try:
      described = json.loads(model.to_json())
      for key in ('keras_version', 'backend'):  # The library's, not the model's.
        described.pop(key, None)
      return json.dumps(described, sort_keys=True)
    except (NotImplementedError, TypeError, ValueError):
      weights = [[w.name, w.shape.as_list(), w.dtype.name] for w in model.weights]
      return json.dumps({'class_name': type(model).__name__, 'weights': weights}, sort_keys=True)


def build_model_fn(
  keras_model_builder: KerasModelBuilder,
  *,
  num_features: int,
  seed: int = 0,
  label_task: str = record_schema.MULTICLASS,
) -> Callable[[], tff.learning.models.VariableModel]:
  """A TFF model constructor for a model over `client_data` batches.

  Args:
    keras_model_builder: Builds a fresh, uncompiled Keras model mapping
      `num_features` floats to class logits, or to class probabilities if
      it ends in a softmax (the loss is chosen to match).
    num_features: Input width, as in the client data.
    seed: Seeds the initializers that have none (`reproducible_keras_build`):
      the initial model, and the computations' fingerprints, are the same
      on every build.
    label_task: The manifest's `label_task`: the loss and metrics (see the
      module docstring) and the dtype of the batches' labels.

  Returns:
    A no-argument callable returning a `tff.learning.models.VariableModel`
    with the task's loss and metrics: for 'multiclass' sparse categorical
    cross-entropy and `accuracy`.
  """
  input_spec = client_data.batch_spec(num_features, label_task=label_task)

  def model_fn() -> tff.learning.models.VariableModel:
    with reproducible_keras_build(seed):  # Equal builds trace to equal computations.
      keras_model = keras_model_builder()
    loss, metrics = loss_and_metrics(label_task, keras_model)
    return tff.learning.models.from_keras_model(
      keras_model, loss=loss, input_spec=input_spec, metrics=metrics
    )

  return model_fn


# Thresholds of the binary task's AUC. Its state, four counts per threshold,
# is what an evaluation releases from each silo, and a silo's review lets an
# evaluation release at most `governance.review.MAX_EVALUATION_OUTPUTS` (64)
# numbers: 4 * 12 + accuracy, loss and the counts make 54. Keras interpolates
# the curve between thresholds; fewer thresholds make a coarser estimate.
# The cohort engine reads this constant, not a metric object: building one
# while tracing adds its variables to that trace, so the first trace of a
# process (and its approved fingerprint) would differ from the next.
AUC_THRESHOLDS = 12


def loss_and_metrics(
  label_task: str, keras_model: tf.keras.Model
) -> tuple[tf.keras.losses.Loss, list[tf.keras.metrics.Metric]]:
  """The loss and metrics of a label task (see the module docstring), new objects each call."""
  task = record_schema.check_label_task(label_task)
  if task == record_schema.BINARY:
    return tf.keras.losses.BinaryCrossentropy(from_logits=True), [
      tf.keras.metrics.AUC(num_thresholds=AUC_THRESHOLDS, from_logits=True, name='auc'),
      tf.keras.metrics.BinaryAccuracy(threshold=0.0, name='accuracy'),
    ]
  if task == record_schema.REGRESSION:
    return tf.keras.losses.MeanSquaredError(), [
      tf.keras.metrics.MeanAbsoluteError(name='mae'),
      tf.keras.metrics.RootMeanSquaredError(name='rmse'),
    ]
  return tf.keras.losses.SparseCategoricalCrossentropy(
    from_logits=not outputs_probabilities(keras_model)
  ), [tf.keras.metrics.SparseCategoricalAccuracy(name='accuracy')]


def as_keras_batch(batch: collections.OrderedDict) -> tuple[tf.Tensor, tf.Tensor]:
  """Splits a client-data batch into Keras's (inputs, labels)."""
  return batch[record_schema.FEATURES.key], batch[record_schema.LABEL.key]

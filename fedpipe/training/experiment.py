"""Turns a validated config and the clients' manifest into typed building blocks.

This is the only place that reads config fields for training: the
computations it builds take plain typed arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
from ml_collections import config_dict

from fedpipe.computations import (
  client_data,
  cohort_data,
  cohort_evaluation,
  cohort_fedavg,
  cohort_training,
  distributed_dp_accounting,
  dp_fedavg,
  dp_parameters,
  evaluation,
  fedavg,
  keras_model,
  privacy_accounting,
)
from fedpipe.config import validation
from fedpipe.data import manifest as manifest_lib
from fedpipe.data import record_schema
from fedpipe.errors import FedpipeError
from fedpipe.governance import secure_terms as secure_terms_lib
from fedpipe.pipelines import feature_spec as feature_spec_lib

_log = logging.getLogger(__name__)

PER_CLIENT_ENGINE = 'per_client'
# Locally the cohort engine's worker runs on this machine: one cohort per
# core at least, which the worker trains in parallel.
_WORKER_CORES = os.cpu_count() or 1
# Across silos each silo's sampled users are grouped on their own (a cohort
# never spans silos), at least two cohorts per silo: the coordinator does not
# know a silo's cores, and two keep a second one busy (and sort the silo's
# users into two buckets of similar sizes, less padding) for one more TFF
# client per silo, whose fixed cost is what cohorts save. A silo with one
# sampled user gets one cohort; the governance gate counts users either way.
_SILO_MIN_COHORTS = 2
COHORT_ENGINE = 'cohort'


class ExperimentError(FedpipeError, ValueError):
  """The config and the available client data do not fit together."""


@dataclasses.dataclass(frozen=True)
class PrivacySettings:
  """The DP mechanism of a run, as the accountant and the report see it."""

  noise_multiplier: float
  delta: float
  accountant: privacy_accounting.Accountant
  clipping: str
  clip_norm: float | None
  weight_cap: float
  expected_total_weight: float
  target_epsilon: float | None
  placement: str = 'central'
  # With placement='secure': the secure-aggregation parameters, and the
  # number of values in the noised update sum (the model's trainable weights).
  secure_scale: float = 0.0
  max_colluding: int = 0
  secure_dim: int = 0
  secure_roster: tuple[str, ...] = ()
  # Where the update sum sits in the silo half of a round (the engine's layout).
  noised_path: tuple[int, ...] = ()

  def secure_terms(self) -> secure_terms_lib.SecureAggregationTerms:
    """The secure-aggregation terms of the study among the run's silos."""
    return secure_terms_lib.SecureAggregationTerms(
      roster=self.secure_roster,
      max_colluding=self.max_colluding,
      noise_multiplier=self.noise_multiplier,
      scale=self.secure_scale,
      dim=self.secure_dim,
      noised_path=self.noised_path,
    )


# Where DP-FedAvg's silo half (its mergeable form's `up_to_merge`) puts the
# summed update: after the metric sums for the per-client engine, before them
# for the cohort engine. The silos check it in review.
SECURE_NOISED_PATH = {'per_client': (1,), 'cohort': (0,)}


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a training run needs, built from config + manifest."""

  train_process: tff.learning.templates.LearningProcess
  eval_process: tff.learning.templates.LearningProcess
  train_client_ids: list[str]
  eval_client_ids: list[str]
  sampling: privacy_accounting.SamplingScheme
  rounds: int
  privacy: PrivacySettings | None
  num_features: int
  num_classes: int
  keras_model_builder: keras_model.KerasModelBuilder
  # What `train_process.next` takes for a round's sampled users: the users
  # themselves (per-client engine) or their cohorts (cohort engine); and what
  # `eval_process.next` takes for the evaluation users.
  round_input: Callable[[list[str]], list[str]] = list
  eval_input: Callable[[list[str]], list[str]] = list
  engine: str = PER_CLIENT_ENGINE
  # The label task of the client data: the model's loss and metrics.
  label_task: str = record_schema.MULTICLASS


def keras_builder(
  config: config_dict.ConfigDict,
  *,
  num_features: int,
  num_classes: int,
  label_task: str = record_schema.MULTICLASS,
  feature_spec: feature_spec_lib.FeatureSpec | None = None,
) -> keras_model.KerasModelBuilder:
  """The zero-argument Keras model builder that `config.model` names.

  Args:
    config: A validated config; `model.builder` is 'module:function' or ''
      (the bundled MLP).
    num_features: Input width of the client data.
    num_classes: Number of classes in the client data (2 for 'binary', 0
      for 'regression').
    label_task: The client data's label task.
    feature_spec: The client data's feature spec (`input_layout` says where
      each column sits in `x`), or None if unknown.

  Returns:
    A function building a new model on each call: the builder called with
    num_features, num_classes and, if it takes them (by name, or with
    `**kwargs`), `model.hidden_units`, `config.seed`, `num_outputs` (the
    output width the task needs: num_classes, or 1 for 'binary' and
    'regression'), `feature_spec`, `model.activation` and
    `model.center_inputs`.

  Raises:
    fedpipe.config.validation.ConfigError: If `model.builder` cannot be loaded.
  """
  function = (
    validation.load_model_builder(config.model.builder)
    if config.model.builder
    else keras_model.build_mlp
  )
  arguments = {
    'num_features': num_features,
    'num_classes': num_classes,
    'hidden_units': tuple(int(h) for h in config.model.hidden_units),
    'seed': config.seed,
    'num_outputs': keras_model.num_outputs(label_task, num_classes),
    'feature_spec': feature_spec,
    'activation': config.model.activation,
    'center_inputs': config.model.center_inputs,
  }
  try:
    parameters = inspect.signature(function).parameters
  except (TypeError, ValueError):
    parameters = {}
  if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
    arguments = {
      k: v for k, v in arguments.items() if k in parameters or k in ('num_features', 'num_classes')
    }
  return functools.partial(function, **arguments)


def _server_optimizer(training: config_dict.ConfigDict) -> tff.learning.optimizers.Optimizer:
  if training.server_optimizer == 'adam':
    optimizer = tff.learning.optimizers.build_adam(
      learning_rate=training.server_learning_rate,
      beta_1=training.adam_beta1,
      beta_2=training.adam_beta2,
      epsilon=training.adam_epsilon,
    )
  else:
    optimizer = tff.learning.optimizers.build_sgdm(
      learning_rate=training.server_learning_rate, momentum=training.server_momentum
    )
  if training.server_lr_schedule == 'cosine':
    optimizer = tff.learning.optimizers.schedule_learning_rate(
      optimizer,
      fedavg.cosine_decay(
        training.server_learning_rate,
        rounds=training.rounds,
        final_fraction=training.server_lr_final_fraction,
      ),
    )
  return optimizer


def _dp_parameters(
  config: config_dict.ConfigDict,
  sampling: privacy_accounting.SamplingScheme,
  client_weights: list[float],
) -> dp_parameters.DPParameters:
  """The run's DP mechanism: `dp_parameters.derive_dp_parameters` on the config's `dp` fields.

  Args:
    config: A validated config with `dp.enabled`.
    sampling: The run's sampling scheme (its population is `client_weights`).
    client_weights: Each training client's weight: examples times local epochs.

  Returns:
    The run's `dp_parameters.DPParameters`.

  Raises:
    dp_parameters.DPParametersError: If adaptive clipping cannot reach the
      noise multiplier with this many clients per round.
    privacy_accounting.PrivacyAccountingError: If no noise multiplier reaches
      the target epsilon.
  """
  dp = config.dp
  adaptive = None
  if dp.clipping == 'adaptive':
    adaptive = dp_parameters.AdaptiveClipping(
      initial_clip_norm=dp.initial_clip_norm,
      target_unclipped_quantile=dp.target_unclipped_quantile,
      learning_rate=dp.clip_learning_rate,
      clipped_count_stddev=dp.clipped_count_stddev,
    )
  return dp_parameters.derive_dp_parameters(
    client_example_counts=client_weights,  # Already times the local epochs.
    clients_per_round=sampling.clients_per_round,
    sampling=sampling.method,
    noise_multiplier=dp.noise_multiplier,
    target_epsilon=dp.target_epsilon,
    rounds=config.training.rounds,
    delta=dp.delta,
    accountant=dp.accountant,
    clip_norm=dp.clip_norm if adaptive is None else None,
    adaptive_clipping=adaptive,
    weight_cap=dp.weight_cap,
  )


def _privacy_settings(
  params: dp_parameters.DPParameters,
  config: config_dict.ConfigDict,
  trainable: int,
  train_ids: Sequence[str],
  engine: str,
) -> PrivacySettings:
  """The DP mechanism as the accountant and the report see it."""
  secure = config.dp.placement == 'secure'
  silos = sorted({c.split('/', 1)[0] for c in train_ids if '/' in c})
  if secure and len(silos) < 2:
    raise ExperimentError(
      'dp.placement=secure sums the partial aggregates of silos: train across at least '
      f'two silos (--silos), not on data of {len(silos)}'
    )
  return PrivacySettings(
    secure_roster=tuple(silos) if secure else (),
    placement=config.dp.placement,
    secure_scale=float(config.dp.secure_scale) if secure else 0.0,
    max_colluding=int(config.dp.max_colluding) if secure else 0,
    secure_dim=trainable if secure else 0,
    noised_path=SECURE_NOISED_PATH[engine] if secure else (),
    noise_multiplier=params.noise_multiplier,
    delta=params.delta,
    accountant=params.accountant,
    clipping=params.clipping,
    clip_norm=params.clip_norm,
    weight_cap=params.weight_cap,
    expected_total_weight=params.expected_total_weight,
    target_epsilon=params.target_epsilon,
  )


def _max_cohort_size(
  config: config_dict.ConfigDict,
  manifest: manifest_lib.Manifest,
  *,
  weight_values: int,
  most_examples: int,
  epochs: int,
  batch_size: int,
) -> int:
  """Users per cohort that fit `runtime.cohort_memory_mb`.

  Per user: `weight_values` float32 values (training: its copies of the
  trainable weights, their gradient and its update), and its stacked
  batches, padded to the largest user's steps (features, label, mask and
  the model's outputs).
  """
  steps = -(-most_examples * epochs // batch_size)
  per_user = (
    4 * weight_values + 4 * (manifest.num_features + 2 + manifest.num_classes) * batch_size * steps
  )
  return max(1, int(config.runtime.cohort_memory_mb * 2**20 // per_user))


def _trainable_values(builder: keras_model.KerasModelBuilder) -> int:
  """How many values the model's trainable weights hold (built in a scratch graph)."""
  with tf.Graph().as_default(), keras_model.reproducible_keras_build():
    model = builder()
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def epsilon_after(experiment: Experiment, rounds: int) -> float | None:
  """ε spent after `rounds` rounds (None without DP).

  Central noise: the sampled Gaussian. Secure placement: the distributed
  discrete Gaussian among the run's silos (its shares sized for
  `max_colluding` colluders), with the rounding-inflated sensitivity.
  """
  p = experiment.privacy
  if p is None:
    return None
  if p.placement == 'secure':
    if rounds == 0:
      return 0.0
    mechanism = p.secure_terms().mechanism(p.clip_norm)
    return distributed_dp_accounting.compute_epsilon(
      mechanism, sampling_rate=experiment.sampling.sampling_rate, rounds=rounds, delta=p.delta
    )
  return privacy_accounting.compute_epsilon(
    noise_multiplier=p.noise_multiplier,
    sampling=experiment.sampling,
    rounds=rounds,
    delta=p.delta,
    accountant=p.accountant,
  )


def _engine_for(config: config_dict.ConfigDict, label_task: str = record_schema.MULTICLASS) -> str:
  """The engine `runtime.engine` asks for; 'auto' is the cohort engine where it runs.

  Raises:
    validation.ConfigError: If `runtime.engine` is 'cohort' and the client
      data's label task is one the cohort engine does not train.
  """
  requested = config.runtime.engine
  if requested == COHORT_ENGINE:
    problems = validation.label_task_conflicts(label_task)
    if problems:
      raise validation.ConfigError(
        f'config.runtime.engine: {p}; set runtime.engine=per_client (or auto)' for p in problems
      )
  if requested != 'auto':
    return requested
  unsupported = validation.cohort_engine_conflicts(config, label_task=label_task)
  if unsupported:
    _log.info('training with the per-client engine: %s', '; '.join(unsupported))
    return PER_CLIENT_ENGINE
  return COHORT_ENGINE


def _cohort_processes(
  config: config_dict.ConfigDict,
  manifest: manifest_lib.Manifest,
  model_fn: Callable[[], tff.learning.models.VariableModel],
  builder: keras_model.KerasModelBuilder,
  dp_params: dp_parameters.DPParameters | None,
  server_optimizer: tff.learning.optimizers.Optimizer,
) -> tuple[
  tff.learning.templates.LearningProcess,
  tff.learning.templates.LearningProcess,
  Callable[[list[str]], list[str]],
  Callable[[list[str]], list[str]],
]:
  """The cohort engine's training and evaluation processes and how each groups its users.

  Raises:
    cohort_training.CohortNotVectorizableError: If the model cannot be
      trained as cohorts (the message names the layer).
  """
  training = config.training
  train_split = manifest.split(manifest_lib.TRAIN_SPLIT)
  eval_split = manifest.split(manifest_lib.EVAL_SPLIT)
  weight_values = _trainable_values(builder)
  train_process = cohort_fedavg.build_cohort_dp_fedavg_process(
    model_fn,
    builder,
    num_features=manifest.num_features,
    aggregator=(
      dp_fedavg.build_dp_aggregator(**_dp_arguments(config, dp_params))
      if dp_params is not None
      else None
    ),
    cohort_fn=cohort_data.make_cohort_fn(
      split=manifest_lib.TRAIN_SPLIT,
      num_features=manifest.num_features,
      batch_size=training.batch_size,
      epochs=training.local_epochs,
      storage=manifest.storage,
      label_task=manifest.label_task,
    ),
    client_learning_rate=training.client_learning_rate,
    server_optimizer=server_optimizer,
    proximal_strength=training.proximal_strength,
    seed=config.seed,
    label_task=manifest.label_task,
  )
  eval_batch_size = _eval_batch_size(training)
  eval_process = cohort_evaluation.build_cohort_evaluation(
    model_fn,
    builder,
    num_features=manifest.num_features,
    cohort_fn=cohort_data.make_cohort_fn(
      split=manifest_lib.EVAL_SPLIT,
      num_features=manifest.num_features,
      batch_size=eval_batch_size,
      shuffle=False,
      storage=manifest.storage,
      label_task=manifest.label_task,
    ),
    seed=config.seed,
    label_task=manifest.label_task,
  )
  if config.runtime.mode == 'silos':  # Ids are '<silo>/<client id>'.
    group, min_cohorts = cohort_fedavg.group_into_silo_cohorts, _SILO_MIN_COHORTS
  else:
    group, min_cohorts = cohort_fedavg.group_into_cohorts, _WORKER_CORES
  round_input = functools.partial(
    group,
    examples=dict(train_split.clients),
    max_cohort_size=_max_cohort_size(
      config,
      manifest,
      weight_values=3 * weight_values,
      most_examples=max(train_split.clients.values()),
      epochs=training.local_epochs,
      batch_size=training.batch_size,
    ),
    min_cohorts=min_cohorts,
  )
  eval_input = functools.partial(
    group,
    examples=dict(eval_split.clients),
    max_cohort_size=_max_cohort_size(
      config,
      manifest,
      weight_values=0,
      most_examples=max(eval_split.clients.values()),
      epochs=1,
      batch_size=eval_batch_size,
    ),
    min_cohorts=min_cohorts,
  )
  return train_process, eval_process, round_input, eval_input


def _dp_arguments(
  config: config_dict.ConfigDict, dp_params: dp_parameters.DPParameters
) -> dict[str, Any]:
  """The DP aggregator's arguments; with dp.placement=secure the silos add the noise, before masking."""
  arguments = dp_params.dp_fedavg_arguments()
  if config.dp.placement == 'secure':
    arguments['noise_multiplier'] = 0.0
  return arguments


def _eval_batch_size(training: config_dict.ConfigDict) -> int:
  return max(training.batch_size, 64)


def build_experiment(
  config: config_dict.ConfigDict,
  manifest: manifest_lib.Manifest,
  *,
  keras_model_builder: keras_model.KerasModelBuilder | None = None,
) -> Experiment:
  """Builds the processes, sampling scheme and privacy settings of a run.

  Args:
    config: A config that passed `fedpipe.config.validation.validate`.
    manifest: The manifest of the clients' data (local directory or the
      union of the silos' manifests).
    keras_model_builder: Builds the model (a data scientist's own, e.g. from
      a notebook); None: the one `config.model` names (`keras_builder`).

  Returns:
    An `Experiment`.

  Raises:
    ExperimentError: If the data cannot support the config (too few clients,
      an empty client, no evaluation split).
    keras_model.ModelMismatchError: If the model does not fit the data
      (input width, number of classes) or is not an uncompiled Keras model.
    privacy_accounting.PrivacyAccountingError: If no noise multiplier reaches
      the target epsilon.
  """
  training = config.training
  if manifest.weighted:
    raise ExperimentError(
      f'the client data has the weight column {manifest.weight_column!r} (its records carry '
      'example weights w): training with example weights is not supported yet; remove '
      '"weight" from the feature spec and re-run fedpipe-preprocess to train without them'
    )
  train_split = manifest.split(manifest_lib.TRAIN_SPLIT)
  if not train_split.clients:
    raise ExperimentError('the manifest lists no training clients; check the preprocessing summary')
  empty = sorted(c for c, n in train_split.clients.items() if n <= 0)
  if empty:
    raise ExperimentError(
      f'training clients with no examples: {empty[:10]}; re-run preprocessing '
      '(data.min_examples_per_client excludes such clients)'
    )
  train_ids = sorted(train_split.clients)
  if training.clients_per_round > len(train_ids):
    raise ExperimentError(
      f'config.training.clients_per_round={training.clients_per_round} exceeds '
      f'the {len(train_ids)} training clients in the data; lower it or add clients'
    )
  eval_split = manifest.split(manifest_lib.EVAL_SPLIT)
  if not eval_split.clients:
    raise ExperimentError(
      'the manifest lists no evaluation clients; set config.data.eval_files '
      'and re-run preprocessing'
    )
  sampling = privacy_accounting.SamplingScheme(
    method=training.sampling,
    population_size=len(train_ids),
    clients_per_round=training.clients_per_round,
  )
  client_weights = [float(train_split.clients[c] * training.local_epochs) for c in train_ids]
  dp_params = _dp_parameters(config, sampling, client_weights) if config.dp.enabled else None
  label_task = manifest.label_task
  builder = keras_model_builder or keras_builder(
    config,
    num_features=manifest.num_features,
    num_classes=manifest.num_classes,
    label_task=label_task,
    feature_spec=spec_of(manifest),
  )
  keras_model.check_keras_model(
    builder,
    num_features=manifest.num_features,
    num_classes=manifest.num_classes,
    label_task=label_task,
  )
  model_fn = keras_model.build_model_fn(
    builder, num_features=manifest.num_features, seed=config.seed, label_task=label_task
  )
  train_data = client_data.make_dataset_fn(
    split=manifest_lib.TRAIN_SPLIT,
    num_features=manifest.num_features,
    batch_size=training.batch_size,
    epochs=training.local_epochs,
    storage=manifest.storage,
    label_task=label_task,
  )
  eval_data = client_data.build_dataset_computation(
    split=manifest_lib.EVAL_SPLIT,
    num_features=manifest.num_features,
    batch_size=_eval_batch_size(training),
    shuffle=False,
    storage=manifest.storage,
    label_task=label_task,
  )
  process_arguments = dict(
    client_optimizer=tff.learning.optimizers.build_sgdm(
      learning_rate=training.client_learning_rate
    ),
    server_optimizer=_server_optimizer(training),
    proximal_strength=training.proximal_strength,
    dataset_fn=train_data,
  )
  round_input: Callable[[list[str]], list[str]] = list
  eval_input: Callable[[list[str]], list[str]] = list
  engine = _engine_for(config, label_task)
  cohorts = None
  if engine == COHORT_ENGINE:
    try:
      cohorts = _cohort_processes(
        config, manifest, model_fn, builder, dp_params, process_arguments['server_optimizer']
      )
    except cohort_training.CohortNotVectorizableError as e:
      if config.runtime.engine == COHORT_ENGINE:
        raise
      _log.warning('warning: training with the per-client engine: %s', e)
      engine = PER_CLIENT_ENGINE
  if cohorts is not None:
    train_process, eval_process, round_input, eval_input = cohorts
  else:
    if dp_params is None:
      train_process = fedavg.build_fedavg_process(model_fn, **process_arguments)
    else:
      train_process = dp_fedavg.build_dp_fedavg_process(
        model_fn, **process_arguments, **_dp_arguments(config, dp_params)
      )
    eval_process = evaluation.build_federated_evaluation(model_fn, dataset_computation=eval_data)
  return Experiment(
    train_process=train_process,
    eval_process=eval_process,
    train_client_ids=train_ids,
    eval_client_ids=sorted(eval_split.clients),
    sampling=sampling,
    rounds=training.rounds,
    privacy=(
      _privacy_settings(
        dp_params,
        config,
        _trainable_values(builder) if config.dp.placement == 'secure' else 0,
        train_ids,
        engine,
      )
      if dp_params is not None
      else None
    ),
    num_features=manifest.num_features,
    num_classes=manifest.num_classes,
    keras_model_builder=builder,
    round_input=round_input,
    eval_input=eval_input,
    engine=engine,
    label_task=label_task,
  )


def spec_of(manifest: manifest_lib.Manifest) -> feature_spec_lib.FeatureSpec | None:
  """The feature spec the manifest embeds, or None if it holds no valid spec (a hand-written one)."""
  try:
    return feature_spec_lib.FeatureSpec.from_json(manifest.feature_spec, source='manifest')
  except feature_spec_lib.FeatureSpecError:
    return None

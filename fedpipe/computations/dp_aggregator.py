"""User-level DP aggregation of *weighted* client updates (DP-FedAvg).

TFF's `tff.aggregators.DifferentiallyPrivateFactory` is unweighted: wrapped
around weighted FedAvg as-is, a client's weight (its example count) would
scale its clipped update without bound, and the division by the realized
total weight would make the sensitivity data-dependent. This module builds the
fixed-denominator estimator of McMahan et al. (2018) instead:

    w_k   = min(n_k / weight_cap, 1)                 (capped weight)
    Δ     = (Σ_k w_k · clip(Δ_k, S) + N(0, σ² S² I)) / W_expected

where `W_expected` is the expected total capped weight of a round (sampling
rate times the sum over the population), fixed before training. Adding or
removing one client changes the noise-free sum by at most S, so the Gaussian
mechanism's noise multiplier σ gives user-level (ε, δ) through the accountant.

Clipping is fixed, or adaptive (Andrew et al. 2021): the clip norm follows a
privately estimated quantile of the *unweighted* update norms. The Gaussian
sum and quantile estimation come from TensorFlow Privacy; this module only
changes what a record is (an update and its capped weight) and how it is
turned into a summand.

References:
  McMahan, Ramage, Talwar, Zhang. Learning Differentially Private Recurrent
  Language Models. ICLR 2018. https://arxiv.org/abs/1710.06963
  Andrew, Thakkar, McMahan, Ramaswamy. Differentially Private Learning with
  Adaptive Clipping. NeurIPS 2021. https://arxiv.org/abs/1905.03871
"""

from __future__ import annotations

import collections

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
import tensorflow_privacy as tfp

from fedpipe.errors import FedpipeError

_UPDATE = 'update'
_WEIGHT = 'weight'


class DPAggregatorConfigError(FedpipeError, ValueError):
  """A DP aggregator parameter is out of its valid range."""


def _check_positive(value: float, name: str) -> float:
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
    raise DPAggregatorConfigError(f'{name} must be a positive number, got {value!r}')
  return float(value)


def _check_nonnegative(value: float, name: str) -> float:
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
    raise DPAggregatorConfigError(f'{name} must be a non-negative number, got {value!r}')
  return float(value)


class CappedWeightSumQuery(tfp.SumAggregationDPQuery):
  """A DP sum query whose records are `{update, weight}` with `weight` in [0, 1].

  The update is clipped by the wrapped query (fixed or adaptive), then scaled
  by its weight, so each summand's norm is at most the clip norm. Noise,
  clip-norm adaptation and the DP event are the wrapped query's.
  """

  def __init__(
    self,
    sum_query: tfp.GaussianSumQuery | tfp.QuantileAdaptiveClipSumQuery,
  ):
    if not isinstance(sum_query, (tfp.GaussianSumQuery, tfp.QuantileAdaptiveClipSumQuery)):
      raise TypeError(f'unsupported sum query: {type(sum_query).__name__}')
    self._sum_query = sum_query

  def initial_global_state(self):
    return self._sum_query.initial_global_state()

  def derive_sample_params(self, global_state):
    return self._sum_query.derive_sample_params(global_state)

  def initial_sample_state(self, template=None):
    return self._sum_query.initial_sample_state(template[_UPDATE])

  def preprocess_record(self, params, record):
    weight = record[_WEIGHT]
    preprocessed = self._sum_query.preprocess_record(params, record[_UPDATE])

    def scale(clipped):
      return tf.nest.map_structure(lambda t: t * tf.cast(weight, t.dtype), clipped)

    if isinstance(self._sum_query, tfp.QuantileAdaptiveClipSumQuery):
      # The quantile estimate stays on the unweighted norms (Andrew et al.).
      return preprocessed._replace(sum_state=scale(preprocessed.sum_state))
    return scale(preprocessed)

  def get_noised_result(self, sample_state, global_state):
    return self._sum_query.get_noised_result(sample_state, global_state)

  def derive_metrics(self, global_state):
    return self._sum_query.derive_metrics(global_state)


class CappedWeightDPFactory(tff.aggregators.WeightedAggregationFactory):
  """Weighted DP mean with capped client weights and a fixed denominator.

  Build it with `gaussian_fixed` or `gaussian_adaptive`. The created process
  has the type signature of a weighted aggregator,
  `(<S@SERVER, {V}@CLIENTS, {float32}@CLIENTS> -> <S@SERVER, V@SERVER, M@SERVER>)`,
  so it plugs into `tff.learning.algorithms.build_weighted_fed_avg(model_aggregator=...)`.
  """

  def __init__(
    self,
    query: tfp.SumAggregationDPQuery,
    *,
    weight_cap: float,
    expected_total_weight: float,
  ):
    """Use `gaussian_fixed` or `gaussian_adaptive` instead."""
    self._weight_cap = _check_positive(weight_cap, 'weight_cap')
    self._expected_total_weight = _check_positive(expected_total_weight, 'expected_total_weight')
    self._sum_query = query
    self._query = tfp.NormalizedQuery(
      CappedWeightSumQuery(query), denominator=self._expected_total_weight
    )

  @property
  def weight_cap(self) -> float:
    return self._weight_cap

  @property
  def query(self) -> tfp.DPQuery:
    """The DP query: records `{update, weight}`, noised sum over `expected_total_weight`."""
    return self._query

  @property
  def adaptive(self) -> bool:
    """Whether the clip norm follows a private quantile (`gaussian_adaptive`)."""
    return isinstance(self._sum_query, tfp.QuantileAdaptiveClipSumQuery)

  @property
  def expected_total_weight(self) -> float:
    return self._expected_total_weight

  @classmethod
  def gaussian_fixed(
    cls,
    *,
    noise_multiplier: float,
    clip_norm: float,
    weight_cap: float,
    expected_total_weight: float,
  ) -> CappedWeightDPFactory:
    """Fixed clipping at `clip_norm`, Gaussian noise of stddev `noise_multiplier * clip_norm`.

    Args:
      noise_multiplier: Ratio of the noise stddev to the clip norm (≥ 0).
      clip_norm: L2 norm each client update is clipped to (> 0).
      weight_cap: Client weight (examples in its round) at which its capped
        weight reaches 1 (> 0).
      expected_total_weight: Expected sum of capped weights in a round: the
        fixed denominator (> 0).

    Returns:
      A `CappedWeightDPFactory`.

    Raises:
      DPAggregatorConfigError: If a parameter is out of range.
    """
    noise_multiplier = _check_nonnegative(noise_multiplier, 'noise_multiplier')
    clip_norm = _check_positive(clip_norm, 'clip_norm')
    query = tfp.GaussianSumQuery(l2_norm_clip=clip_norm, stddev=clip_norm * noise_multiplier)
    return cls(query, weight_cap=weight_cap, expected_total_weight=expected_total_weight)

  @classmethod
  def gaussian_adaptive(
    cls,
    *,
    noise_multiplier: float,
    expected_clients_per_round: float,
    weight_cap: float,
    expected_total_weight: float,
    initial_clip_norm: float = 0.1,
    target_unclipped_quantile: float = 0.5,
    learning_rate: float = 0.2,
    clipped_count_stddev: float | None = None,
  ) -> CappedWeightDPFactory:
    """Adaptive clipping to a private quantile of the update norms.

    `noise_multiplier` is the effective total: part of the privacy budget goes
    to the noisy clipped-count, so the update noise is slightly larger (the
    split is TFF's `adaptive_clip_noise_params`).

    Args:
      noise_multiplier: Effective noise multiplier of the whole mechanism.
      expected_clients_per_round: Expected number of clients a round (> 0).
      weight_cap: See `gaussian_fixed`.
      expected_total_weight: See `gaussian_fixed`.
      initial_clip_norm: Starting clip norm (> 0).
      target_unclipped_quantile: Fraction of updates to leave unclipped.
      learning_rate: Geometric learning rate of the clip norm.
      clipped_count_stddev: Noise stddev of the clipped count; default
        `0.05 * expected_clients_per_round`.

    Returns:
      A `CappedWeightDPFactory`.

    Raises:
      DPAggregatorConfigError: If a parameter is out of range.
    """
    noise_multiplier = _check_nonnegative(noise_multiplier, 'noise_multiplier')
    expected_clients_per_round = _check_positive(
      expected_clients_per_round, 'expected_clients_per_round'
    )
    initial_clip_norm = _check_positive(initial_clip_norm, 'initial_clip_norm')
    if not 0.0 <= target_unclipped_quantile <= 1.0:
      raise DPAggregatorConfigError(
        f'target_unclipped_quantile must be in [0, 1], got {target_unclipped_quantile!r}'
      )
    learning_rate = _check_nonnegative(learning_rate, 'learning_rate')
    if clipped_count_stddev is not None:
      clipped_count_stddev = _check_nonnegative(clipped_count_stddev, 'clipped_count_stddev')
    try:
      value_noise_multiplier, clipped_count_stddev = (
        tff.aggregators.differential_privacy.adaptive_clip_noise_params(
          noise_multiplier, expected_clients_per_round, clipped_count_stddev
        )
      )
    except ValueError as e:
      raise DPAggregatorConfigError(
        f'adaptive clipping cannot reach noise_multiplier={noise_multiplier} '
        f'with {expected_clients_per_round:g} expected clients per round: {e}'
      ) from e
    query = tfp.QuantileAdaptiveClipSumQuery(
      initial_l2_norm_clip=initial_clip_norm,
      noise_multiplier=value_noise_multiplier,
      target_unclipped_quantile=float(target_unclipped_quantile),
      learning_rate=learning_rate,
      clipped_count_stddev=clipped_count_stddev,
      expected_num_records=expected_clients_per_round,
      geometric_update=True,
    )
    return cls(query, weight_cap=weight_cap, expected_total_weight=expected_total_weight)

  def create(
    self,
    value_type: tff.types.TensorType | tff.StructType,
    weight_type: tff.types.TensorType,
  ) -> tff.templates.AggregationProcess:
    record_type = tff.StructWithPythonType(
      [(_UPDATE, value_type), (_WEIGHT, np.float32)], collections.OrderedDict
    )
    inner = tff.aggregators.DifferentiallyPrivateFactory(self._query).create(record_type)
    weight_cap = self._weight_cap

    @tff.tensorflow.computation(value_type, weight_type)
    def make_record(update, weight):
      capped = tf.minimum(tf.cast(weight, tf.float32) / weight_cap, 1.0)
      return collections.OrderedDict([(_UPDATE, update), (_WEIGHT, capped)])

    @tff.federated_computation(
      inner.initialize.type_signature.result,
      tff.FederatedType(value_type, tff.CLIENTS),
      tff.FederatedType(weight_type, tff.CLIENTS),
    )
    def next_fn(state, value, weight):
      records = tff.federated_map(make_record, (value, weight))
      return inner.next(state, records)

    return tff.templates.AggregationProcess(inner.initialize, next_fn)

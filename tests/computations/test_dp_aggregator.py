"""The capped-weight DP aggregator bounds one client's influence, as DP needs."""

import itertools

import numpy as np
import pytest
import tensorflow_federated as tff

from fedpipe.computations import dp_aggregator

VALUE_TYPE = tff.TensorType(np.float32, [4])
WEIGHT_TYPE = tff.TensorType(np.float32)
CLIP = 1.0
CAP = 10.0
DENOMINATOR = 3.0


def _fixed(noise_multiplier=0.0):
  return dp_aggregator.CappedWeightDPFactory.gaussian_fixed(
    noise_multiplier=noise_multiplier,
    clip_norm=CLIP,
    weight_cap=CAP,
    expected_total_weight=DENOMINATOR,
  )


def _adaptive(noise_multiplier=0.0):
  return dp_aggregator.CappedWeightDPFactory.gaussian_adaptive(
    noise_multiplier=noise_multiplier,
    expected_clients_per_round=5.0,
    weight_cap=CAP,
    expected_total_weight=DENOMINATOR,
    initial_clip_norm=CLIP,
  )


def _adversarial_clients(rng, n=6):
  """Updates from tiny to huge norms, weights from far below to far above the cap."""
  values = [rng.normal(size=4).astype(np.float32) * scale for scale in np.geomspace(1e-3, 1e4, n)]
  weights = [float(w) for w in np.geomspace(0.5, 1e6, n)]
  rng.shuffle(weights)
  return values, weights


class TestTypeSignature:
  def test_is_a_weighted_aggregator(self):
    process = _fixed().create(VALUE_TYPE, WEIGHT_TYPE)
    params = process.next.type_signature.parameter
    assert params[1] == tff.FederatedType(VALUE_TYPE, tff.CLIENTS)
    assert params[2] == tff.FederatedType(WEIGHT_TYPE, tff.CLIENTS)
    assert process.next.type_signature.result.result == tff.FederatedType(VALUE_TYPE, tff.SERVER)

  @pytest.mark.parametrize(
    'name,kwargs',
    [
      ('noise', dict(noise_multiplier=-1.0, clip_norm=1.0)),
      ('clip', dict(noise_multiplier=1.0, clip_norm=0.0)),
      ('cap', dict(noise_multiplier=1.0, clip_norm=1.0, weight_cap=0.0)),
    ],
  )
  def test_rejects_out_of_range_parameters_by_name(self, name, kwargs):
    args = dict(weight_cap=1.0, expected_total_weight=1.0)
    args.update(kwargs)
    with pytest.raises(dp_aggregator.DPAggregatorConfigError, match=name):
      dp_aggregator.CappedWeightDPFactory.gaussian_fixed(**args)

  def test_adaptive_rejects_too_few_clients_for_the_noise(self):
    with pytest.raises(dp_aggregator.DPAggregatorConfigError, match='expected clients'):
      dp_aggregator.CappedWeightDPFactory.gaussian_adaptive(
        noise_multiplier=5.0,
        expected_clients_per_round=2.0,
        weight_cap=1.0,
        expected_total_weight=1.0,
      )


@pytest.mark.slow
@pytest.mark.usefixtures('tff_worker')
class TestExecution:
  def test_computes_capped_weighted_sum_over_fixed_denominator(self):
    process = _fixed().create(VALUE_TYPE, WEIGHT_TYPE)
    values = [
      np.array([3, 4, 0, 0], np.float32),  # norm 5 -> clipped to 1
      np.array([0.1, 0, 0, 0], np.float32),
    ]
    weights = [5.0, 1000.0]  # capped to 0.5 and 1
    out = process.next(process.initialize(), values, weights)
    expected = (0.5 * np.array([0.6, 0.8, 0, 0]) + np.array([0.1, 0, 0, 0])) / DENOMINATOR
    np.testing.assert_allclose(out.result, expected, rtol=1e-5, atol=1e-7)

  @pytest.mark.parametrize('factory', [_fixed, _adaptive], ids=['fixed', 'adaptive'])
  def test_removing_one_client_moves_the_sum_by_at_most_the_clip(self, factory):
    """Empirical sensitivity: |sum(D) - sum(D \\ {k})| <= clip, for every k."""
    process = factory().create(VALUE_TYPE, WEIGHT_TYPE)
    state = process.initialize()
    rng = np.random.default_rng(7)
    worst = 0.0
    for _ in range(3):
      values, weights = _adversarial_clients(rng)
      full = process.next(state, values, weights).result * DENOMINATOR
      for k in range(len(values)):
        rest_v = values[:k] + values[k + 1 :]
        rest_w = weights[:k] + weights[k + 1 :]
        without = process.next(state, rest_v, rest_w).result * DENOMINATOR
        worst = max(worst, float(np.linalg.norm(full - without)))
    assert worst <= CLIP * (1 + 1e-5)
    # The bound is reached by a huge update from a client above the cap.
    assert worst >= 0.99 * CLIP

  def test_plain_weighted_mean_has_no_such_bound(self):
    """The property above is not vacuous: TFF's weighted mean violates it."""
    process = tff.aggregators.MeanFactory().create(VALUE_TYPE, WEIGHT_TYPE)
    state = process.initialize()
    values, weights = _adversarial_clients(np.random.default_rng(7))
    full = process.next(state, values, weights).result
    moves = [
      np.linalg.norm(
        full
        - process.next(state, values[:k] + values[k + 1 :], weights[:k] + weights[k + 1 :]).result
      )
      for k in range(len(values))
    ]
    assert max(moves) > 10 * CLIP / DENOMINATOR

  def test_noise_has_the_configured_scale(self):
    """Std of the output noise is z*clip/denominator (flake rate < 1e-6)."""
    z = 2.0
    process = _fixed(noise_multiplier=z).create(tff.TensorType(np.float32, [20000]), WEIGHT_TYPE)
    out = process.next(process.initialize(), [np.zeros(20000, np.float32)], [1.0])
    expected = z * CLIP / DENOMINATOR
    # 20000 samples: the sample std is within 5% of the truth with p > 1-1e-6.
    assert abs(np.std(out.result) - expected) < 0.05 * expected

  def test_adaptive_clip_moves_towards_the_median_norm(self):
    process = _adaptive().create(VALUE_TYPE, WEIGHT_TYPE)
    state = process.initialize()
    values = [np.array([0.01, 0, 0, 0], np.float32)] * 5
    clips = []
    for _ in range(5):
      out = process.next(state, values, [1.0] * 5)
      state = out.state
      clips.append(float(out.measurements['dp_query_metrics']['clip']))
    assert all(a > b for a, b in itertools.pairwise(clips))
    assert clips[-1] < CLIP

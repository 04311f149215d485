"""DP-FedAvg's parameters follow from the client counts and the sampling plan as documented."""

import statistics

import numpy as np
import pytest

from fedpipe.computations import dp_parameters as dpp
from fedpipe.computations import privacy_accounting as pa
from fedpipe.errors import FedpipeError

COUNTS = [3, 5, 8, 8, 20, 40]  # Median 8.


def _derive(**overrides):
  args = dict(
    client_example_counts=COUNTS, clients_per_round=3, noise_multiplier=1.0, clip_norm=0.5
  )
  args.update(overrides)
  return dpp.derive_dp_parameters(**args)


def test_cap_is_the_median_weight_and_the_denominator_the_expected_capped_weight():
  params = _derive()
  assert params.weight_cap == 8.0
  # Rate 3/6 times the capped weights 3/8, 5/8, 1, 1, 1, 1.
  assert params.expected_total_weight == pytest.approx(0.5 * (3 / 8 + 5 / 8 + 4))
  assert params.sampling == pa.SamplingScheme('poisson', 6, 3)
  assert params.expected_clients_per_round == 3.0
  assert (params.clipping, params.clip_norm, params.adaptive_clipping) == ('fixed', 0.5, None)
  assert (params.noise_multiplier, params.delta, params.accountant) == (1.0, 1e-5, 'rdp')


def test_local_epochs_scale_the_weights_and_a_given_cap_is_kept():
  params = _derive(local_epochs=2)
  assert params.weight_cap == 16.0
  assert params.expected_total_weight == pytest.approx(_derive().expected_total_weight)
  capped = _derive(weight_cap=100.0)
  assert capped.weight_cap == 100.0
  assert capped.expected_total_weight == pytest.approx(0.5 * sum(COUNTS) / 100)


def test_matches_the_formula_on_a_large_uneven_population():
  counts = list(np.random.default_rng(0).integers(1, 200, size=1001))
  params = dpp.derive_dp_parameters(
    client_example_counts=counts,
    clients_per_round=50,
    sampling='fixed_size',
    noise_multiplier=0.0,
    clip_norm=1.0,
  )
  cap = statistics.median(counts)
  assert params.weight_cap == cap
  expected = 50 / 1001 * sum(min(n / cap, 1.0) for n in counts)
  assert params.expected_total_weight == pytest.approx(expected, rel=1e-12)


def test_target_epsilon_calibrates_the_noise_to_the_accountant():
  params = dpp.derive_dp_parameters(
    client_example_counts=[10] * 300,
    clients_per_round=60,
    target_epsilon=6.0,
    rounds=100,
    clip_norm=0.3,
  )
  assert params.target_epsilon == 6.0 and params.rounds == 100
  epsilon = pa.compute_epsilon(
    noise_multiplier=params.noise_multiplier, sampling=params.sampling, rounds=100, delta=1e-5
  )
  assert epsilon <= 6.0
  assert epsilon > 5.5  # The smallest such noise: not far below the target.


def test_adaptive_clipping_resolves_tffs_default_clipped_count_stddev():
  params = _derive(
    clip_norm=None,
    adaptive_clipping=dpp.AdaptiveClipping(),
    clients_per_round=6,
    noise_multiplier=0.5,  # Below 2 * 0.05 * 6.
  )
  assert params.clipping == 'adaptive' and params.clip_norm is None
  assert params.adaptive_clipping.clipped_count_stddev == pytest.approx(0.05 * 6)
  quiet = _derive(clip_norm=None, adaptive_clipping=dpp.AdaptiveClipping(), noise_multiplier=0.0)
  assert quiet.adaptive_clipping.clipped_count_stddev == 0.0


def test_adaptive_clipping_with_too_few_clients_for_the_noise_is_refused_with_the_fix():
  with pytest.raises(dpp.DPParametersError, match='increase `clipped_count_stddev`'):
    _derive(clip_norm=None, adaptive_clipping=dpp.AdaptiveClipping(), noise_multiplier=2.0)


def test_dp_fedavg_arguments_name_every_dp_argument_of_the_builder():
  import inspect

  from fedpipe.computations import dp_fedavg

  builder = inspect.signature(dp_fedavg.build_dp_fedavg_process).parameters
  arguments = _derive().dp_fedavg_arguments()
  assert set(arguments) <= set(builder)
  assert {'noise_multiplier', 'weight_cap', 'expected_total_weight', 'clip_norm'} <= set(arguments)


@pytest.mark.parametrize(
  'overrides,match',
  [
    (dict(client_example_counts=[]), 'empty'),
    (dict(client_example_counts=[3, 0, 5]), r'client_example_counts\[1\]'),
    (dict(local_epochs=0), 'local_epochs'),
    (dict(target_epsilon=3.0), 'exactly one of noise_multiplier and target_epsilon'),
    (dict(noise_multiplier=None), 'exactly one of noise_multiplier and target_epsilon'),
    (dict(adaptive_clipping=dpp.AdaptiveClipping()), 'exactly one of clip_norm'),
    (dict(clip_norm=None), 'exactly one of clip_norm'),
    (dict(clip_norm=-1.0), 'clip_norm'),
    (dict(noise_multiplier=-1.0), 'noise_multiplier'),
    (dict(delta=1.0), 'delta'),
    (dict(weight_cap=0.0), 'weight_cap'),
    (dict(noise_multiplier=None, target_epsilon=3.0), 'rounds'),
  ],
)
def test_out_of_range_arguments_are_named(overrides, match):
  with pytest.raises(dpp.DPParametersError, match=match) as raised:
    _derive(**overrides)
  assert isinstance(raised.value, FedpipeError) and isinstance(raised.value, ValueError)


def test_sampling_the_accountant_cannot_analyse_is_refused_before_any_work():
  with pytest.raises(pa.PrivacyAccountingError, match='pld'):
    _derive(sampling='fixed_size', accountant='pld')
  with pytest.raises(pa.PrivacyAccountingError, match='clients_per_round'):
    _derive(clients_per_round=7)


@pytest.mark.parametrize(
  'settings',
  [
    dict(initial_clip_norm=0.0),
    dict(target_unclipped_quantile=1.5),
    dict(learning_rate=-0.1),
    dict(clipped_count_stddev=-1.0),
  ],
)
def test_adaptive_settings_out_of_range_are_refused(settings):
  with pytest.raises(dpp.DPParametersError, match=next(iter(settings))):
    dpp.AdaptiveClipping(**settings)

"""ε of the distributed discrete Gaussian: Prop. 14 of Kairouz et al., Zhu-Wang subsampling."""

import dataclasses
import math

import dp_accounting
import numpy as np
import pytest

from fedpipe.computations import distributed_dp_accounting as dda
from fedpipe.errors import FedpipeError

ORDERS = dda.RDP_ORDERS
# The digits demo's MLP: 64 -> 64 -> 10, weights and biases.
DEMO_DIM = 64 * 64 + 64 + 64 * 10 + 10
DEMO = {'sampling_rate': 0.2, 'rounds': 100, 'delta': 1e-5}


def prop14_by_hand(alpha, l2_sens, l1_sens, local_stddev, num_shares, dim):
  """Eq. 17 of arXiv 2102.06387 for one order, in plain floats; (value, index of the min term)."""
  sigma = math.sqrt(num_shares * local_stddev**2)
  l2, l1 = l2_sens / sigma, l1_sens / sigma
  tau = 0.0
  for k in range(1, num_shares):
    tau += math.exp(-2 * math.pi**2 * local_stddev**2 * k / (k + 1))
  tau *= 10
  terms = [
    alpha / 2 * l2**2 + tau * dim,
    alpha / 2 * (l2**2 + 2 * l1 * tau + tau**2 * dim),
    alpha / 2 * (l2 + math.sqrt(dim) * tau) ** 2,
  ]
  return min(terms), terms.index(min(terms))


def exact_sampled_gaussian_rdp(noise_multiplier, sampling_rate):
  acc = dp_accounting.rdp.RdpAccountant(orders=list(ORDERS))
  acc.compose(
    dp_accounting.PoissonSampledDpEvent(
      sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
    )
  )
  return acc.rdp


def gaussian_curve(noise_multiplier):
  return lambda alpha: alpha / (2 * noise_multiplier**2)


def test_rounded_sensitivity_adds_the_rounding_error_norm():
  l2, l1 = dda.rounded_sensitivity(1.0, 1000.0, 400)
  assert l2 == pytest.approx(1000.0 + 20.0)
  assert l1 == pytest.approx(min(20.0 * 1020.0, 1020.0**2))
  l2, l1 = dda.rounded_sensitivity(0.5, 2.0, 9)
  assert (l2, l1) == pytest.approx((4.0, 12.0))


PROP14_CASES = [
  # (l2 sensitivity, l1 sensitivity, local stddev, shares, dim)
  (3.0, 9.0, 0.5, 4, 50),  # Large tau: the first term.
  (2.0, 4.0, 0.7, 2, 1000),  # The second term at small orders, the first at large.
  (5.0, 25.0, 1.2, 8, 4810),
  (1.0, 1000.0, 1.0, 3, 10_000),  # Huge l1: the third term at order 2.
  (1020.0, 1020.0 * 20.0, 300.0, 3, 400),  # Negligible tau.
]


@pytest.mark.parametrize('case', PROP14_CASES)
def test_prop14_curve_matches_an_independent_recomputation(case):
  l2_sens, l1_sens, local_stddev, num_shares, dim = case
  orders = [2, 3, 5, 10, 32, 100, 256]
  ours = dda.discrete_gaussian_sum_rdp(
    orders,
    l2_sensitivity=l2_sens,
    l1_sensitivity=l1_sens,
    local_stddev=local_stddev,
    num_shares=num_shares,
    dim=dim,
  )
  expected = [prop14_by_hand(a, *case)[0] for a in orders]
  np.testing.assert_allclose(ours, expected, rtol=1e-12)


def test_prop14_cases_exercise_every_term():
  winners = {
    prop14_by_hand(a, *case)[1] for case in PROP14_CASES for a in [2, 3, 5, 10, 32, 100, 256]
  }
  assert winners == {0, 1, 2}


def test_one_share_is_the_discrete_gaussian_alpha_l2_squared_over_two():
  orders = np.array(ORDERS, dtype=float)
  curve = dda.discrete_gaussian_sum_rdp(
    ORDERS, l2_sensitivity=3.0, l1_sensitivity=9.0, local_stddev=0.4, num_shares=1, dim=50
  )
  np.testing.assert_allclose(curve, orders * (3.0 / 0.4) ** 2 / 2, rtol=1e-12)


def test_many_small_shares_cost_more_than_one_share_of_the_same_variance():
  # tau > 0: a sum of discrete Gaussians is not a discrete Gaussian.
  many = dda.discrete_gaussian_sum_rdp(
    ORDERS, l2_sensitivity=3.0, l1_sensitivity=9.0, local_stddev=0.5, num_shares=4, dim=50
  )
  one = dda.discrete_gaussian_sum_rdp(
    ORDERS, l2_sensitivity=3.0, l1_sensitivity=9.0, local_stddev=1.0, num_shares=1, dim=50
  )
  assert np.all(many > one)


def zhu_wang_by_hand(alpha, gamma, eps):
  """Zhu and Wang (2019), Theorem 5, summed directly in floats (fine for small orders)."""
  total = (1 - gamma) ** (alpha - 1) * (alpha * gamma - gamma + 1)
  total += math.comb(alpha, 2) * gamma**2 * (1 - gamma) ** (alpha - 2) * math.exp(eps(2))
  for ell in range(3, alpha + 1):
    total += (
      3
      * math.comb(alpha, ell)
      * (1 - gamma) ** (alpha - ell)
      * gamma**ell
      * math.exp((ell - 1) * eps(ell))
    )
  return min(math.log(total) / (alpha - 1), eps(alpha))


@pytest.mark.parametrize(
  ('noise_multiplier', 'sampling_rate'), [(1.0, 0.01), (1.5, 0.2), (3.0, 0.5)]
)
def test_subsampled_rdp_matches_the_theorem_summed_directly(noise_multiplier, sampling_rate):
  orders = list(range(2, 31))
  curve = gaussian_curve(noise_multiplier)
  ours = dda.poisson_subsampled_rdp(orders, sampling_rate, curve)
  expected = [zhu_wang_by_hand(a, sampling_rate, curve) for a in orders]
  np.testing.assert_allclose(ours, expected, rtol=1e-9)


def test_subsampling_at_rate_one_leaves_the_curve_unchanged():
  curve = gaussian_curve(0.8)
  np.testing.assert_array_equal(
    dda.poisson_subsampled_rdp(ORDERS, 1.0, curve), [curve(a) for a in ORDERS]
  )


def test_subsampling_at_a_tiny_rate_shrinks_the_curve():
  curve = gaussian_curve(1.0)
  # Roughly q^2 * C(alpha, 2) * (e^eps(2) - 1) / (alpha - 1) at low orders; at
  # high ones the gamma^l * e^((l-1) eps(l)) terms win and amplification fades.
  low_orders = [a for a in ORDERS if a <= 12]
  sampled = dda.poisson_subsampled_rdp(low_orders, 1e-3, curve)
  assert np.all(sampled < 1e-4 * np.array([curve(a) for a in low_orders]))


@pytest.mark.parametrize('noise_multiplier', [0.5, 1.0, 2.0])
def test_subsampled_rdp_grows_with_the_sampling_rate(noise_multiplier):
  rates = [1e-4, 1e-3, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0]
  rows = np.array(
    [dda.poisson_subsampled_rdp(ORDERS, q, gaussian_curve(noise_multiplier)) for q in rates]
  )
  assert np.all(np.isfinite(rows))  # Log space: (l - 1) * eps(l) reaches 1e5 at order 256.
  assert np.all(np.diff(rows, axis=0) >= -1e-12)


@pytest.mark.parametrize(
  ('noise_multiplier', 'sampling_rate'), [(0.7, 0.01), (1.0, 0.1), (1.0, 0.2), (2.0, 0.05)]
)
def test_zhu_wang_bound_is_an_upper_bound_on_the_exact_sampled_gaussian(
  noise_multiplier, sampling_rate
):
  bound = dda.poisson_subsampled_rdp(ORDERS, sampling_rate, gaussian_curve(noise_multiplier))
  exact = exact_sampled_gaussian_rdp(noise_multiplier, sampling_rate)
  assert np.all(bound >= exact * (1 - 1e-9)), ORDERS[int(np.argmin(bound - exact))]
  assert bound[0] == pytest.approx(exact[0], rel=1e-9)  # Order 2: the bound is exact.


def test_zhu_wang_bound_is_within_2x_where_epsilon_is_attained():
  bound = dda.poisson_subsampled_rdp(ORDERS, 0.1, gaussian_curve(1.0))
  exact = exact_sampled_gaussian_rdp(1.0, 0.1)
  for rdp in (bound, exact):
    _, order = dp_accounting.rdp.compute_epsilon(ORDERS, 100 * rdp, 1e-5)
    i = ORDERS.index(order)
    assert bound[i] <= 2 * exact[i], (order, bound[i], exact[i])


def test_orders_must_be_integers_for_subsampling():
  with pytest.raises(dda.DistributedDPAccountingError, match='orders'):
    dda.poisson_subsampled_rdp([2, 2.5, 3], 0.1, gaussian_curve(1.0))
  with pytest.raises(dda.DistributedDPAccountingError, match='orders'):
    dda.poisson_subsampled_rdp([1.5], 0.1, gaussian_curve(1.0))


def demo_mechanism(scale, max_colluding, noise_multiplier=1.0):
  return dda.DistributedDiscreteGaussian(
    l2_clip=1.0,
    scale=scale,
    dim=DEMO_DIM,
    total_stddev=noise_multiplier * 1.0 * scale,
    num_silos=3,
    max_colluding=max_colluding,
  )


@pytest.mark.parametrize(
  ('noise_multiplier', 'sampling_rate'), [(0.7, 0.01), (1.0, 0.1), (1.9, 0.2), (3.0, 0.5)]
)
def test_the_tight_bound_is_the_exact_sampled_gaussian_for_the_gaussian(
  noise_multiplier, sampling_rate
):
  """Theorem 8's expansion with the Gaussian's curve is Mironov et al.'s exact value."""
  tight = dda.poisson_subsampled_rdp(
    ORDERS, sampling_rate, gaussian_curve(noise_multiplier), symmetric_pairs=True
  )
  exact = exact_sampled_gaussian_rdp(noise_multiplier, sampling_rate)
  np.testing.assert_allclose(tight, exact, rtol=1e-9)


def _log_pmf_of_summed_discrete_gaussians(sigma, shares, support):
  """The exact log pmf, on `support`, of a sum of `shares` N_Z(0, sigma^2) draws."""
  from scipy import special

  z = np.arange(-support, support + 1)
  one = np.exp(-(z**2) / (2 * sigma**2) - special.logsumexp(-(z**2) / (2 * sigma**2)))
  pmf = one
  for _ in range(shares - 1):
    pmf = np.convolve(pmf, one)
  return pmf


@pytest.mark.parametrize(('sigma', 'shift'), [(0.5, 1), (1.0, 2), (2.0, 3)])
def test_the_tight_bound_holds_for_exactly_computed_sums_of_discrete_gaussians(sigma, shift):
  """Both directions of the sampled pair, computed exactly, stay under Theorem 8's
  expansion of their own exact RDP curve, and odd Pearson-Vajda values are >= 0
  (`SYMMETRIC_PAIRS_ARGUMENT`)."""
  from scipy import special

  pmf = _log_pmf_of_summed_discrete_gaussians(sigma, 2, 60)
  p = pmf[shift:-shift]  # Noise, and the same noise shifted by `shift`.
  q = pmf[: -2 * shift]
  keep = (p > 1e-280) & (q > 1e-280)
  log_p, log_q = np.log(p[keep]), np.log(q[keep])

  def rdp(alpha, log_a, log_b):  # D_alpha(A || B)
    return special.logsumexp(alpha * log_a + (1 - alpha) * log_b) / (alpha - 1)

  orders = list(range(2, 25))
  curve = {a: max(rdp(a, log_q, log_p), rdp(a, log_p, log_q)) for a in orders}

  def odd_pearson_vajda_is_nonnegative(ell, log_a, log_b):  # E_B[(A/B - 1)^ell], in logs
    log_ratio = log_a - log_b
    away = log_ratio != 0
    log_terms = log_b[away] + ell * np.log(np.abs(np.expm1(log_ratio[away])))
    above = log_ratio[away] > 0
    return special.logsumexp(log_terms[above]) >= special.logsumexp(log_terms[~above])

  for ell in range(3, 25, 2):
    assert odd_pearson_vajda_is_nonnegative(ell, log_q, log_p), ell
    assert odd_pearson_vajda_is_nonnegative(ell, log_p, log_q), ell
  for rate in (0.05, 0.2, 0.5):
    bound = dda.poisson_subsampled_rdp(orders, rate, curve.__getitem__, symmetric_pairs=True)
    log_mix = np.logaddexp(math.log1p(-rate) + log_p, math.log(rate) + log_q)
    for i, alpha in enumerate(orders):
      add = rdp(alpha, log_mix, log_p)
      remove = rdp(alpha, log_p, log_mix)
      assert max(add, remove) <= bound[i] * (1 + 1e-9) + 1e-12, (rate, alpha, add, remove)
      assert add == pytest.approx(bound[i], rel=1e-6, abs=1e-12) or bound[i] == curve[alpha]


# The digits demo: clip 0.3, scale 2^16 (dp.secure_scale), q = 60/300, 100 rounds.
@pytest.mark.parametrize('noise_multiplier', [1.0, 1.9, 2.3])
@pytest.mark.parametrize('max_colluding', [0, 1])
def test_demo_epsilon_is_within_10_percent_of_the_continuous_gaussian(
  noise_multiplier, max_colluding
):
  mechanism = dda.DistributedDiscreteGaussian(
    l2_clip=0.3,
    scale=2.0**16,
    dim=DEMO_DIM,
    total_stddev=noise_multiplier * 0.3 * 2.0**16,
    num_silos=3,
    max_colluding=max_colluding,
  )
  ddg = dda.compute_epsilon(mechanism, **DEMO)
  gaussian = dda.gaussian_epsilon_at_integer_orders(noise_multiplier, **DEMO)
  # Only rounding separates them: it adds sqrt(d) to the L2 sensitivity, 0.35% here.
  assert gaussian <= ddg <= 1.1 * gaussian, f'DDG eps={ddg:.4f}, Gaussian eps={gaussian:.4f}'
  assert ddg <= 1.01 * gaussian


def test_a_scale_too_small_for_the_rounding_raises_epsilon():
  # l2_clip * scale = 64 < sqrt(4810): rounding doubles the L2 sensitivity.
  fine = dda.compute_epsilon(demo_mechanism(2.0**12, 0), **DEMO)
  coarse = dda.compute_epsilon(demo_mechanism(2.0**6, 0), **DEMO)
  assert coarse > 3 * fine, f'coarse eps={coarse:.2f}, fine eps={fine:.2f}'


@pytest.mark.parametrize(('noise_multiplier', 'sampling_rate'), [(0.8, 0.05), (1.5, 0.2), (3, 0.2)])
def test_ddg_epsilon_is_never_below_the_continuous_gaussian_at_equal_noise(
  noise_multiplier, sampling_rate
):
  mechanism = demo_mechanism(2.0**12, 1, noise_multiplier)
  kwargs = {'sampling_rate': sampling_rate, 'rounds': 100, 'delta': 1e-5}
  assert dda.compute_epsilon(mechanism, **kwargs) >= dda.gaussian_epsilon_at_integer_orders(
    noise_multiplier, **kwargs
  )


def test_more_colluding_silos_at_the_same_local_noise_give_larger_epsilon():
  local_stddev = 1000.0
  epsilons = []
  for t in range(5):
    mechanism = dda.DistributedDiscreteGaussian(
      l2_clip=1.0,
      scale=1024.0,
      dim=DEMO_DIM,
      total_stddev=local_stddev * math.sqrt(5 - t),
      num_silos=5,
      max_colluding=t,
    )
    assert mechanism.honest_shares == 5 - t
    assert mechanism.local_stddev == pytest.approx(local_stddev)
    epsilons.append(dda.compute_epsilon(mechanism, **DEMO))
  assert all(a < b for a, b in zip(epsilons, epsilons[1:])), epsilons


def test_epsilon_grows_with_rounds_and_has_its_limits():
  mechanism = demo_mechanism(2.0**12, 1)
  assert dda.compute_epsilon(mechanism, sampling_rate=0.2, rounds=0, delta=1e-5) == 0.0
  assert dda.compute_epsilon(mechanism, sampling_rate=0.2, rounds=10, delta=1e-5) < (
    dda.compute_epsilon(mechanism, sampling_rate=0.2, rounds=100, delta=1e-5)
  )
  noiseless = dataclasses.replace(mechanism, total_stddev=0.0)
  assert dda.compute_epsilon(noiseless, sampling_rate=0.2, rounds=1, delta=1e-5) == math.inf
  assert dda.gaussian_epsilon_at_integer_orders(1.0, 0.2, 0, 1e-5) == 0.0
  assert dda.gaussian_epsilon_at_integer_orders(0.0, 0.2, 1, 1e-5) == math.inf


GOOD = {
  'l2_clip': 1.0,
  'scale': 100.0,
  'dim': 10,
  'total_stddev': 50.0,
  'num_silos': 3,
  'max_colluding': 1,
}


@pytest.mark.parametrize(
  ('field', 'value'),
  [
    ('l2_clip', 0.0),
    ('l2_clip', float('nan')),
    ('scale', -1.0),
    ('dim', 0),
    ('dim', 2.5),
    ('total_stddev', -1.0),
    ('num_silos', 0),
    ('max_colluding', -1),
    ('max_colluding', 3),
  ],
)
def test_bad_mechanism_fields_are_named(field, value):
  with pytest.raises(dda.DistributedDPAccountingError, match=field) as info:
    dda.DistributedDiscreteGaussian(**{**GOOD, field: value})
  assert isinstance(info.value, FedpipeError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
  ('call', 'name'),
  [
    (lambda: dda.rounded_sensitivity(0.0, 1.0, 4), 'l2_clip'),
    (lambda: dda.rounded_sensitivity(1.0, -2.0, 4), 'scale'),
    (lambda: dda.rounded_sensitivity(1.0, 1.0, 0), 'dim'),
    (
      lambda: dda.discrete_gaussian_sum_rdp(
        [2], l2_sensitivity=1, l1_sensitivity=1, local_stddev=0, num_shares=2, dim=3
      ),
      'local_stddev',
    ),
    (
      lambda: dda.discrete_gaussian_sum_rdp(
        [2], l2_sensitivity=1, l1_sensitivity=1, local_stddev=1, num_shares=0, dim=3
      ),
      'num_shares',
    ),
    (lambda: dda.poisson_subsampled_rdp([2], 0.0, gaussian_curve(1.0)), 'sampling_rate'),
    (lambda: dda.poisson_subsampled_rdp([2], 1.5, gaussian_curve(1.0)), 'sampling_rate'),
    (
      lambda: dda.compute_epsilon(
        dda.DistributedDiscreteGaussian(**GOOD), sampling_rate=0.1, rounds=1, delta=0.0
      ),
      'delta',
    ),
    (
      lambda: dda.compute_epsilon(
        dda.DistributedDiscreteGaussian(**GOOD), sampling_rate=0.1, rounds=-1, delta=1e-5
      ),
      'rounds',
    ),
    (lambda: dda.gaussian_epsilon_at_integer_orders(-1.0, 0.1, 1, 1e-5), 'noise_multiplier'),
  ],
)
def test_bad_arguments_are_named(call, name):
  with pytest.raises(dda.DistributedDPAccountingError, match=name):
    call()

"""The ChaCha20 random stream, stochastic rounding and the discrete Gaussian sampler.

Statistical tests use fixed keys, so they are deterministic; each states the
chance it would fail for a correct implementation under a random key (its
false-alarm rate).
"""

import ast
import inspect
import math
import os

import numpy as np
import pytest
from scipy import stats

from fedpipe.computations import discrete_gaussian as dg


def key(label: str) -> bytes:
  """A fixed 32-byte test key."""
  return label.encode().ljust(32, b'.')


def exact_pmf(sigma: float) -> tuple[np.ndarray, np.ndarray]:
  """The integers out to where N_Z(0, σ²) vanishes in float64, and its pmf on them."""
  reach = math.ceil(40 * sigma) + 2
  x = np.arange(-reach, reach + 1)
  weight = np.exp(-0.5 * np.square(x / sigma))
  return x, weight / weight.sum()


def chi_square_p(samples: np.ndarray, support: np.ndarray, pmf: np.ndarray) -> float:
  """The p-value of a chi-square goodness-of-fit test of integer samples against a pmf.

  Contiguous integers are pooled, left to right, until each bin expects at
  least 5 samples; the remainder joins the last bin, and samples outside the
  support count in the end bins.
  """
  index = np.clip(samples, support[0], support[-1]) - support[0]
  counts = np.bincount(index, minlength=support.size)
  expected = pmf * samples.size
  observed_bins, expected_bins = [], []
  observed_run = expected_run = 0.0
  for observed, expect in zip(counts, expected):
    observed_run += observed
    expected_run += expect
    if expected_run >= 5:
      observed_bins.append(observed_run)
      expected_bins.append(expected_run)
      observed_run = expected_run = 0.0
  observed_bins[-1] += observed_run
  expected_bins[-1] += expected_run
  observed_bins, expected_bins = np.array(observed_bins), np.array(expected_bins)
  statistic = np.sum(np.square(observed_bins - expected_bins) / expected_bins)
  return float(stats.chi2.sf(statistic, observed_bins.size - 1))


# CryptoRandom.


def test_stream_is_the_chacha20_keystream():
  # RFC 7539, appendix A.1, test vector #1: zero key, zero nonce, block 0.
  expected = bytes.fromhex(
    '76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7'
    'da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586'
  )
  assert dg.CryptoRandom(bytes(32)).bytes(64) == expected


def test_same_key_same_stream_and_different_keys_different_streams():
  assert dg.CryptoRandom(key('a')).bytes(4096) == dg.CryptoRandom(key('a')).bytes(4096)
  assert dg.CryptoRandom(bytearray(key('a'))).bytes(64) == dg.CryptoRandom(key('a')).bytes(64)
  assert dg.CryptoRandom(key('a')).bytes(4096) != dg.CryptoRandom(key('b')).bytes(4096)


def test_successive_calls_continue_the_stream_without_repeating():
  random = dg.CryptoRandom(key('continue'))
  pieces = random.bytes(10) + random.bytes(1000) + random.uint64(3).tobytes() + random.bytes(7)
  assert pieces == dg.CryptoRandom(key('continue')).bytes(1041)
  first, second = random.bytes(2**20), random.bytes(2**20)
  assert first != second
  # Equal bytes at the same offsets: Binomial(2^20, 1/256), 4096 ± 64. The
  # bound is 8 standard deviations: false alarm < 1e-14.
  same = np.count_nonzero(np.frombuffer(first, np.uint8) == np.frombuffer(second, np.uint8))
  assert abs(same - 4096) < 8 * 64


def test_no_key_gives_independent_streams():
  # A collision of 32 bytes from two OS keys: probability 2^-256.
  assert dg.CryptoRandom().bytes(32) != dg.CryptoRandom().bytes(32)
  assert dg.CryptoRandom(None).bytes(32) != dg.CryptoRandom(None).bytes(32)


@pytest.mark.skipif(not hasattr(os, 'fork'), reason='needs fork')
def test_a_forked_child_does_not_repeat_its_parents_stream():
  random = dg.CryptoRandom()
  read_end, write_end = os.pipe()
  pid = os.fork()
  if pid == 0:  # The child: its next 32 bytes go to the parent.
    try:
      os.write(write_end, random.bytes(32))
    finally:
      os._exit(0)
  os.close(write_end)
  with os.fdopen(read_end, 'rb') as pipe:
    child = pipe.read()
  os.waitpid(pid, 0)
  assert len(child) == 32
  assert child != random.bytes(32)  # Equal with probability 2^-256.


def test_bad_keys_and_counts_are_refused():
  for bad in (b'short', bytes(33), 'x' * 32, 42):
    with pytest.raises(dg.DiscreteGaussianError, match='32 bytes'):
      dg.CryptoRandom(bad)
  random = dg.CryptoRandom(key('counts'))
  with pytest.raises(dg.DiscreteGaussianError, match='>= 0'):
    random.bytes(-1)
  with pytest.raises(dg.DiscreteGaussianError, match='integer'):
    random.uniform(2.5)
  assert random.bytes(0) == b''
  assert random.uint64(0).shape == (0,)
  assert isinstance(dg.DiscreteGaussianError('x'), ValueError)


def test_uint64_reads_the_stream_little_endian():
  words = dg.CryptoRandom(key('words')).uint64(4)
  raw = dg.CryptoRandom(key('words')).bytes(32)
  assert words.dtype == np.uint64 and words.flags.writeable
  assert [int(w) for w in words] == [
    int.from_bytes(raw[i : i + 8], 'little') for i in range(0, 32, 8)
  ]


def test_unit_interval_conversions_stay_inside_their_intervals_at_the_extremes():
  extremes = np.array([0, 1, 2**11, 2**64 - 1], dtype=np.uint64)
  closed = dg._unit_interval(extremes)
  assert list(closed) == [0.0, 0.0, 2.0**-53, 1 - 2.0**-53]
  opened = dg._open_unit_interval(extremes)
  assert list(opened) == [2.0**-53, 2.0**-53, 2.0**-53, 1 - 2.0**-53]
  assert np.all((opened > 0) & (opened < 1))


def test_uniform_is_in_range_on_the_53_bit_grid_and_uniform():
  random = dg.CryptoRandom(key('uniform'))
  n = 2**20
  for values, low_open in ((random.uniform(n), False), (random.open_uniform(n), True)):
    assert values.dtype == np.float64 and values.shape == (n,)
    assert values.max() < 1
    assert values.min() > 0 if low_open else values.min() >= 0
    assert np.all(values * 2.0**53 == np.floor(values * 2.0**53))
    # 64 equal bins, 2^14 expected in each: false alarm 1e-4.
    counts = np.bincount((values * 64).astype(np.int64), minlength=64)
    assert stats.chisquare(counts).pvalue > 1e-4


# stochastic_round.


def test_rounding_is_unbiased():
  random = dg.CryptoRandom(key('round'))
  n = 10**6
  for value in (0.3, -2.7):
    rounded = dg.stochastic_round(np.full(n, value), random)
    assert set(np.unique(rounded)) == {math.floor(value), math.ceil(value)}
    frac = value - math.floor(value)
    # 5 standard errors: false alarm 6e-7 each.
    assert abs(rounded.mean() - value) < 5 * math.sqrt(frac * (1 - frac) / n)


def test_rounding_is_unbiased_for_each_value_of_a_vector():
  random = dg.CryptoRandom(key('vector'))
  values = np.linspace(-5, 5, 101) + 1e-3  # No integers; fractions all over [0, 1).
  repeats = 10**4
  rounded = dg.stochastic_round(np.tile(values, (repeats, 1)), random)
  assert rounded.shape == (repeats, 101) and rounded.dtype == np.int64
  assert np.all((rounded == np.floor(values)) | (rounded == np.ceil(values)))
  frac = values - np.floor(values)
  z = (rounded.mean(axis=0) - values) / np.sqrt(frac * (1 - frac) / repeats)
  # 101 values at 5 standard errors: false alarm 101 · 6e-7 = 6e-5.
  assert np.max(np.abs(z)) < 5


def test_integers_are_unchanged():
  random = dg.CryptoRandom(key('integers'))
  values = np.array([0.0, -0.0, 1.0, -7.0, 1e15, 2.0**62, -(2.0**62)])
  assert dg.stochastic_round(values, random).tolist() == [0, 0, 1, -7, 10**15, 2**62, -(2**62)]
  integers = np.array([[3, -4], [2**62, -(2**62)]], dtype=np.int64)
  rounded = dg.stochastic_round(integers, random)
  assert rounded.dtype == np.int64 and np.array_equal(rounded, integers)
  assert dg.stochastic_round(np.array([True, False]), random).tolist() == [1, 0]
  assert dg.stochastic_round(np.zeros((0, 3)), random).shape == (0, 3)


def test_rounding_refuses_non_finite_and_huge_values():
  random = dg.CryptoRandom(key('refuse'))
  with pytest.raises(dg.DiscreteGaussianError, match='2 of 4 values'):
    dg.stochastic_round(np.array([1.0, np.nan, np.inf, 2.0]), random)
  with pytest.raises(dg.DiscreteGaussianError, match='1 of 1 values'):
    dg.stochastic_round(np.array([-np.inf]), random)
  with pytest.raises(dg.DiscreteGaussianError, match=r'2 of 3 values.*2\*\*62'):
    dg.stochastic_round(np.array([2.0**63, 1.0, -(2.0**62) * 1.5]), random)
  with pytest.raises(dg.DiscreteGaussianError, match=r'1 of 2 values.*2\*\*62'):
    dg.stochastic_round(np.array([2**62 + 1, 0], dtype=np.int64), random)
  with pytest.raises(dg.DiscreteGaussianError, match=r'1 of 1 values.*2\*\*62'):
    dg.stochastic_round(np.array([2**64 - 1], dtype=np.uint64), random)


# sample_discrete_gaussian and discrete_gaussian_variance.


@pytest.mark.parametrize('sigma', [0.7, 3.0, 50.0])
def test_samples_fit_the_exact_pmf(sigma):
  samples = dg.sample_discrete_gaussian(sigma, 500_000, dg.CryptoRandom(key(f'fit {sigma}')))
  assert samples.dtype == np.int64 and samples.shape == (500_000,)
  # False alarm 1e-4 per σ.
  assert chi_square_p(samples, *exact_pmf(sigma)) > 1e-4


def test_the_fit_test_tells_the_discrete_gaussian_from_a_rounded_normal():
  # The test above has power: the same samples fail against round(N(0, σ²)).
  sigma = 0.7
  samples = dg.sample_discrete_gaussian(sigma, 500_000, dg.CryptoRandom(key('fit 0.7')))
  support, _ = exact_pmf(sigma)
  rounded_normal = np.diff(stats.norm.cdf(np.append(support - 0.5, support[-1] + 0.5) / sigma))
  assert chi_square_p(samples, support, rounded_normal / rounded_normal.sum()) < 1e-10


@pytest.mark.parametrize('sigma', [0.7, 3.0, 50.0])
def test_sample_mean_and_variance_match_the_exact_ones(sigma):
  n = 10**6
  samples = dg.sample_discrete_gaussian(sigma, n, dg.CryptoRandom(key(f'moments {sigma}')))
  support, pmf = exact_pmf(sigma)
  variance = dg.discrete_gaussian_variance(sigma)
  fourth = float(np.sum(pmf * support.astype(np.float64) ** 4))
  # 5 standard errors each: false alarm 6e-7 each.
  assert abs(samples.mean()) < 5 * math.sqrt(variance / n)
  assert abs(samples.var() - variance) < 5 * math.sqrt((fourth - variance**2) / n)


def test_samples_fill_the_integer_lattice_at_the_largest_stddev():
  # Float64 proposals at σ = 2^32 must still reach every residue evenly.
  samples = dg.sample_discrete_gaussian(dg.MAX_STDDEV, 200_000, dg.CryptoRandom(key('lattice')))
  residues = np.bincount(samples % 16, minlength=16)
  assert stats.chisquare(residues).pvalue > 1e-4  # False alarm 1e-4.
  # The variance is σ²: 5 standard errors, false alarm 6e-7.
  assert abs(np.var(samples.astype(np.float64)) / dg.MAX_STDDEV**2 - 1) < 5 * math.sqrt(2 / 2e5)


def test_sampling_is_reproducible_only_with_a_fixed_key():
  first = dg.sample_discrete_gaussian(10.0, 1000, dg.CryptoRandom(key('same')))
  assert np.array_equal(
    first, dg.sample_discrete_gaussian(10.0, 1000, dg.CryptoRandom(key('same')))
  )
  assert not np.array_equal(first, dg.sample_discrete_gaussian(10.0, 1000, dg.CryptoRandom()))


def test_zero_and_tiny_stddev_give_zeros():
  random = dg.CryptoRandom(key('zero'))
  assert dg.sample_discrete_gaussian(0.0, 5, random).tolist() == [0] * 5
  assert dg.sample_discrete_gaussian(0, 0, random).shape == (0,)
  assert dg.sample_discrete_gaussian(3.0, 0, random).dtype == np.int64
  # P(±1) = exp(-1 / (2σ²)): 0 in float64 for σ = 1e-300, and 1e-30 at σ = 0.1.
  assert not np.any(dg.sample_discrete_gaussian(1e-300, 1000, random))
  assert not np.any(dg.sample_discrete_gaussian(5e-324, 1000, random))
  assert not np.any(dg.sample_discrete_gaussian(0.1, 1000, random))


def test_bad_sampling_requests_are_refused():
  random = dg.CryptoRandom(key('bad'))
  for stddev in (-1.0, math.nan, math.inf, dg.MAX_STDDEV * 2, 'one'):
    with pytest.raises(dg.DiscreteGaussianError, match='stddev'):
      dg.sample_discrete_gaussian(stddev, 10, random)
  with pytest.raises(dg.DiscreteGaussianError, match='size must be >= 0'):
    dg.sample_discrete_gaussian(1.0, -1, random)
  with pytest.raises(dg.DiscreteGaussianError, match='size must be an integer'):
    dg.sample_discrete_gaussian(1.0, 2.5, random)
  with pytest.raises(dg.DiscreteGaussianError, match='stddev'):
    dg.discrete_gaussian_variance(-0.5)


def test_variance_matches_the_poisson_summation_formula():
  # An independent expression of the same variance, summed in the dual:
  # Var = σ² - 4π²σ⁴ · Σ_{k≥1} 2k² q^{k²} / (1 + 2 Σ_{k≥1} q^{k²}), q = exp(-2π²σ²).
  for sigma in (0.2, 0.3, 0.7, 1.0, 3.0, 64.0, 65.0, 1e3):
    q = math.exp(-2 * math.pi**2 * sigma**2)
    k = np.arange(1, 400, dtype=np.float64)
    terms = q ** (k * k)
    dual = sigma**2 - 4 * math.pi**2 * sigma**4 * np.sum(2 * k * k * terms) / (1 + 2 * terms.sum())
    assert dg.discrete_gaussian_variance(sigma) == pytest.approx(dual, rel=1e-9, abs=1e-300)
  assert dg.discrete_gaussian_variance(0.3) < 0.1 * 0.3**2  # Far below σ² for small σ.
  assert dg.discrete_gaussian_variance(0.0) == 0.0
  assert dg.discrete_gaussian_variance(1e-3) == 0.0  # exp(-5e5): below float64.


# The randomness comes only from CryptoRandom.


def test_the_module_uses_no_pseudo_random_generator():
  source = inspect.getsource(dg)
  for banned in ('np.random', 'numpy.random', 'import random', 'from random', 'secrets'):
    assert banned not in source
  imported = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      imported.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      imported.add(node.module)
  assert imported == {
    '__future__',
    'math',
    'operator',
    'os',
    'numpy',
    'cryptography.hazmat.primitives.ciphers',
    'fedpipe.errors',
  }
  assert all(value is not np.random for value in vars(dg).values())

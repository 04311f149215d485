"""Discrete Gaussian noise and stochastic rounding from a cryptographic random stream.

In secure aggregation each silo rounds its update onto the integers and adds
its share of discrete Gaussian noise before masking it. The coordinator must
neither predict nor reconstruct that noise, so every random bit here comes
from ChaCha20 keyed from the operating system (`CryptoRandom`); nothing uses
numpy's or Python's pseudo-random generators.

The sampler is the rejection method of Canonne, Kamath and Steinke
(Algorithm 3): propose Y from a discrete Laplace of scale t = ⌊σ⌋ + 1 and
accept it with probability exp(-(|Y| - σ²/t)² / (2σ²)), vectorized in numpy.

References:
  Canonne, Kamath, Steinke. The Discrete Gaussian for Differential Privacy.
  NeurIPS 2020. https://arxiv.org/abs/2004.00010
"""

from __future__ import annotations

import math
import operator
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedpipe.errors import FedpipeError

KEY_BYTES = 32
# The largest stddev sampled. The proposals are ⌊t·E⌋ with E an exponential
# computed in float64 from 52-bit uniforms, so each integer's probability is
# off by a relative ~t·2^-50 at most in the bulk: 4e-6 at this bound.
MAX_STDDEV = 2.0**32
# |x| above which stochastic_round refuses a value: far inside int64.
MAX_ROUND_MAGNITUDE = 2.0**62

# ChaCha20's 16-byte IV as OpenSSL takes it: a 32-bit block counter, then a
# 96-bit nonce, carried into as one 128-bit counter. Each key is used once,
# from block 0.
_NONCE = bytes(16)
# Proposals per batch: bounds the sampler's memory (about 50 MiB) for any size.
_MAX_BATCH = 1 << 20
# The acceptance rate assumed before any batch is seen: 0.44 to 0.76 by σ.
_INITIAL_ACCEPTANCE = 0.7
# Past this stddev the variance is σ² to float64 precision: by Poisson
# summation the relative deficit is about 8π²σ²·exp(-2π²σ²), < 1e-300 here.
_VARIANCE_SUM_LIMIT = 64.0


class DiscreteGaussianError(FedpipeError, ValueError):
  """A discrete Gaussian or rounding request cannot be carried out as given."""


class CryptoRandom:
  """Uniform randomness from a ChaCha20 keystream.

  One encryptor runs over the whole life of the object, so successive calls
  continue the keystream and never reuse a part of it. Without a key, the key
  comes from `os.urandom`, and a forked child takes a fresh one on its first
  call instead of repeating its parent's stream. Not thread-safe: give each
  thread its own instance.

  Args:
    key: 32 bytes to make the stream reproducible, for tests only: anyone who
      knows the key can compute every number drawn. None (the default) for a
      key from the operating system.

  Raises:
    DiscreteGaussianError: If the key is not 32 bytes.
  """

  def __init__(self, key: bytes | None = None):
    self._os_keyed = key is None
    if key is None:
      key = os.urandom(KEY_BYTES)
    elif not isinstance(key, bytes | bytearray | memoryview) or len(key) != KEY_BYTES:
      raise DiscreteGaussianError(
        f'a CryptoRandom key must be {KEY_BYTES} bytes; pass None for a key from the OS'
      )
    self._start(bytes(key))

  def _start(self, key: bytes) -> None:
    self._encryptor = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()
    self._pid = os.getpid()

  def bytes(self, n: int) -> bytes:
    """The next `n` bytes of the keystream.

    Raises:
      DiscreteGaussianError: If `n` is not a non-negative integer.
    """
    n = _count(n, 'n')
    if self._os_keyed and os.getpid() != self._pid:
      self._start(os.urandom(KEY_BYTES))
    return self._encryptor.update(b'\0' * n)

  def uint64(self, n: int) -> np.ndarray:
    """`n` uniform 64-bit words (uint64), read little-endian from the keystream."""
    n = _count(n, 'n')
    return np.frombuffer(self.bytes(8 * n), dtype='<u8').astype(np.uint64)

  def uniform(self, n: int) -> np.ndarray:
    """`n` uniform float64s in [0, 1): the top 53 bits of each word, times 2^-53."""
    return _unit_interval(self.uint64(n))

  def open_uniform(self, n: int) -> np.ndarray:
    """`n` uniform float64s in (0, 1), safe to take logs of.

    The top 52 bits k of each word give (k + 1/2)·2^-52: an exact float64,
    between 2^-53 and 1 - 2^-53.
    """
    return _open_unit_interval(self.uint64(n))


def stochastic_round(x: np.ndarray, random: CryptoRandom) -> np.ndarray:
  """Rounds each value to ⌊x⌋ + Bernoulli(x - ⌊x⌋), so that E[result] = x.

  Integer values (and integer arrays, which draw no randomness) are returned
  unchanged. The Bernoulli draws compare 53-bit uniforms, so the expectation is
  exact for |x| >= 1 and within 2^-53 of x below.

  Args:
    x: The values, of any shape.
    random: The source of randomness.

  Returns:
    An int64 array of the shape of `x`.

  Raises:
    DiscreteGaussianError: If any value is NaN, infinite or beyond ±2^62.
  """
  x = np.asarray(x)
  if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
    _check_magnitude((x > 2**62) | (x < -(2**62)), x.size)
    return x.astype(np.int64)
  x = x.astype(np.float64)
  non_finite = int(np.count_nonzero(~np.isfinite(x)))
  if non_finite:
    raise DiscreteGaussianError(
      f'cannot round {non_finite} of {x.size} values: they are NaN or infinite'
    )
  _check_magnitude(np.abs(x) > MAX_ROUND_MAGNITUDE, x.size)
  floor = np.floor(x)
  up = random.uniform(x.size).reshape(x.shape) < x - floor
  return floor.astype(np.int64) + up


def sample_discrete_gaussian(stddev: float, size: int, random: CryptoRandom) -> np.ndarray:
  """`size` i.i.d. samples of the discrete Gaussian N_Z(0, stddev²).

  P(x) ∝ exp(-x² / (2·stddev²)) over the integers; its variance is
  `discrete_gaussian_variance(stddev)`, slightly below stddev² for stddev < 1.
  Algorithm 3 of Canonne, Kamath and Steinke (2020), in batches: each proposal
  is a discrete Laplace P(y) ∝ exp(-|y|/t), t = ⌊stddev⌋ + 1, drawn exactly as
  the difference of two i.i.d. geometric variables (each ⌊-t·log U⌋, U uniform
  in (0, 1)), and is accepted with probability
  exp(-(|y| - stddev²/t)² / (2·stddev²)). The geometric draws and acceptance
  probabilities are computed in float64: the standard floating-point
  approximation of the exact algorithm, which draws these Bernoulli variables
  from rational probabilities.

  Args:
    stddev: σ, in [0, MAX_STDDEV]; 0 gives zeros.
    size: How many samples.
    random: The source of randomness.

  Returns:
    An int64 array of `size` samples.

  Raises:
    DiscreteGaussianError: If `stddev` is negative, not finite or above
      MAX_STDDEV, or `size` is not a non-negative integer.
  """
  sigma = _check_stddev(stddev)
  size = _count(size, 'size')
  out = np.zeros(size, dtype=np.int64)
  if sigma == 0 or size == 0:
    return out
  t = math.floor(sigma) + 1
  # The acceptance exponent (|y| - σ²/t)² / (2σ²) as (|y|/σ - σ/t)² / 2: no σ²
  # to underflow for tiny σ.
  shift = sigma / t
  filled = proposed = accepted = 0
  while filled < size:
    rate = max(accepted / proposed, 0.1) if proposed else _INITIAL_ACCEPTANCE
    n = min(_MAX_BATCH, int((size - filled) / rate * 1.05) + 64)
    exponential = random.open_uniform(2 * n)
    np.log(exponential, out=exponential)
    exponential *= -t
    geometric = exponential.astype(np.int64)  # ⌊·⌋: the values are >= 0.
    proposal = geometric[:n] - geometric[n:]
    with np.errstate(over='ignore'):
      z = np.abs(proposal) / sigma - shift
      kept = proposal[random.uniform(n) < np.exp(-0.5 * z * z)]
    take = min(kept.size, size - filled)
    out[filled : filled + take] = kept[:take]
    filled += take
    proposed += n
    accepted += kept.size
  return out


def discrete_gaussian_variance(stddev: float) -> float:
  """The exact variance of N_Z(0, stddev²), by summing its pmf.

  The terms are summed out to where they vanish in float64; past stddev 64 the
  variance equals stddev² to float64 precision and is returned as such.

  Raises:
    DiscreteGaussianError: If `stddev` is negative or not finite.
  """
  sigma = _check_stddev(stddev, limit=math.inf)
  if sigma == 0:
    return 0.0
  if sigma > _VARIANCE_SUM_LIMIT:
    return sigma * sigma
  # exp(-x²/(2σ²)) underflows to 0 past x = σ·sqrt(2·745).
  x = np.arange(1, math.ceil(sigma * math.sqrt(2 * 745.2)) + 2, dtype=np.float64)
  with np.errstate(over='ignore'):
    weight = np.exp(-0.5 * np.square(x / sigma))
  return float(2 * np.sum(x * x * weight) / (1 + 2 * np.sum(weight)))


def _unit_interval(words: np.ndarray) -> np.ndarray:
  """Uniform float64s in [0, 1) from uint64 words: their top 53 bits, times 2^-53."""
  return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _open_unit_interval(words: np.ndarray) -> np.ndarray:
  """Uniform float64s in (0, 1) from uint64 words: (top 52 bits + 1/2) · 2^-52, exact."""
  return ((words >> np.uint64(12)).astype(np.float64) + 0.5) * 2.0**-52


def _count(n: int, name: str) -> int:
  """`n` as a non-negative int, or DiscreteGaussianError naming it."""
  try:
    n = operator.index(n)
  except TypeError:
    raise DiscreteGaussianError(f'{name} must be an integer, got {n!r}') from None
  if n < 0:
    raise DiscreteGaussianError(f'{name} must be >= 0, got {n}')
  return n


def _check_stddev(stddev: float, limit: float = MAX_STDDEV) -> float:
  """`stddev` as a float in [0, limit], or DiscreteGaussianError."""
  try:
    sigma = float(stddev)
  except (TypeError, ValueError):
    raise DiscreteGaussianError(f'stddev must be a number, got {stddev!r}') from None
  if not math.isfinite(sigma) or sigma < 0:
    raise DiscreteGaussianError(f'stddev must be finite and >= 0, got {stddev!r}')
  if sigma > limit:
    raise DiscreteGaussianError(
      f'stddev must be at most {limit:g} for float64 sampling to stay accurate, got {stddev!r}'
    )
  return sigma


def _check_magnitude(too_large: np.ndarray, size: int) -> None:
  """Raises DiscreteGaussianError if any value is marked too large to round."""
  too_large = int(np.count_nonzero(too_large))
  if too_large:
    raise DiscreteGaussianError(
      f'cannot round {too_large} of {size} values: they are beyond ±2**62; scale them down'
    )

"""The encoding of a silo's partial aggregate, its masks, and the coordinator's modular sum."""

import numpy as np
import pytest

from fedpipe.computations import discrete_gaussian
from fedpipe.federation import key_agreement, secure_sum

SILOS = ('silo-a', 'silo-b', 'silo-c')
SCALE = 2.0**20


def _seeds():
  """Fixed pairwise seeds, as key agreement would give each silo (shared per pair)."""
  pair = {
    frozenset(p): bytes([i + 1]) * 32
    for i, p in enumerate([('silo-a', 'silo-b'), ('silo-a', 'silo-c'), ('silo-b', 'silo-c')])
  }
  return {s: {t: pair[frozenset((s, t))] for t in SILOS if t != s} for s in SILOS}


def _partials(seed):
  rng = np.random.default_rng(seed)  # The test's data, not the protocol's randomness.
  return {
    s: [
      rng.normal(size=(8, 4)).astype(np.float32),
      rng.normal(size=(4,)).astype(np.float32),
      np.array(rng.integers(0, 1000), dtype=np.int64),
    ]
    for s in SILOS
  }


def _masked(partials, spec, key_byte=7):
  seeds = _seeds()
  out = {}
  for i, silo in enumerate(SILOS):
    random = discrete_gaussian.CryptoRandom(bytes([key_byte + i]) * 32)
    encoded, layout = secure_sum.encode_partial(partials[silo], spec, random)
    mask = key_agreement.mask_vector(silo, seeds[silo], layout.size)
    out[silo] = (encoded, secure_sum.add_mask(encoded, mask))
  return out, layout


def test_the_sum_of_masked_vectors_is_the_sum_of_the_encoded_partials_exactly():
  partials = _partials(0)
  spec = secure_sum.EncodingSpec(
    scale=SCALE, local_stddev=0.0, noised=(True, True, False), num_silos=3
  )
  vectors, layout = _masked(partials, spec)
  total = secure_sum.modular_sum([masked for _, masked in vectors.values()])
  unmasked = secure_sum.modular_sum([encoded for encoded, _ in vectors.values()])
  assert np.array_equal(total, unmasked)
  decoded = secure_sum.decode_sum(total, layout, SCALE)
  for i in range(3):
    truth = sum(partials[s][i].astype(np.float64) for s in SILOS)
    assert decoded[i].shape == partials['silo-a'][i].shape
    assert decoded[i].dtype == partials['silo-a'][i].dtype
    # Rounding moves each silo's value by less than one integer unit.
    assert np.all(np.abs(decoded[i] - truth) <= 3 / SCALE + 1e-6 * np.abs(truth))
  assert decoded[2] == sum(int(partials[s][2]) for s in SILOS)  # Integers: exact.


def test_what_one_silo_sends_looks_uniform_and_does_not_follow_its_partial():
  """A silo whose partial is all zeros and one whose partial is huge send words
  with the same (uniform) bit statistics: the mask hides the value."""
  spec = secure_sum.EncodingSpec(scale=SCALE, local_stddev=0.0, noised=(True,), num_silos=3)
  n = 1 << 15
  for values in (np.zeros(n, np.float32), np.full(n, 1000.0, np.float32)):
    partials = {s: [values] for s in SILOS}
    vectors, _ = _masked(partials, spec)
    words = vectors['silo-b'][1]
    # Each bit position is set in half the words: stddev sqrt(n)/2 = 90.5;
    # 6 stddevs: a false alarm ~1e-9 a position (fixed seeds: deterministic).
    bits = np.unpackbits(words.view(np.uint8)).reshape(-1, 64).sum(axis=0).astype(np.int64)
    assert np.all(np.abs(bits - n // 2) < 6 * 90.5), bits
    encoded = vectors['silo-b'][0].view(np.int64).astype(np.float64)
    masked = words.view(np.int64).astype(np.float64)
    assert abs(np.corrcoef(encoded + np.arange(n), masked)[0, 1]) < 6 / np.sqrt(n)


def test_noise_shares_add_up_to_the_planned_total():
  local = 300.0
  spec = secure_sum.EncodingSpec(scale=SCALE, local_stddev=local, noised=(True,), num_silos=3)
  zeros = np.zeros(200_000, np.float32)
  vectors, layout = _masked({s: [zeros] for s in SILOS}, spec)
  (noise,) = secure_sum.decode_sum(
    secure_sum.modular_sum([m for _, m in vectors.values()]), layout, 1.0
  )
  # The variance of 200k samples is within 1.5% of 3 * local^2 except with
  # probability ~1e-9 (its relative stddev is sqrt(2/200k) = 0.32%; 4.7 sd).
  assert np.var(noise.astype(np.float64)) == pytest.approx(3 * local**2, rel=0.015)
  assert abs(float(np.mean(noise))) < 5 * np.sqrt(3) * local / np.sqrt(len(zeros))


def test_unnoised_tensors_get_no_noise():
  spec = secure_sum.EncodingSpec(scale=1.0, local_stddev=1000.0, noised=(True, False), num_silos=3)
  random = discrete_gaussian.CryptoRandom(b'\1' * 32)
  encoded, layout = secure_sum.encode_partial(
    [np.zeros(1000, np.float64), np.arange(1000, dtype=np.float64)], spec, random
  )
  noised, plain = secure_sum.decode_sum(encoded, layout, 1.0)
  assert np.std(noised) > 500 and np.array_equal(plain, np.arange(1000))


def test_values_that_could_wrap_are_refused_naming_the_tensor():
  spec = secure_sum.EncodingSpec(scale=2.0**40, local_stddev=0.0, noised=(False, True), num_silos=8)
  random = discrete_gaussian.CryptoRandom(b'\2' * 32)
  with pytest.raises(secure_sum.SecureSumRangeError, match='1 value.*of tensor 1 .*Lower the'):
    secure_sum.encode_partial([np.ones(3, np.float32), np.array([1.0, 2.0**20, 3.0])], spec, random)
  with pytest.raises(secure_sum.SecureSumRangeError, match='non-finite'):
    secure_sum.encode_partial([np.ones(3), np.array([np.nan, 0, 0])], spec, random)


def test_check_range_plans_from_the_clip_norm_users_and_noise():
  ok = dict(clip_norm=1.0, max_users_per_silo=10_000, num_silos=3, local_stddev=1e4)
  secure_sum.check_range(scale=2.0**20, **ok)
  with pytest.raises(secure_sum.SecureSumRangeError, match='Lower the scale to at most') as e:
    secure_sum.check_range(scale=2.0**52, **ok)
  limit = float(str(e.value).rsplit(' ', 1)[-1])
  secure_sum.check_range(scale=limit * 0.99, **ok)


def test_mismatched_inputs_name_what_differs():
  spec = secure_sum.EncodingSpec(scale=1.0, local_stddev=0.0, noised=(True,), num_silos=2)
  random = discrete_gaussian.CryptoRandom(b'\3' * 32)
  with pytest.raises(secure_sum.SecureSumError, match='marks 1 tensors .* has 2'):
    secure_sum.encode_partial([np.zeros(2), np.zeros(2)], spec, random)
  with pytest.raises(secure_sum.SecureSumError, match='vector 1 is'):
    secure_sum.modular_sum([np.zeros(3, np.uint64), np.zeros(4, np.uint64)])
  with pytest.raises(secure_sum.SecureSumError, match='only numbers'):
    secure_sum.encode_partial([np.array(['a'])], spec, random)
  with pytest.raises(secure_sum.SecureSumError, match='scale must be'):
    secure_sum.EncodingSpec(scale=0.0, local_stddev=0.0, noised=(), num_silos=2)

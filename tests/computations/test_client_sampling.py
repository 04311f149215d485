"""Client sampling is reproducible per round and matches the accountant's rate."""

import numpy as np

from fedpipe.computations import client_sampling
from fedpipe.computations import privacy_accounting as pa

IDS = [f'c{i:04d}' for i in range(1000)]


def test_poisson_rate_and_variable_size():
  scheme = pa.SamplingScheme('poisson', population_size=1000, clients_per_round=100)
  sizes = [
    len(client_sampling.sample_clients(IDS, scheme=scheme, round_num=r, seed=3))
    for r in range(1, 201)
  ]
  # Mean of 200 Binomial(1000, 0.1) draws: std 0.67, so |mean-100| < 4 always.
  assert abs(np.mean(sizes) - 100) < 4
  assert len(set(sizes)) > 5


def test_fixed_size_draws_exactly_m_distinct_clients():
  scheme = pa.SamplingScheme('fixed_size', population_size=1000, clients_per_round=37)
  chosen = client_sampling.sample_clients(IDS, scheme=scheme, round_num=4, seed=3)
  assert len(chosen) == len(set(chosen)) == 37


def test_same_seed_and_round_same_clients_different_round_different():
  scheme = pa.SamplingScheme('poisson', population_size=1000, clients_per_round=50)
  a = client_sampling.sample_clients(IDS, scheme=scheme, round_num=9, seed=11)
  b = client_sampling.sample_clients(IDS, scheme=scheme, round_num=9, seed=11)
  c = client_sampling.sample_clients(IDS, scheme=scheme, round_num=10, seed=11)
  d = client_sampling.sample_clients(IDS, scheme=scheme, round_num=9, seed=12)
  assert a == b
  assert a != c and a != d

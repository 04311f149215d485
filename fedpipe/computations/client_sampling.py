"""Per-round client sampling that is exactly what the privacy accountant assumes.

The participants of round r are a pure function of (seed, r, population), so
a resumed run draws the same clients as an uninterrupted one. For the
amplification-by-sampling argument to hold, who took part must stay secret:
the seed is generated at random unless set, and never published.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedpipe.computations import privacy_accounting


def sample_clients(
  client_ids: Sequence[str],
  *,
  scheme: privacy_accounting.SamplingScheme,
  round_num: int,
  seed: int,
) -> list[str]:
  """The clients taking part in round `round_num`.

  Args:
    client_ids: The population, in a stable order (sorted ids).
    scheme: Poisson (each client independently with the scheme's rate; the
      count varies) or fixed-size without replacement.
    round_num: The 1-based round number.
    seed: The run's sampling seed.

  Returns:
    The sampled client ids, in population order.

  Raises:
    ValueError: If the population does not match the scheme.
  """
  if len(client_ids) != scheme.population_size:
    raise ValueError(
      f'population has {len(client_ids)} clients but the sampling scheme '
      f'was built for {scheme.population_size}'
    )
  rng = np.random.default_rng([seed, round_num])
  if scheme.method == 'poisson':
    mask = rng.random(len(client_ids)) < scheme.sampling_rate
    return [c for c, m in zip(client_ids, mask) if m]
  chosen = np.sort(rng.choice(len(client_ids), scheme.clients_per_round, replace=False))
  return [client_ids[i] for i in chosen]

"""What a silo's data has spent in privacy: one study, and all studies together.

A silo recomputes every ε itself, from the study's approved parameters (the
noise multiplier, the sampling of clients, the rounds its ledger charged) at
its policy's δ, never from the coordinator's statement. Across studies on
the same data their privacy losses compose (`privacy_accounting.compose_epsilon`):
with the PLD accountant if every study is central Gaussian noise accounted
with PLD (so one such study's lifetime ε is its own ε), else with RDP curves,
which add up for any mix of mechanisms. That total is what the policy's
`max_lifetime_epsilon` bounds, both for the rounds already charged ("spent")
and for every round approved ("committed"). Either accountant gives an upper
bound on ε, so the one a study names cannot loosen the silo's charge.

A statistics study (`fedpipe.statistics`) counts its releases as its rounds:
each is one Gaussian mechanism of its noise multiplier (not subsampled), and
its categorical thresholding spends `threshold_delta` of δ per release, so
the lifetime ε is computed at the policy's δ less every release's
`threshold_delta`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import dp_accounting
import numpy as np

from fedpipe.computations import distributed_dp_accounting, privacy_accounting
from fedpipe.governance import policy as silo_policy
from fedpipe.governance import secure_terms
from fedpipe.statistics import mechanism as statistics_mechanism
from fedpipe.statistics import query as statistics_query


def is_statistics(privacy: Mapping[str, Any]) -> bool:
  """Whether a study's privacy section is that of a statistics query."""
  return privacy.get('mechanism') == statistics_query.MECHANISM


def noise_free_test_study(privacy: Mapping[str, Any], policy: silo_policy.SiloPolicy) -> bool:
  """Whether a study runs in a noise-free test mode its policy allows (its ε is not bounded).

  A secure-aggregation study without noise under `[secure_aggregation]
  allow_noise_free`, or a statistics study without noise under
  `[statistics] allow_noise_free`: lab policies only. Their releases are
  audited but left out of the lifetime ε.
  """
  if is_statistics(privacy):
    return float(privacy.get('noise_multiplier') or 0.0) == 0 and policy.allow_noise_free_statistics
  try:
    terms = secure_terms.terms_of(privacy)
  except secure_terms.SecureTermsError:
    return False
  return terms is not None and terms.noise_multiplier == 0 and policy.allow_noise_free_secure_sum


def mechanism(privacy: Mapping[str, Any]) -> tuple[float, privacy_accounting.SamplingScheme]:
  """A study's noise multiplier and client sampling, from its request's privacy section.

  Raises:
    privacy_accounting.PrivacyAccountingError: If they are out of range.
    KeyError, TypeError, ValueError: If a field is missing or malformed.
  """
  sampling = privacy_accounting.SamplingScheme(
    method=privacy['sampling'],
    population_size=int(privacy['population_size']),
    clients_per_round=int(privacy['clients_per_round']),
  )
  return float(privacy['noise_multiplier'] or 0.0), sampling


def secure_mechanism(
  privacy: Mapping[str, Any],
) -> tuple[distributed_dp_accounting.DistributedDiscreteGaussian, float] | None:
  """A secure-aggregation study's distributed discrete Gaussian and sampling rate; None if central.

  Raises:
    secure_terms.SecureTermsError: If its terms are malformed.
    privacy_accounting.PrivacyAccountingError: If its sampling is not Poisson
      (the subsampling bound used is for Poisson sampling).
  """
  terms = secure_terms.terms_of(privacy)
  if terms is None:
    return None
  _, sampling = mechanism(privacy)
  if sampling.method != 'poisson':
    raise privacy_accounting.PrivacyAccountingError(
      'secure aggregation is accounted for Poisson sampling only; use sampling=poisson'
    )
  return terms.mechanism(float(privacy['clip_norm'])), sampling.sampling_rate


def study_epsilon(privacy: Mapping[str, Any], rounds: int, *, delta: float) -> float:
  """ε of `rounds` rounds (a statistics study: releases) of one study at `delta` (`inf` without noise)."""
  if is_statistics(privacy):
    return statistics_mechanism.epsilon(
      float(privacy['noise_multiplier']),
      float(privacy['threshold_delta']),
      rounds,
      delta=delta,
    )
  secure = secure_mechanism(privacy)
  if secure is not None:
    ddg, rate = secure
    return distributed_dp_accounting.compute_epsilon(
      ddg, sampling_rate=rate, rounds=rounds, delta=delta
    )
  noise_multiplier, sampling = mechanism(privacy)
  return privacy_accounting.compute_epsilon(
    noise_multiplier=noise_multiplier,
    sampling=sampling,
    rounds=rounds,
    delta=delta,
    accountant=privacy.get('accountant') or 'rdp',
  )


def lifetime_epsilon(studies: Iterable[tuple[Mapping[str, Any], int]], *, delta: float) -> float:
  """ε of several studies' rounds on the same data, composed, at `delta`.

  Args:
    studies: (privacy section, rounds) of each study.
    delta: The policy's δ.
  """
  studies = list(studies)
  if not any(secure_terms.terms_of(privacy) or is_statistics(privacy) for privacy, _ in studies):
    runs = [(*mechanism(privacy), rounds) for privacy, rounds in studies]
    pld = all(
      privacy.get('accountant') == 'pld' and sampling.method == 'poisson'
      for (privacy, _), (_, sampling, _) in zip(studies, runs)
    )
    return privacy_accounting.compose_epsilon(runs, delta=delta, accountant='pld' if pld else 'rdp')
  # Central and distributed studies together: every RDP curve at the same
  # integer orders (the distributed one's subsampling bound needs them).
  orders = distributed_dp_accounting.RDP_ORDERS
  total = np.zeros(len(orders))
  for privacy, rounds in studies:
    if rounds == 0:
      continue
    if is_statistics(privacy):
      noise_multiplier = float(privacy['noise_multiplier'])
      if noise_multiplier == 0:
        return float('inf')
      delta -= rounds * float(privacy['threshold_delta'])
      total += statistics_mechanism.rdp_curve(noise_multiplier, rounds, orders)
      continue
    secure = secure_mechanism(privacy)
    if secure is not None:
      ddg, rate = secure
      if ddg.total_stddev == 0:
        return float('inf')
      total += rounds * ddg.round_rdp(orders, rate)
      continue
    noise_multiplier, sampling = mechanism(privacy)
    if noise_multiplier == 0:
      return float('inf')
    accountant = privacy_accounting.make_accountant('rdp', sampling)
    accountant = dp_accounting.rdp.RdpAccountant(
      orders=list(orders), neighboring_relation=accountant.neighboring_relation
    )
    accountant.compose(privacy_accounting.round_event(noise_multiplier, sampling), rounds)
    total += accountant.rdp
  if not total.any():
    return 0.0
  if delta <= 0:
    return float('inf')  # The statistics' thresholding spent all of δ.
  return float(dp_accounting.rdp.compute_epsilon(orders, total, delta)[0])


def ledger_epsilons(
  ledger: Iterable[Mapping[str, Any]],
  *,
  delta: float,
  extra: Iterable[tuple[Mapping[str, Any], int]] = (),
) -> dict[str, float]:
  """Lifetime ε spent (rounds used) and committed (rounds approved), plus `extra` rounds.

  Args:
    ledger: `GovernanceStore.ledger()` rows.
    delta: The policy's δ.
    extra: (privacy, rounds) to add to both, e.g. a study about to be approved.
  """
  ledger = list(ledger)
  extra = list(extra)
  return {
    'spent': lifetime_epsilon(
      [(r['privacy'], r['rounds_used']) for r in ledger] + extra, delta=delta
    ),
    'committed': lifetime_epsilon(
      [(r['privacy'], max(r['rounds_approved'], r['rounds_used'])) for r in ledger] + extra,
      delta=delta,
    ),
  }


def lifetime_violations(
  ledger: Iterable[Mapping[str, Any]],
  *,
  delta: float,
  max_lifetime_epsilon: float,
  privacy: Mapping[str, Any],
  rounds: int,
  extension: bool = False,
) -> tuple[list[str], dict[str, float]]:
  """Whether `rounds` more rounds of a study fit the policy's lifetime ε.

  Args:
    ledger: `GovernanceStore.ledger()` rows (the approved studies).
    delta: The policy's δ.
    max_lifetime_epsilon: The policy's bound.
    privacy: The study's privacy section.
    rounds: Rounds to add to what the ledger already commits.
    extension: Whether the study is already approved (in the ledger).

  Returns:
    (violations, lifetime ε {'spent', 'committed'} including those rounds).
  """
  try:
    epsilons = ledger_epsilons(ledger, delta=delta, extra=[(privacy, rounds)])
  except (privacy_accounting.PrivacyAccountingError, KeyError, TypeError, ValueError) as e:
    return [f'privacy parameters cannot be accounted for: {e}'], {}
  violations = []
  if epsilons['committed'] > max_lifetime_epsilon:
    violations.append(
      f"lifetime epsilon committed on this silo's data would be "
      f'{epsilons["committed"]:.4g} at delta={delta:g} (all approved studies'
      f'{", this one included" if extension else " and this one"}), above '
      f'max_lifetime_epsilon {max_lifetime_epsilon:g}'
    )
  return violations, epsilons

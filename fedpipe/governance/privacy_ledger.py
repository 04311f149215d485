"""What a silo's data has spent in privacy: one study, and all studies together.

A silo recomputes every ε itself, from the study's approved parameters (the
noise multiplier, the sampling of clients, the rounds its ledger charged) at
its policy's δ, never from the coordinator's statement. Across studies on
the same data the RDP curves add up (`privacy_accounting.compose_epsilon`):
that total is what the policy's `max_lifetime_epsilon` bounds, both for the
rounds already charged ("spent") and for every round approved ("committed").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fedpipe.computations import privacy_accounting


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


def study_epsilon(privacy: Mapping[str, Any], rounds: int, *, delta: float) -> float:
  """ε of `rounds` rounds of one study at `delta` (`inf` without noise)."""
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
  return privacy_accounting.compose_epsilon(
    [(*mechanism(privacy), rounds) for privacy, rounds in studies], delta=delta
  )


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

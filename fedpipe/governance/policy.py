"""A data owner's policy: what studies their silo accepts, read from a TOML file.

    allowed_callers = ["coordinator"]   # certificate common names

    [privacy]
    delta = 1e-5                  # epsilon is judged at this delta
    max_epsilon = 8.0             # largest epsilon of one study
    max_lifetime_epsilon = 16.0   # all studies on this data together (default: max_epsilon)
    min_noise_multiplier = 0.8
    max_clip_norm = 1.0
    allow_adaptive_clipping = false

    [training]
    max_rounds = 500
    min_clients_per_round = 20
    max_clients_per_round = 1000
    min_clients_per_aggregate = 5   # fewest of this silo's clients (users) in one partial aggregate

    [evaluation]                  # optional section
    allow_unnoised_metrics = true # federated evaluation releases exact metrics
    max_evaluations = 20          # evaluation calls one study may make

    [review]                      # optional section
    extra_allowed_ops = []        # TensorFlow ops allowed beyond the built-in allowlist

    [secure_aggregation]          # optional section
    require_secure_aggregation = true  # refuse studies that send unmasked partial sums
    min_roster = 3                # fewest silos a secure study may have
    allow_noise_free = false      # the noise-free test mode (never in production)

    [statistics]                  # optional section: federated feature statistics
    max_releases = 1              # releases one statistics study may make
    allow_noise_free = false      # the noise-free test mode (never in production)

Every field is required except those with defaults: `allow_adaptive_clipping`
(false), `max_lifetime_epsilon` (`max_epsilon`: all studies together may
spend what one may), the `[evaluation]` section (no un-noised evaluation),
the `[review]` section (the built-in op allowlist only) and the
`[secure_aggregation]` section (secure aggregation accepted, not required,
with at least 2 silos, never noise-free) and the `[statistics]` section (no
statistics studies: `max_releases = 0`), so a policy
says explicitly what it allows. The policy is validated once, at
start-up; a study is checked against it on submission and again on approval.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from typing import Any

from fedpipe.errors import FedpipeError
from fedpipe.governance import secure_terms

_PRIVACY_FIELDS = {
  'delta': float,
  'max_epsilon': float,
  'max_lifetime_epsilon': float,
  'min_noise_multiplier': float,
  'max_clip_norm': float,
  'allow_adaptive_clipping': bool,
}
_TRAINING_FIELDS = {
  'max_rounds': int,
  'min_clients_per_round': int,
  'max_clients_per_round': int,
  'min_clients_per_aggregate': int,
}
_EVALUATION_FIELDS = {'allow_unnoised_metrics': bool, 'max_evaluations': int}
_REVIEW_FIELDS = {'extra_allowed_ops': list}
_SECURE_FIELDS = {'require_secure_aggregation': bool, 'min_roster': int, 'allow_noise_free': bool}
_STATISTICS_FIELDS = {'max_releases': int, 'allow_noise_free': bool}
_OPTIONAL = {
  'allow_adaptive_clipping': False,
  'max_lifetime_epsilon': None,
  'allow_unnoised_metrics': False,
  'max_evaluations': 0,
  'extra_allowed_ops': [],
  'require_secure_aggregation': False,
  'min_roster': 2,
  'allow_noise_free': False,
  'max_releases': 0,
}


class PolicyError(FedpipeError, ValueError):
  """The policy file is missing, malformed or inconsistent; the message says where."""


class PolicyRefusalError(FedpipeError, PermissionError):
  """The silo's policy refuses a caller's request; the message says which rule refuses it."""


@dataclasses.dataclass(frozen=True)
class SiloPolicy:
  """The limits a silo's owner sets on studies (see the module docstring)."""

  allowed_callers: tuple[str, ...]
  delta: float
  max_epsilon: float
  max_lifetime_epsilon: float
  min_noise_multiplier: float
  max_clip_norm: float
  allow_adaptive_clipping: bool
  max_rounds: int
  min_clients_per_round: int
  max_clients_per_round: int
  min_clients_per_aggregate: int
  allow_unnoised_metrics: bool = False
  max_evaluations: int = 0
  extra_allowed_ops: tuple[str, ...] = ()
  require_secure_aggregation: bool = False
  min_secure_roster: int = 2
  allow_noise_free_secure_sum: bool = False
  max_statistics_releases: int = 0
  allow_noise_free_statistics: bool = False
  source: str = '<policy>'

  def allows_caller(self, caller: str) -> bool:
    return caller in self.allowed_callers

  def caller_refusal(self, caller: str) -> str | None:
    """Why `caller` (a certificate's common name) may not use this silo at all; None if it may."""
    if self.allows_caller(caller):
      return None
    return f"caller {caller!r} is not allowed by this silo's policy"

  def check_caller(self, caller: str) -> None:
    """Raises `PolicyRefusalError` (with `caller_refusal`) unless `caller` may use this silo."""
    refusal = self.caller_refusal(caller)
    if refusal is not None:
      raise PolicyRefusalError(refusal)

  def evaluation_violations(self, evaluations: int) -> list[str]:
    """Why `evaluations` un-noised evaluation calls break the policy (empty: they fit)."""
    if evaluations and not self.allow_unnoised_metrics:
      return [
        f'{evaluations} un-noised evaluation(s) requested; this silo releases no '
        'un-noised metrics ([evaluation] allow_unnoised_metrics = false)'
      ]
    if evaluations > self.max_evaluations:
      return [f'evaluations {evaluations} exceeds max_evaluations {self.max_evaluations}']
    return []

  def violations(
    self,
    *,
    epsilon: float,
    noise_multiplier: float,
    clipping: str,
    clip_norm: float,
    rounds: int,
    clients_per_round: int,
    evaluations: int = 0,
  ) -> list[str]:
    """Each way a study with these parameters breaks the policy (empty: it fits)."""
    found = self.evaluation_violations(evaluations)
    if not math.isfinite(epsilon) or epsilon > self.max_epsilon:
      found.append(
        f'epsilon {epsilon:.4g} at delta={self.delta:g} exceeds max_epsilon {self.max_epsilon:g}'
      )
    if noise_multiplier < self.min_noise_multiplier:
      found.append(
        f'noise_multiplier {noise_multiplier:g} is below min_noise_multiplier '
        f'{self.min_noise_multiplier:g}'
      )
    if clipping == 'adaptive' and not self.allow_adaptive_clipping:
      found.append('adaptive clipping is not allowed (allow_adaptive_clipping = false)')
    if clip_norm > self.max_clip_norm:
      found.append(f'clip_norm {clip_norm:g} exceeds max_clip_norm {self.max_clip_norm:g}')
    if rounds > self.max_rounds:
      found.append(f'rounds {rounds} exceeds max_rounds {self.max_rounds}')
    if not self.min_clients_per_round <= clients_per_round <= self.max_clients_per_round:
      found.append(
        f'clients_per_round {clients_per_round} is outside '
        f'[{self.min_clients_per_round}, {self.max_clients_per_round}]'
      )
    return found

  def statistics_violations(
    self, *, epsilon: float, noise_multiplier: float, releases: int
  ) -> list[str]:
    """Each way a statistics study with these terms breaks the policy (empty: it fits)."""
    if self.max_statistics_releases == 0:
      return [
        'this silo releases no feature statistics ([statistics] max_releases = 0); its data '
        'owner can allow them with a [statistics] section in the policy'
      ]
    found = []
    if releases > self.max_statistics_releases:
      found.append(
        f'releases {releases} exceeds [statistics] max_releases {self.max_statistics_releases}'
      )
    if noise_multiplier == 0 and self.allow_noise_free_statistics:
      return found  # The lab's test mode: no noise, so no epsilon to bound.
    if noise_multiplier == 0:
      found.append(
        'the statistics are noise-free (a test mode); this silo adds noise to everything it '
        'releases ([statistics] allow_noise_free = false)'
      )
    elif noise_multiplier < self.min_noise_multiplier:
      found.append(
        f'noise_multiplier {noise_multiplier:g} is below min_noise_multiplier '
        f'{self.min_noise_multiplier:g}'
      )
    if not math.isfinite(epsilon) or epsilon > self.max_epsilon:
      found.append(
        f'epsilon {epsilon:.4g} at delta={self.delta:g} exceeds max_epsilon {self.max_epsilon:g}'
      )
    return found

  def secure_aggregation_violations(
    self, terms: secure_terms.SecureAggregationTerms | None, *, silo_name: str | None
  ) -> list[str]:
    """Why a study's secure-aggregation terms (None: none) break the policy (empty: they fit)."""
    if terms is None:
      if self.require_secure_aggregation:
        return [
          'this silo requires secure aggregation ([secure_aggregation] '
          'require_secure_aggregation = true); the study would release its partial sums '
          'unmasked, trusting the coordinator with them'
        ]
      return []
    found = []
    if silo_name is not None and silo_name not in terms.roster:
      found.append(f'the secure-aggregation roster {list(terms.roster)} does not name {silo_name}')
    if len(terms.roster) < self.min_secure_roster:
      found.append(
        f'the secure-aggregation roster has {len(terms.roster)} silos; this silo needs at '
        f'least min_roster = {self.min_secure_roster}'
      )
    if terms.noise_multiplier == 0 and not self.allow_noise_free_secure_sum:
      found.append(
        'the secure sum is noise-free (a test mode); this silo adds noise to everything it '
        'releases ([secure_aggregation] allow_noise_free = false)'
      )
    return found


def _take(
  table: dict[str, Any], fields: dict[str, type], section: str, path: str, errors: list[str]
) -> dict[str, Any]:
  values = {}
  for name, kind in fields.items():
    if name not in table:
      if name in _OPTIONAL:
        values[name] = _OPTIONAL[name]
      else:
        errors.append(f'[{section}] {name} is missing')
      continue
    value = table[name]
    if kind is list:
      if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        errors.append(f'[{section}] {name} must be a list of names, got {value!r}')
        continue
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
      errors.append(f'[{section}] {name} must be a {kind.__name__}, got {value!r}')
      continue
    values[name] = value
  for name in sorted(set(table) - set(fields)):
    errors.append(f'[{section}] {name} is not a policy field (known: {", ".join(fields)})')
  return values


def parse_policy(text: str, *, source: str = '<policy>') -> SiloPolicy:
  """Parses and validates a policy.

  Raises:
    PolicyError: Listing every problem, each with its section and field.
  """
  try:
    data = tomllib.loads(text)
  except tomllib.TOMLDecodeError as e:
    raise PolicyError(f'policy {source} is not valid TOML: {e}') from e
  errors: list[str] = []
  callers = data.pop('allowed_callers', None)
  if (
    not isinstance(callers, list)
    or not callers
    or not all(isinstance(c, str) and c for c in callers)
  ):
    errors.append('allowed_callers must be a non-empty list of certificate common names')
    callers = []
  privacy = _take(data.pop('privacy', {}), _PRIVACY_FIELDS, 'privacy', source, errors)
  training = _take(data.pop('training', {}), _TRAINING_FIELDS, 'training', source, errors)
  evaluation = _take(data.pop('evaluation', {}), _EVALUATION_FIELDS, 'evaluation', source, errors)
  review = _take(data.pop('review', {}), _REVIEW_FIELDS, 'review', source, errors)
  secure = _take(
    data.pop('secure_aggregation', {}), _SECURE_FIELDS, 'secure_aggregation', source, errors
  )
  statistics = _take(data.pop('statistics', {}), _STATISTICS_FIELDS, 'statistics', source, errors)
  for name in sorted(data):
    errors.append(
      f'{name} is not a policy section (known: allowed_callers, [privacy], '
      '[training], [evaluation], [review], [secure_aggregation], [statistics])'
    )
  if not errors:
    if not 0 < privacy['delta'] < 1:
      errors.append(f'[privacy] delta must be in (0, 1), got {privacy["delta"]}')
    if privacy['max_lifetime_epsilon'] is None:
      privacy['max_lifetime_epsilon'] = privacy['max_epsilon']
    elif privacy['max_lifetime_epsilon'] < privacy['max_epsilon']:
      errors.append(
        f'[privacy] max_lifetime_epsilon {privacy["max_lifetime_epsilon"]} is '
        f'below max_epsilon {privacy["max_epsilon"]}: no study could use its limit'
      )
    if evaluation['max_evaluations'] < 0:
      errors.append(
        f'[evaluation] max_evaluations must be >= 0, got {evaluation["max_evaluations"]}'
      )
    for name in ('max_epsilon', 'min_noise_multiplier', 'max_clip_norm'):
      if privacy[name] <= 0:
        errors.append(f'[privacy] {name} must be > 0, got {privacy[name]}')
    for name in _TRAINING_FIELDS:
      if training[name] < 1:
        errors.append(f'[training] {name} must be >= 1, got {training[name]}')
    if training['min_clients_per_round'] > training['max_clients_per_round']:
      errors.append('[training] min_clients_per_round exceeds max_clients_per_round')
    if statistics['max_releases'] < 0:
      errors.append(f'[statistics] max_releases must be >= 0, got {statistics["max_releases"]}')
    if secure['min_roster'] < 2:
      errors.append(
        f'[secure_aggregation] min_roster must be >= 2 (masks need two silos), '
        f'got {secure["min_roster"]}'
      )
  if errors:
    raise PolicyError(f'policy {source} is invalid:\n  - ' + '\n  - '.join(errors))
  return SiloPolicy(
    allowed_callers=tuple(callers),
    **privacy,
    **training,
    allow_unnoised_metrics=evaluation['allow_unnoised_metrics'],
    max_evaluations=evaluation['max_evaluations'],
    extra_allowed_ops=tuple(review['extra_allowed_ops']),
    require_secure_aggregation=secure['require_secure_aggregation'],
    min_secure_roster=secure['min_roster'],
    allow_noise_free_secure_sum=secure['allow_noise_free'],
    max_statistics_releases=statistics['max_releases'],
    allow_noise_free_statistics=statistics['allow_noise_free'],
    source=source,
  )


def load_policy(path: str) -> SiloPolicy:
  """Reads and validates the policy file at `path`.

  Raises:
    PolicyError: If it cannot be read or is invalid.
  """
  try:
    with open(path, encoding='utf-8') as f:
      text = f.read()
  except OSError as e:
    raise PolicyError(f'cannot read policy file {path!r}: {e.strerror}') from e
  return parse_policy(text, source=path)

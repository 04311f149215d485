"""A study's secure-aggregation terms: what each silo adds and masks before its partial sum leaves.

A study that declares these terms is trained with the noise placed at the
silos (distributed discrete Gaussian) and every silo's partial sum masked, so
the coordinator learns only the noised sum. They sit in the request's privacy
section as `secure_aggregation` and are what a silo accounts for:

    protocol          'fedpipe-secagg-1' (key agreement, masks, encoding)
    noise             'distributed_discrete_gaussian'
    roster            the silos of the study, by certificate name
    max_colluding     t: silos assumed able to collude with the coordinator;
                      noise shares are sized so that any n - t honest shares
                      carry the whole noise
    noise_multiplier  total noise stddev / clip norm (as in central DP)
    scale             integer units per unit of a value (before rounding)
    bits              64: the ring is the integers modulo 2^64
    dim               coordinates of the noised sum (the silo recounts them
                      in the training computation it approves)
    noised_path       where the noised sum sits in the partial aggregate
                      (indices into the training computation's result)

A silo never takes these from the coordinator per round: it checks them once
in review, stores them with the approval, and encodes from the stored copy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from fedpipe.computations import distributed_dp_accounting
from fedpipe.errors import FedpipeError

PROTOCOL = 'fedpipe-secagg-1'
NOISE = 'distributed_discrete_gaussian'
RING_BITS = 64


class SecureTermsError(FedpipeError, ValueError):
  """A study's secure-aggregation terms are malformed; the message names the field."""


@dataclasses.dataclass(frozen=True)
class SecureAggregationTerms:
  """See the module docstring."""

  roster: tuple[str, ...]
  max_colluding: int
  noise_multiplier: float
  scale: float
  dim: int
  noised_path: tuple[int, ...]
  protocol: str = PROTOCOL
  noise: str = NOISE
  bits: int = RING_BITS

  def __post_init__(self):
    if self.protocol != PROTOCOL:
      raise SecureTermsError(f'secure_aggregation.protocol must be {PROTOCOL!r}')
    if self.noise != NOISE:
      raise SecureTermsError(f'secure_aggregation.noise must be {NOISE!r}, got {self.noise!r}')
    if self.bits != RING_BITS:
      raise SecureTermsError(f'secure_aggregation.bits must be {RING_BITS}, got {self.bits!r}')
    if len(self.roster) < 2 or len(set(self.roster)) != len(self.roster):
      raise SecureTermsError(
        f'secure_aggregation.roster must name at least two distinct silos, got {list(self.roster)}'
      )
    if not 0 <= self.max_colluding < len(self.roster):
      raise SecureTermsError(
        f'secure_aggregation.max_colluding must be in [0, {len(self.roster) - 1}] for a roster '
        f'of {len(self.roster)}, got {self.max_colluding}'
      )
    if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
      raise SecureTermsError(
        f'secure_aggregation.noise_multiplier must be >= 0, got {self.noise_multiplier!r}'
      )
    if not (math.isfinite(self.scale) and self.scale > 0):
      raise SecureTermsError(f'secure_aggregation.scale must be > 0, got {self.scale!r}')
    if self.dim < 1:
      raise SecureTermsError(f'secure_aggregation.dim must be >= 1, got {self.dim}')

  def total_stddev(self, clip_norm: float) -> float:
    """The noise of the honest shares together, in integer units."""
    return self.noise_multiplier * clip_norm * self.scale

  def local_stddev(self, clip_norm: float, silos_in_round: int) -> float:
    """Each silo's share when `silos_in_round` silos take part (fewer silos: larger shares).

    Raises:
      SecureTermsError: If the round has no more silos than the colluders assumed.
    """
    honest = silos_in_round - self.max_colluding
    if honest < 1:
      raise SecureTermsError(
        f'a round of {silos_in_round} silo(s) cannot hide anything from '
        f'{self.max_colluding} colluding silo(s)'
      )
    return self.total_stddev(clip_norm) / math.sqrt(honest)

  def mechanism(self, clip_norm: float) -> distributed_dp_accounting.DistributedDiscreteGaussian:
    """What the accountant charges for one round (with the whole roster taking part).

    A round rerun among fewer silos uses larger shares (`local_stddev`), so
    the honest shares still carry `total_stddev`: the charge is the same.
    """
    return distributed_dp_accounting.DistributedDiscreteGaussian(
      l2_clip=clip_norm,
      scale=self.scale,
      dim=self.dim,
      total_stddev=self.total_stddev(clip_norm),
      num_silos=len(self.roster),
      max_colluding=self.max_colluding,
    )

  def to_json(self) -> dict[str, Any]:
    return {
      'protocol': self.protocol,
      'noise': self.noise,
      'bits': self.bits,
      'roster': list(self.roster),
      'max_colluding': self.max_colluding,
      'noise_multiplier': self.noise_multiplier,
      'scale': self.scale,
      'dim': self.dim,
      'noised_path': list(self.noised_path),
    }

  @classmethod
  def from_json(cls, data: Any) -> SecureAggregationTerms:
    """Parses the terms.

    Raises:
      SecureTermsError: Naming the field that is missing or malformed.
    """
    if not isinstance(data, Mapping):
      raise SecureTermsError('secure_aggregation must be an object')
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
      raise SecureTermsError(f'secure_aggregation has unknown field(s): {", ".join(unknown)}')
    roster = _get(data, 'roster', list)
    if not all(isinstance(name, str) and name for name in roster):
      raise SecureTermsError('secure_aggregation.roster must be a list of silo names')
    path = _get(data, 'noised_path', list)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in path):
      raise SecureTermsError('secure_aggregation.noised_path must be a list of indices')
    return cls(
      roster=tuple(roster),
      max_colluding=_get(data, 'max_colluding', int),
      noise_multiplier=float(_get(data, 'noise_multiplier', (int, float))),
      scale=float(_get(data, 'scale', (int, float))),
      dim=_get(data, 'dim', int),
      noised_path=tuple(path),
      protocol=_get(data, 'protocol', str),
      noise=_get(data, 'noise', str),
      bits=_get(data, 'bits', int),
    )


def _get(data: Mapping[str, Any], name: str, kind) -> Any:
  if name not in data:
    raise SecureTermsError(f'secure_aggregation.{name} is missing')
  value = data[name]
  if isinstance(value, bool) or not isinstance(value, kind):
    raise SecureTermsError(f'secure_aggregation.{name} has the wrong type: {value!r}')
  return value


def terms_of(privacy: Mapping[str, Any]) -> SecureAggregationTerms | None:
  """The secure-aggregation terms of a request's privacy section; None for central DP.

  Raises:
    SecureTermsError: If they are present but malformed.
  """
  data = privacy.get('secure_aggregation')
  return None if data is None else SecureAggregationTerms.from_json(data)

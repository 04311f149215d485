"""What leaves a silo in a secure-aggregation round, and how the coordinator sums it.

A silo's partial aggregate (a list of tensors: the summed clipped updates, the
weight sums, metric sums) becomes one vector of 64-bit ring elements:

1. floats are scaled by `scale` and stochastically rounded to integers
   (unbiased); integer tensors are taken as they are;
2. the tensors of the DP sum get this silo's share of discrete Gaussian noise,
   `N_Z(0, local_stddev^2)` per coordinate, drawn from a ChaCha20 stream the
   coordinator cannot predict;
3. the silo's pairwise masks are added modulo 2^64 (`key_agreement`).

The coordinator adds the silos' vectors modulo 2^64: the masks cancel, and
only the sum of the encoded partials, with the sum of the noise shares, is
left. `decode_sum` reads it back as centred integers and divides by the scale.

Nothing can wrap: each silo refuses to encode a coordinate whose magnitude
reaches `2^62 / num_silos` (so the sum of all silos stays below 2^62), and
`check_range` tells before the round, from the clip norm, the users a silo
can hold and the noise, whether the DP sum fits.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from fedpipe.computations import discrete_gaussian
from fedpipe.errors import FedpipeError

RING_BITS = 64
_LIMIT = 2**62
# Noise beyond this many standard deviations is treated as impossible when
# planning a round's range (probability below 1e-20 a coordinate); a sample
# that far out is still caught by the encoder's own check, never wrapped.
_NOISE_TAIL_STDDEVS = 10.0


class SecureSumError(FedpipeError, ValueError):
  """A partial aggregate cannot be encoded, or a sum cannot be decoded, as asked."""


class SecureSumRangeError(SecureSumError):
  """The values (or the planned round) would not fit the 64-bit ring without wrapping."""


@dataclasses.dataclass(frozen=True)
class TensorLayout:
  """Shapes and dtypes of the tensors a ring vector carries, in order."""

  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[str, ...]

  @property
  def sizes(self) -> tuple[int, ...]:
    return tuple(math.prod(s) for s in self.shapes)

  @property
  def size(self) -> int:
    return sum(self.sizes)

  @classmethod
  def of(cls, tensors: Sequence[np.ndarray]) -> TensorLayout:
    arrays = [np.asarray(t) for t in tensors]
    for i, a in enumerate(arrays):
      if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise SecureSumError(f'tensor {i} has dtype {a.dtype}; only numbers can be summed')
    return cls(tuple(a.shape for a in arrays), tuple(a.dtype.str for a in arrays))

  def is_float(self, index: int) -> bool:
    return np.issubdtype(np.dtype(self.dtypes[index]), np.floating)


@dataclasses.dataclass(frozen=True)
class EncodingSpec:
  """How every silo of a round encodes its partial aggregate.

  Attributes:
    scale: Float values are multiplied by this before rounding (integer units
      per unit); larger keeps more precision and needs more range.
    local_stddev: This silo's share of discrete Gaussian noise on each
      coordinate of the noised tensors, in integer units. 0 only in the
      noise-free test mode, which a production policy refuses.
    noised: Per tensor, whether it is part of the DP sum and gets noise.
    num_silos: Silos whose vectors are summed (bounds each one's range).
  """

  scale: float
  local_stddev: float
  noised: tuple[bool, ...]
  num_silos: int

  def __post_init__(self):
    if not (math.isfinite(self.scale) and self.scale > 0):
      raise SecureSumError(f'scale must be a positive number, got {self.scale!r}')
    if not (math.isfinite(self.local_stddev) and self.local_stddev >= 0):
      raise SecureSumError(f'local_stddev must be >= 0, got {self.local_stddev!r}')
    if not (isinstance(self.num_silos, int) and self.num_silos >= 1):
      raise SecureSumError(f'num_silos must be a whole number >= 1, got {self.num_silos!r}')

  @property
  def max_magnitude(self) -> int:
    """The largest |integer| one silo may put on a coordinate."""
    return _LIMIT // self.num_silos - 1


def encode_partial(
  tensors: Sequence[np.ndarray],
  spec: EncodingSpec,
  random: discrete_gaussian.CryptoRandom,
) -> tuple[np.ndarray, TensorLayout]:
  """Scales, rounds and noises a silo's partial aggregate into ring elements (not yet masked).

  Returns:
    (uint64 vector, its layout).

  Raises:
    SecureSumError: If `spec.noised` does not match the tensors.
    SecureSumRangeError: Naming the tensor whose values are too large for
      the ring at this scale and number of silos.
  """
  layout = TensorLayout.of(tensors)
  if len(spec.noised) != len(layout.shapes):
    raise SecureSumError(
      f'the encoding spec marks {len(spec.noised)} tensors as noised or not; '
      f'the partial aggregate has {len(layout.shapes)}'
    )
  parts = []
  for i, tensor in enumerate(tensors):
    flat = np.asarray(tensor).reshape(-1)
    if layout.is_float(i):
      scaled = flat.astype(np.float64) * spec.scale
      if not np.all(np.isfinite(scaled)):
        raise SecureSumRangeError(f'tensor {i} of the partial aggregate has non-finite values')
      _check_magnitude(np.abs(scaled), spec, i)
      integers = discrete_gaussian.stochastic_round(scaled, random)
    else:
      integers = flat.astype(np.int64)
    if spec.noised[i] and spec.local_stddev > 0:
      integers = integers + discrete_gaussian.sample_discrete_gaussian(
        spec.local_stddev, integers.size, random
      )
    _check_magnitude(np.abs(integers), spec, i)
    parts.append(integers)
  vector = np.concatenate(parts) if parts else np.zeros(0, np.int64)
  return vector.astype(np.int64).view(np.uint64), layout


def _check_magnitude(magnitudes: np.ndarray, spec: EncodingSpec, index: int) -> None:
  too_large = int(np.count_nonzero(magnitudes > spec.max_magnitude))
  if too_large:
    raise SecureSumRangeError(
      f'{too_large} value(s) of tensor {index} of the partial aggregate reach '
      f'2^62/{spec.num_silos} at scale {spec.scale:g}: the sum over {spec.num_silos} silos '
      'could wrap. Lower the secure-aggregation scale'
    )


def add_mask(encoded: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """`encoded + mask` modulo 2^64."""
  if encoded.dtype != np.uint64 or mask.dtype != np.uint64 or encoded.shape != mask.shape:
    raise SecureSumError(
      f'a mask of {mask.shape} {mask.dtype} cannot mask a vector of {encoded.shape} {encoded.dtype}'
    )
  return encoded + mask


def modular_sum(vectors: Sequence[np.ndarray]) -> np.ndarray:
  """The sum of the silos' masked vectors modulo 2^64 (all of the same length).

  Raises:
    SecureSumError: If there are none, or they differ in length or type.
  """
  if not vectors:
    raise SecureSumError('no vectors to sum')
  total = np.zeros_like(vectors[0], dtype=np.uint64)
  for i, vector in enumerate(vectors):
    if vector.dtype != np.uint64 or vector.shape != total.shape:
      raise SecureSumError(
        f'vector {i} is {vector.shape} {vector.dtype}; expected {total.shape} uint64'
      )
    total += vector
  return total


def decode_sum(total: np.ndarray, layout: TensorLayout, scale: float) -> list[np.ndarray]:
  """The summed tensors: centred integers, float tensors divided by `scale`.

  Raises:
    SecureSumError: If `total` does not have the layout's length.
  """
  if total.dtype != np.uint64 or total.shape != (layout.size,):
    raise SecureSumError(
      f'the sum has {total.shape} {total.dtype}; the layout needs ({layout.size},) uint64'
    )
  centred = total.view(np.int64)
  tensors, offset = [], 0
  for i, (shape, size) in enumerate(zip(layout.shapes, layout.sizes)):
    part = centred[offset : offset + size]
    offset += size
    dtype = np.dtype(layout.dtypes[i])
    values = part.astype(np.float64) / scale if layout.is_float(i) else part
    tensors.append(values.astype(dtype).reshape(shape))
  return tensors


def check_range(
  *,
  clip_norm: float,
  max_users_per_silo: int,
  num_silos: int,
  scale: float,
  local_stddev: float,
) -> None:
  """Checks before a round that each silo's noised DP sum fits its share of the ring.

  A user's clipped, weight-capped summand has L2 norm, hence every
  coordinate, at most `clip_norm`; rounding adds less than 1 and the noise
  share stays within `_NOISE_TAIL_STDDEVS` standard deviations.

  Raises:
    SecureSumRangeError: Saying how large the values could get and the fix.
  """
  spec = EncodingSpec(scale=scale, local_stddev=local_stddev, noised=(), num_silos=num_silos)
  worst = max_users_per_silo * clip_norm * scale + 1 + _NOISE_TAIL_STDDEVS * local_stddev
  if worst > spec.max_magnitude:
    raise SecureSumRangeError(
      f'a silo with {max_users_per_silo} users at clip norm {clip_norm:g} and scale '
      f'{scale:g} could put {worst:.3g} on a coordinate; with {num_silos} silos each may put '
      f'at most {spec.max_magnitude:.3g} (2^62/{num_silos}). Lower the scale to at most '
      f'{(spec.max_magnitude - 1 - _NOISE_TAIL_STDDEVS * local_stddev) / (max_users_per_silo * clip_norm):.3g}'
    )

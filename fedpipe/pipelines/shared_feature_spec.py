"""The shared feature spec: a draft spec filled in with the federation's statistics.

Every silo preprocesses with the same spec, so normalization uses the whole
federation's statistics and categorical features one vocabulary, computed
with federated statistics (`fedpipe-stats`) without pooling any data.
"""

from __future__ import annotations

import dataclasses
import math

from fedpipe.errors import FedpipeError
from fedpipe.pipelines import feature_spec as feature_spec_lib
from fedpipe.statistics import combine as combine_lib


class SharedSpecError(FedpipeError, ValueError):
  """The statistics cannot fill the draft spec (a feature lacks them, a vocabulary is empty)."""


# A numeric feature's noised std is used only when its standard error is at
# most this fraction of it; otherwise the feature keeps min-max scaling by its
# declared bounds (see `unreliable_scaling`).
MAX_RELATIVE_STD_ERROR = 0.5


def unreliable_scaling(
  statistics: combine_lib.FederatedStatistics,
  *,
  max_relative_std_error: float = MAX_RELATIVE_STD_ERROR,
) -> dict[str, str]:
  """Numeric features whose noised std is too uncertain to standardize by, each with why.

  The variance comes from sums of values centred on the middle of the
  declared bounds; when the data sit far from that middle (a skewed column
  declared with wide bounds) the noise of the two sums cancels badly and the
  estimate can even come out negative.
  """
  out = {}
  for name, e in statistics.numeric.items():
    if not (math.isfinite(e.std) and e.std > 0 and e.std_se <= max_relative_std_error * e.std):
      out[name] = (
        f'std {e.std:.4g} ± {e.std_se:.2g} is too uncertain to standardize by; it keeps '
        'min-max scaling by its declared bounds (declare tighter bounds, allow fewer rows per '
        'user or use less noise for a usable std)'
      )
  return out


def shared_feature_spec(
  draft: feature_spec_lib.FeatureSpec,
  statistics: combine_lib.FederatedStatistics,
  *,
  max_relative_std_error: float = MAX_RELATIVE_STD_ERROR,
) -> feature_spec_lib.FeatureSpec:
  """`draft` with each numeric feature's mean/std and each categorical feature's vocabulary.

  Declared min/max are kept (they validate records); the clipping bounds
  the statistics suggest are in the report. A numeric feature whose std is
  too uncertain (`unreliable_scaling`) gets no mean/std: it is scaled by
  its declared bounds instead.

  Raises:
    SharedSpecError: If a feature of `draft` has no statistics, or no value
      of a categorical feature was released by any silo.
  """
  features = []
  for f in draft.features:
    if getattr(f, 'kind', 'numeric') == 'categorical':
      estimate = statistics.categorical.get(f.name)
      if estimate is None:
        raise SharedSpecError(f'categorical feature {f.name!r} has no statistics')
      if not estimate.vocabulary:
        raise SharedSpecError(
          f'no silo released any value of categorical feature {f.name!r} (every value is held '
          'by too few users for its noisy count to pass the threshold); use less noise, more '
          'data, or drop the feature'
        )
      features.append(dataclasses.replace(f, vocabulary=tuple(estimate.vocabulary)))
    else:
      estimate = statistics.numeric.get(f.name)
      if estimate is None:
        raise SharedSpecError(f'numeric feature {f.name!r} has no statistics')
      if f.name in unreliable_scaling(statistics, max_relative_std_error=max_relative_std_error):
        features.append(f)
      else:
        features.append(dataclasses.replace(f, mean=estimate.mean, std=estimate.std))
  return dataclasses.replace(draft, features=tuple(features))

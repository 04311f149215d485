"""The shared feature spec: a draft spec filled in with the federation's statistics.

Every silo preprocesses with the same spec, so normalization uses the whole
federation's statistics and categorical features one vocabulary, computed
with federated statistics (`fedpipe-stats`) without pooling any data.
"""

from __future__ import annotations

import dataclasses

from fedpipe.errors import FedpipeError
from fedpipe.pipelines import feature_spec as feature_spec_lib
from fedpipe.statistics import combine as combine_lib


class SharedSpecError(FedpipeError, ValueError):
  """The statistics cannot fill the draft spec (a feature lacks them, a vocabulary is empty)."""


def shared_feature_spec(
  draft: feature_spec_lib.FeatureSpec, statistics: combine_lib.FederatedStatistics
) -> feature_spec_lib.FeatureSpec:
  """`draft` with each numeric feature's mean/std and each categorical feature's vocabulary.

  Declared min/max are kept (they validate records); the clipping bounds
  the statistics suggest are in the report.

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
      features.append(dataclasses.replace(f, mean=estimate.mean, std=estimate.std))
  return dataclasses.replace(draft, features=tuple(features))

"""A draft spec filled with the federation's statistics, and what it refuses to fill."""

import pytest

from fedpipe.pipelines import feature_spec as fs
from fedpipe.pipelines import shared_feature_spec
from fedpipe.statistics import combine

DRAFT = fs.FeatureSpec.from_json(
  {
    'schema_version': 2,
    'client_key': 'user',
    'label': {'name': 'y', 'task': 'binary'},
    'features': [
      {'name': 'age', 'min': 18, 'max': 90},
      {'name': 'tenure', 'min': 0, 'max': 600},
      {'name': 'region', 'type': 'categorical', 'max_values_per_user': 1},
    ],
  }
)


def _numeric(name, std, std_se):
  return combine.NumericEstimate(
    name=name,
    rows=1000.0,
    rows_se=10.0,
    mean=40.0,
    mean_se=0.5,
    std=std,
    std_se=std_se,
    histogram=(500.0, 500.0),
    histogram_se=10.0,
    bin_edges=(0.0, 50.0, 100.0),
    clip_low=1.0,
    clip_high=99.0,
    clip_quantiles=(0.01, 0.99),
  )


def _statistics(tenure_std, tenure_se, vocabulary=('north', 'south')):
  return combine.FederatedStatistics(
    numeric={
      'age': _numeric('age', 15.0, 0.2),
      'tenure': _numeric('tenure', tenure_std, tenure_se),
    },
    categorical={
      'region': combine.CategoricalEstimate(
        name='region',
        vocabulary=tuple(vocabulary),
        counts={v: 100.0 for v in vocabulary},
        counts_se={v: 5.0 for v in vocabulary},
        released_by={v: ('silo-a',) for v in vocabulary},
      )
    },
    silos=('silo-a',),
  )


def test_fills_means_stds_and_vocabularies_and_the_spec_encodes():
  shared = shared_feature_spec.shared_feature_spec(DRAFT, _statistics(40.0, 3.0))
  assert not shared.is_draft
  age, tenure, region = shared.features
  assert (age.mean, age.std, age.min, age.max) == (40.0, 15.0, 18.0, 90.0)
  assert (tenure.mean, tenure.std) == (40.0, 40.0)
  assert region.vocabulary == ('north', 'south')
  _, x, y = shared.parse_record({'user': 'u', 'y': '1', 'age': 55, 'tenure': 80, 'region': 'x'})
  assert x[:2] == [1.0, 1.0] and x[2:] == [0.0, 0.0, 1.0] and y == 1  # 'x': out of vocabulary.


@pytest.mark.parametrize('std,std_se', [(0.0003, 1.3e6), (40.0, 30.0), (float('nan'), 1.0)])
def test_a_std_too_uncertain_to_standardize_by_keeps_min_max_scaling_and_says_why(std, std_se):
  statistics = _statistics(std, std_se)
  shared = shared_feature_spec.shared_feature_spec(DRAFT, statistics)
  tenure = shared.features[1]
  assert tenure.mean is None and tenure.std is None and (tenure.min, tenure.max) == (0, 600)
  assert shared.features[0].std == 15.0  # The reliable one is used.
  (why,) = shared_feature_spec.unreliable_scaling(statistics).values()
  assert 'declared bounds' in why
  _, x, _ = shared.parse_record(
    {'user': 'u', 'y': '0', 'age': 40, 'tenure': 300, 'region': 'north'}
  )
  assert x[1] == 0.5  # (300 - 0) / (600 - 0).


def test_a_categorical_feature_with_no_released_value_is_refused_naming_it():
  with pytest.raises(shared_feature_spec.SharedSpecError, match="'region'"):
    shared_feature_spec.shared_feature_spec(DRAFT, _statistics(40.0, 3.0, vocabulary=()))

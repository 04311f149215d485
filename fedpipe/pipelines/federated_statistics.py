"""A federated statistics study, start to end: draft spec in, shared feature spec and report out.

What `fedpipe-stats` runs, callable from a notebook: build the statistics
query from a draft feature spec, have every silo approve it, compute, noise
and charge its statistics (`fedpipe.federation.statistics_study`), combine
the noised releases (`fedpipe.statistics.combine`), fill the draft with the
federation's means, standard deviations and vocabularies
(`shared_feature_spec`), and write the spec and the report (JSON and one
PNG per feature).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fedpipe.federation import cross_silo, statistics_study
from fedpipe.federation import tls as tls_lib
from fedpipe.pipelines import feature_spec as feature_spec_lib
from fedpipe.pipelines import shared_feature_spec
from fedpipe.statistics import combine as combine_lib
from fedpipe.statistics import query as statistics_query
from fedpipe.statistics import report as report_lib

SHARED_SPEC_FILENAME = 'feature_spec.json'
# Delta spent on releasing categorical values, when the draft has any.
DEFAULT_THRESHOLD_DELTA = 1e-7


@dataclasses.dataclass(frozen=True)
class StatisticsSettings:
  """How the statistics are computed and protected (what each silo approves).

  Attributes:
    max_rows_per_user: Rows one user contributes at most.
    histogram_bins: Histogram bins of every numeric feature.
    noise_multiplier: Noise standard deviation over the whole release's L2
      sensitivity (0: noise-free, for a silo whose policy allows it).
    threshold_delta: δ spent releasing categorical values; None: 1e-7 with
      categorical features, else 0.
    releases: Releases to ask each silo to approve.
    clip_quantiles: Histogram quantiles reported as clipping bounds.
  """

  max_rows_per_user: int = 10
  histogram_bins: int = 20
  noise_multiplier: float = 1.0
  threshold_delta: float | None = None
  releases: int = 1
  clip_quantiles: tuple[float, float] = (0.01, 0.99)


@dataclasses.dataclass(frozen=True)
class StatisticsResult:
  """What a study produced.

  Attributes:
    study_id: The statistics study's id at every silo.
    shared_spec: The draft filled in with the federation's statistics.
    combined: The combined statistics with their standard errors.
    epsilon: Silo -> ε its release cost (at its policy's δ); None for a
      noise-free release (test mode: no guarantee).
    spec_path: Where the shared spec was written.
    report_path: The report JSON.
    plots: Feature -> its PNG.
  """

  study_id: str
  shared_spec: feature_spec_lib.FeatureSpec
  combined: combine_lib.FederatedStatistics
  epsilon: Mapping[str, float | None]
  spec_path: str
  report_path: str
  plots: Mapping[str, str]


def build_query(
  draft: feature_spec_lib.FeatureSpec, settings: StatisticsSettings, *, name: str
) -> statistics_query.StatisticsQuery:
  """The statistics query of a draft spec: what every silo is asked to approve.

  Raises:
    statistics_query.StatisticsQueryError: If a setting or the spec cannot
      make a query (a numeric feature without both bounds, say); the message
      names it.
  """
  has_categorical = any(f.kind == 'categorical' for f in draft.features)
  threshold_delta = settings.threshold_delta
  if threshold_delta is None:
    threshold_delta = DEFAULT_THRESHOLD_DELTA if has_categorical else 0.0
  return statistics_query.StatisticsQuery(
    name=name,
    feature_spec=draft.to_json(),
    histogram_bins={
      f.name: settings.histogram_bins for f in draft.features if f.kind != 'categorical'
    },
    max_rows_per_user=settings.max_rows_per_user,
    noise_multiplier=settings.noise_multiplier,
    threshold_delta=threshold_delta,
    releases=settings.releases,
  )


def submit(
  draft: feature_spec_lib.FeatureSpec,
  silos: Sequence[cross_silo.SiloAddress],
  tls: tls_lib.TlsFiles,
  settings: StatisticsSettings,
  *,
  name: str,
  timeout_s: float = 900.0,
  progress: Callable[[str], None] = lambda line: None,
) -> str:
  """Submits the study to every silo for its owner's review; returns its id."""
  query = build_query(draft, settings, name=name)
  statistics_study.run_statistics_study(
    silos, tls, query, timeout_s=timeout_s, submit_only=True, progress=progress
  )
  return query.study_id


def compute_shared_spec(
  draft: feature_spec_lib.FeatureSpec,
  silos: Sequence[cross_silo.SiloAddress],
  tls: tls_lib.TlsFiles,
  settings: StatisticsSettings,
  output_dir: str,
  *,
  name: str,
  wait_s: float = 0.0,
  timeout_s: float = 900.0,
  progress: Callable[[str], None] = lambda line: None,
) -> StatisticsResult:
  """Runs the study at every silo, combines the releases, writes the shared spec and report.

  Args:
    draft: The draft spec: features with declared bounds, categorical
      features without vocabularies.
    silos: The silos, each serving raw data (`fedpipe-silo --raw_data`).
    tls: The coordinator's certificate and key and the federation's CA.
    settings: The study's settings.
    output_dir: Gets `feature_spec.json`, `statistics_report.json` and
      `plots/`.
    name: The study's name, shown to the data owners.
    wait_s: How long to wait for every owner's approval.
    timeout_s: The most one silo call may take.
    progress: Called with one line per step.

  Returns:
    A `StatisticsResult`.

  Raises:
    statistics_study.StatisticsStudyNotReadyError: If a silo has not
      approved the study (nothing was released).
    cross_silo.SiloError: If a silo cannot be reached or refuses.
    shared_feature_spec.SharedSpecError: If the statistics cannot fill the
      draft (no value of a categorical feature passed the threshold).
  """
  query = build_query(draft, settings, name=name)
  replies = statistics_study.run_statistics_study(
    silos, tls, query, wait_s=wait_s, timeout_s=timeout_s, progress=progress
  )
  combined = combine_lib.combine(
    query, {n: r.release for n, r in replies.items()}, clip_quantiles=settings.clip_quantiles
  )
  shared = shared_feature_spec.shared_feature_spec(draft, combined)
  os.makedirs(output_dir, exist_ok=True)
  spec_path = os.path.join(output_dir, SHARED_SPEC_FILENAME)
  shared.save(spec_path)
  releases: dict[str, Mapping[str, Any]] = {
    n: {
      'release_number': r.release_number,
      'epsilon': r.epsilon,
      'delta': r.delta,
      'release': r.release,
    }
    for n, r in replies.items()
  }
  written = report_lib.write_report(
    output_dir, study_id=query.study_id, query=query, releases=releases, combined=combined
  )
  return StatisticsResult(
    study_id=query.study_id,
    shared_spec=shared,
    combined=combined,
    epsilon={n: None if r.epsilon is None else float(r.epsilon) for n, r in replies.items()},
    spec_path=spec_path,
    report_path=written['report'],
    plots=written['plots'],
  )


def summary_lines(result: StatisticsResult) -> list[str]:
  """Lines describing the combined statistics, for a program to print."""
  lines = []
  for name, e in result.combined.numeric.items():
    lines.append(
      f'  {name}: mean {e.mean:.4g} ± {e.mean_se:.2g}, std {e.std:.4g} ± {e.std_se:.2g}, '
      f'clip [{e.clip_low:.4g}, {e.clip_high:.4g}]'
    )
  for name, why in shared_feature_spec.unreliable_scaling(result.combined).items():
    lines.append(f'  warning: {name}: {why}')
  for name, e in result.combined.categorical.items():
    lines.append(
      f'  {name}: vocabulary of {len(e.vocabulary)} values: {", ".join(e.vocabulary[:10])}'
    )
  spent = ', '.join(
    f'{n} ε {"unbounded (noise-free)" if eps is None else f"{eps:.3g}"}'
    for n, eps in sorted(result.epsilon.items())
  )
  lines.append(f'privacy: {spent}')
  lines.append(f'shared feature spec: {result.spec_path}')
  lines.append(f'report: {result.report_path} ({len(result.plots)} plots)')
  return lines

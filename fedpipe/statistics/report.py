"""The coordinator's statistics report: every released value with its standard error, and plots.

`write_report` writes `<out_dir>/statistics_report.json` (the query, each
silo's release with the noise standard deviation of every value, its ε, and
the combined statistics with their standard errors) and one PNG per feature
under `<out_dir>/plots/`: a numeric feature's combined histogram with
error bars of ±1.96 standard errors and its mean ± std, a categorical
feature's user counts per released value with the same error bars.

Draws on its own `Figure` with the Agg canvas, never through pyplot.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

from fedpipe.statistics import combine as combine_lib
from fedpipe.statistics import query as query_lib

REPORT_FILENAME = 'statistics_report.json'
PLOTS_DIR = 'plots'
_Z95 = 1.959963984540054


def plot_filename(feature: str) -> str:
  """The PNG's file name for a feature (unsafe characters replaced)."""
  return re.sub(r'[^A-Za-z0-9_.-]', '_', feature) + '.png'


def write_report(
  out_dir: str,
  *,
  study_id: str,
  query: query_lib.StatisticsQuery,
  releases: Mapping[str, Mapping[str, Any]],
  combined: combine_lib.FederatedStatistics,
) -> dict[str, Any]:
  """Writes the report JSON and the plots.

  Args:
    out_dir: The output directory (created).
    study_id: The statistics study.
    query: Its query.
    releases: Silo -> `{'release_number', 'epsilon', 'delta', 'release'}`.
    combined: `combine.combine(query, ...)`.

  Returns:
    `{'report': path, 'plots': {feature: path}}`.
  """
  os.makedirs(os.path.join(out_dir, PLOTS_DIR), exist_ok=True)
  report = {
    'study_id': study_id,
    'query': query.to_json(),
    'silos': {name: dict(r) for name, r in sorted(releases.items())},
    'combined': combined.to_json(),
    'notes': {
      'standard_errors': 'from the known DP noise only (the data held fixed), delta method',
      'clipping_bounds': (
        'clip_low/clip_high are histogram quantiles; the shared feature spec keeps the '
        'declared min/max (validation bounds)'
      ),
      'vocabulary': (
        'values some silo released (noisy user count above its threshold), sorted; counts '
        'sum the releasing silos only'
      ),
    },
  }
  path = os.path.join(out_dir, REPORT_FILENAME)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=2, sort_keys=False)
    f.write('\n')
  plots = {}
  for name, estimate in combined.numeric.items():
    plots[name] = _plot_numeric(out_dir, estimate)
  for name, estimate in combined.categorical.items():
    plots[name] = _plot_categorical(out_dir, estimate)
  return {'report': path, 'plots': plots}


def _figure():
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(6.5, 3.8))
  FigureCanvasAgg(fig)
  return fig, fig.subplots()


def _plot_numeric(out_dir: str, e: combine_lib.NumericEstimate) -> str:
  fig, ax = _figure()
  edges = e.bin_edges
  centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
  widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
  ax.bar(centers, e.histogram, width=widths, color='#7aa6c2', edgecolor='white')
  ax.errorbar(
    centers, e.histogram, yerr=_Z95 * e.histogram_se, fmt='none', ecolor='black', capsize=2
  )
  ax.axvline(e.mean, color='#c0392b', label=f'mean {e.mean:.4g} ± {_Z95 * e.mean_se:.2g}')
  for bound in (e.clip_low, e.clip_high):
    ax.axvline(bound, color='#555555', linestyle='--', linewidth=1)
  ax.set_title(f'{e.name}: std {e.std:.4g} ± {_Z95 * e.std_se:.2g}, {e.rows:.0f} rows')
  ax.set_xlabel(f'{e.name} (dashed: {e.clip_quantiles[0]:g}/{e.clip_quantiles[1]:g} quantiles)')
  ax.set_ylabel('rows (noisy, 95% error bars)')
  ax.legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(out_dir, PLOTS_DIR, plot_filename(e.name))
  fig.savefig(path, dpi=90)
  return path


def _plot_categorical(out_dir: str, e: combine_lib.CategoricalEstimate) -> str:
  fig, ax = _figure()
  values = list(e.vocabulary)
  counts = [e.counts[v] for v in values]
  errors = [_Z95 * e.counts_se[v] for v in values]
  positions = list(range(len(values)))
  ax.bar(positions, counts, color='#82b38b')
  ax.errorbar(positions, counts, yerr=errors, fmt='none', ecolor='black', capsize=2)
  ax.set_xticks(positions)
  ax.set_xticklabels(values, rotation=45 if len(values) > 6 else 0, ha='right', fontsize=8)
  ax.set_title(f'{e.name}: {len(values)} values released')
  ax.set_ylabel('users (noisy, 95% error bars)')
  fig.tight_layout()
  path = os.path.join(out_dir, PLOTS_DIR, plot_filename(e.name))
  fig.savefig(path, dpi=90)
  return path

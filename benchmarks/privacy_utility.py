"""Benchmark 4: held-out accuracy against ε on digits, fixed and adaptive clipping, over seeds."""

from __future__ import annotations

import statistics

from benchmarks import harness
from configs import digits_dp


def run(*, quick: bool = False) -> list[harness.Table]:
  rounds = 30 if quick else digits_dp.get_config().training.rounds
  seeds = [1, 2] if quick else [1, 2, 3, 4, 5]
  noise = [1.0, 3.0] if quick else [0.7, 1.2, 1.9, 2.5]
  demo_noise = digits_dp.get_config().dp.noise_multiplier
  points = {'fixed': [], 'adaptive': []}
  curve = [{'dp': False}] + [
    {'noise_multiplier': z, 'clipping': clipping} for clipping in points for z in noise
  ]
  # A process per point: a crashed point cannot take the others down.
  results = [
    harness.measure(
      'benchmarks.privacy_utility_measure', {'rounds': rounds, 'seeds': seeds, **point}
    )
    for point in curve
  ]
  rows = []
  ceiling = None
  for point, r in zip(curve, results):
    accuracies = r['accuracies']
    summary = [
      round(statistics.median(accuracies), 4),
      round(min(accuracies), 4),
      round(max(accuracies), 4),
      r['seconds'],
    ]
    if not point.get('dp', True):
      ceiling = statistics.median(accuracies)
      rows.append(['none (no DP)', '-', 'inf', *summary])
      continue
    points[point['clipping']].append((r['epsilon'], accuracies))
    z = point['noise_multiplier']
    label = f'{z} (demo)' if z == demo_noise and point['clipping'] == 'fixed' else z
    rows.append([point['clipping'], label, r['epsilon'], *summary])
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  plot = harness.plot_path('privacy_utility.png')
  fig, ax = plt.subplots(figsize=(6, 3.8))
  for clipping, pts in points.items():
    pts = sorted(pts)
    medians = [statistics.median(p[1]) for p in pts]
    spread = [
      [m - min(p[1]) for m, p in zip(medians, pts)],
      [max(p[1]) - m for m, p in zip(medians, pts)],
    ]
    ax.errorbar(
      [p[0] for p in pts], medians, yerr=spread, marker='o', capsize=3, label=f'{clipping} clipping'
    )
  ax.axhline(ceiling, linestyle='--', color='gray', label='no DP')
  ax.set_xscale('log')
  ax.set_xlabel('epsilon (delta = 1e-5)')
  ax.set_ylabel('held-out accuracy')
  ax.set_title(f'Digits, 300 clients, 60 a round, {rounds} rounds')
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(plot, dpi=100)
  plt.close(fig)
  return [
    harness.Table(
      'Privacy-utility: held-out accuracy against epsilon',
      [
        'clipping',
        'noise multiplier',
        'epsilon',
        f'test accuracy, median of {len(seeds)} seeds',
        'worst seed',
        'best seed',
        's per run',
      ],
      rows,
      [
        f'configs/digits_dp.py (the demo: its model, learning rates and clipping) with {rounds} '
        f'rounds (Poisson sampling, rate 0.2, RDP accountant, delta 1e-5), at each noise '
        f'multiplier; one run per sampling seed ({", ".join(map(str, seeds))}), all from the '
        f'same initial model. Plot (median, bars to the worst and best seed): '
        f'{harness.shown_path(plot)}',
        'Each point builds its experiment once in its own process, then trains once per seed '
        '(cohort engine, local isolated worker) and evaluates on the held-out users; '
        '"s per run" is the median wall time of one seed\'s rounds and evaluation.',
      ],
    )
  ]

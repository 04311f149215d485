"""Benchmark 4: held-out accuracy against ε on digits, fixed and adaptive clipping."""

from __future__ import annotations

from benchmarks import harness


def run(*, quick: bool = False) -> list[harness.Table]:
  rounds = 30  # Each point is a whole training run: more rounds lengthen every point.
  noise = [1.0, 3.0] if quick else [0.7, 1.2, 2.5]
  points = {'fixed': [], 'adaptive': []}
  curve = [{'dp': False}] + [
    {'noise_multiplier': z, 'clipping': clipping} for clipping in points for z in noise
  ]
  # A process per point: a crashed point cannot take the others down.
  results = [
    harness.measure('benchmarks.privacy_utility_measure', {'rounds': rounds, **point})
    for point in curve
  ]
  rows = []
  ceiling = None
  for point, r in zip(curve, results):
    if not point.get('dp', True):
      ceiling = r['test_accuracy']
      rows.append(['none (no DP)', '-', 'inf', ceiling, r['seconds']])
      continue
    points[point['clipping']].append((r['epsilon'], r['test_accuracy']))
    rows.append(
      [point['clipping'], point['noise_multiplier'], r['epsilon'], r['test_accuracy'], r['seconds']]
    )
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  plot = harness.plot_path('privacy_utility.png')
  fig, ax = plt.subplots(figsize=(6, 3.8))
  for clipping, pts in points.items():
    pts = sorted(pts)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker='o', label=f'{clipping} clipping')
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
      ['clipping', 'noise multiplier', 'epsilon', 'test accuracy', 'training s'],
      rows,
      [
        f'configs/digits_dp.py with {rounds} rounds (Poisson sampling, rate 0.2, RDP '
        f'accountant, delta 1e-5), one seed per point. Plot: {harness.shown_path(plot)}',
        f'Every point is a full run of the training program in its own process (worker start, '
        f'{rounds} rounds, held-out evaluation, model export); "training s" is its wall time.',
      ],
    )
  ]

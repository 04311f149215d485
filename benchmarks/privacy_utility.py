"""Benchmark 4: held-out accuracy against ε on digits, fixed and adaptive clipping, over seeds."""

from __future__ import annotations

import statistics

from benchmarks import harness
from configs import digits_dp

# The demo's settings before it was tuned for the cohort engine's cheap rounds
# (ReLU, features in [0, 1], one local epoch of 16-example batches, noise
# calibrated with the RDP accountant), measured beside the tuned demo in the
# same run.
BEFORE_TUNING = {
  'model.activation': 'relu',
  'model.center_inputs': False,
  'training.batch_size': 16,
  'training.local_epochs': 1,
  'training.client_learning_rate': 0.2,
  'dp.accountant': 'rdp',
}
BEFORE_TUNING_NOISE = 1.9
# Issue 14's target for the tuned demo: median held-out accuracy over the
# seeds and the worst seed's, at epsilon <= 6.
TARGET_MEDIAN, TARGET_WORST, TARGET_EPSILON = 0.93, 0.91, 6.0


def run(*, quick: bool = False) -> list[harness.Table]:
  demo = digits_dp.get_config()
  rounds = 30 if quick else demo.training.rounds
  seeds = [1, 2] if quick else [1, 2, 3, 4, 5]
  demo_noise = demo.dp.noise_multiplier
  noise = [1.0, 3.0] if quick else [0.7, 1.2, demo_noise, 2.5]
  points = {'fixed': [], 'adaptive': []}
  curve = (
    [{'dp': False}]
    + [{'noise_multiplier': z, 'clipping': clipping} for clipping in points for z in noise]
    + [
      {
        'noise_multiplier': BEFORE_TUNING_NOISE,
        'clipping': 'fixed',
        'config': BEFORE_TUNING,
        'label': 'demo before tuning',
      }
    ]
  )
  # A process per point: a crashed point cannot take the others down.
  results = [
    harness.measure(
      'benchmarks.privacy_utility_measure',
      {'rounds': rounds, 'seeds': seeds, **{k: v for k, v in point.items() if k != 'label'}},
    )
    for point in curve
  ]
  rows = []
  ceiling = None
  demo_result = None
  for point, r in zip(curve, results):
    accuracies = r['accuracies']
    # Four decimals: one held-out example is 0.0028 of accuracy.
    summary = [
      f'{statistics.median(accuracies):.4f}',
      f'{min(accuracies):.4f}',
      f'{max(accuracies):.4f}',
      r['seconds'],
    ]
    if not point.get('dp', True):
      ceiling = statistics.median(accuracies)
      rows.append(['tuned demo, no DP', 'none', '-', 'inf', *summary])
      continue
    z = point['noise_multiplier']
    if 'label' in point:
      rows.append([point['label'], point['clipping'], z, r['epsilon'], *summary])
      continue
    points[point['clipping']].append((r['epsilon'], accuracies))
    is_demo = z == demo_noise and point['clipping'] == 'fixed'
    if is_demo:
      demo_result = (r['epsilon'], statistics.median(accuracies), min(accuracies))
    rows.append(
      ['tuned demo' if is_demo else 'tuned', point['clipping'], z, r['epsilon'], *summary]
    )
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
        'config',
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
        f'"tuned": configs/digits_dp.py (the demo: its model, learning rates and clipping) '
        f'with {rounds} rounds (Poisson sampling, rate 0.2, delta 1e-5, epsilon from the '
        f'{demo.dp.accountant.upper()} accountant) at each noise multiplier; "tuned demo" is '
        f'the demo itself. "demo before tuning": the same with '
        + ', '.join(f'{k}={v}' for k, v in BEFORE_TUNING.items())
        + f' and noise {BEFORE_TUNING_NOISE}. One run per sampling seed '
        f'({", ".join(map(str, seeds))}), all from the same initial model. Plot (tuned '
        f'config; median, bars to the worst and best seed): {harness.shown_path(plot)}',
        'Each point builds its experiment once in its own process, then trains once per seed '
        '(cohort engine, local isolated worker) and evaluates on the held-out users; '
        '"s per run" is the median wall time of one seed\'s rounds and evaluation.',
        _target_note(demo_result),
      ],
    )
  ]


def _target_note(demo_result: tuple[float, float, float] | None) -> str:
  """Issue 14's target for the tuned demo's row, met or MISSED."""
  target = (
    f'Target for the tuned demo: median >= {TARGET_MEDIAN} and worst seed >= {TARGET_WORST} '
    f'at epsilon <= {TARGET_EPSILON:g}'
  )
  if demo_result is None:
    return f"{target}: not measured (no row at the demo's noise)."
  epsilon, median, worst = demo_result
  met = epsilon <= TARGET_EPSILON and median >= TARGET_MEDIAN and worst >= TARGET_WORST
  return (
    f'{target}: {"met" if met else "MISSED"} (epsilon {epsilon:.3f}, median {median:.4f}, '
    f'worst {worst:.4f}). One run: the DP noise is fresh each run, so a rerun moves each '
    'figure by one or two held-out examples (0.0028 each).'
  )

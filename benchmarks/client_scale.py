"""Benchmark 2: cost and memory as the population and the round size grow."""

from __future__ import annotations

import numpy as np

from benchmarks import harness


def run(*, quick: bool = False) -> list[harness.Table]:
  grid = [(10, 10), (100, 10), (1000, 10), (10000, 10), (10000, 100), (10000, 1000)]
  if quick:
    grid = [(10, 10), (1000, 10), (1000, 100)]
  rounds = 4
  rows = []
  per_round_cost = {}
  for population, per_round in grid:
    r = harness.measure(
      'benchmarks.client_scale_measure',
      {'population': population, 'clients_per_round': per_round, 'rounds': rounds},
    )
    per_round_cost[(population, per_round)] = r['median_s']
    rows.append(
      [
        f'{population:,}',
        per_round,
        r['median_s'],
        1000 * r['median_s'] / per_round,
        r['coordinator_peak_mb'],
        r['worker_peak_mb'],
      ]
    )
  biggest = max(p for p, _ in grid)
  sizes = sorted(m for p, m in grid if p == biggest)
  notes = [
    'Virtual silos (one isolated worker), `tiny` workload: 8 examples a client, '
    '16-16-2 MLP, DP-FedAvg, fixed-size sampling; median of rounds 2..'
    f'{rounds}.'
  ]
  if len(sizes) >= 2:
    costs = [per_round_cost[(biggest, m)] for m in sizes]
    slope, intercept = np.polyfit(sizes, costs, 1)
    predicted = np.polyval([slope, intercept], sizes)
    worst = max(abs(c - p) / c for c, p in zip(costs, predicted))
    notes.append(
      f'Linear fit over clients per round at population {biggest:,}: '
      f'{1000 * slope:.1f} ms per client + {intercept:.2f} s per round; largest '
      f'deviation from the line {100 * worst:.0f}% (target: linear).'
    )
  small = [r for r in rows if r[1] == 10]
  notes.append(
    'Population at 10 clients per round, from '
    f'{small[0][0]} to {small[-1][0]} clients: coordinator peak '
    f'{small[0][4]:.0f} -> {small[-1][4]:.0f} MB, worker peak '
    f'{small[0][5]:.0f} -> {small[-1][5]:.0f} MB (target: flat).'
  )
  tables = [
    harness.Table(
      'Scale in clients: seconds per round and peak memory',
      [
        'population',
        'clients / round',
        's / round',
        'ms / client',
        'coordinator peak MB',
        'worker peak MB',
      ],
      rows,
      notes,
    )
  ]
  tables.append(_memory_over_rounds(quick))
  return tables


def _memory_over_rounds(quick: bool) -> harness.Table:
  """Memory every 20 rounds; the worker also with glibc's malloc arenas capped.

  The capped run tells allocator fragmentation (TF's many threads each get
  a malloc arena that keeps its high-water mark) from a leak.
  """
  rounds = 60 if quick else 200
  population = 1000 if quick else 10000
  r = harness.measure(
    'benchmarks.client_scale_measure',
    {
      'population': population,
      'clients_per_round': 10,
      'rounds': rounds,
      'memory_every': 20,
      'arena_control': True,
    },
  )
  memory = [m[:3] for m in r['memory']]
  capped = [[m[0], m[1], m[3]] for m in r['memory']]
  cap_cost = harness.median(r['capped_turn_ratios'])
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  plot = harness.plot_path('memory_over_rounds.png')
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot([m[0] for m in memory], [m[1] for m in memory], marker='o', label='coordinator')
  ax.plot([m[0] for m in memory], [m[2] for m in memory], marker='o', label='worker')
  ax.plot(
    [m[0] for m in capped], [m[2] for m in capped], marker='o', label='worker, MALLOC_ARENA_MAX=2'
  )
  ax.set_xlabel('round')
  ax.set_ylabel('resident memory (MB)')
  ax.set_title(f'Memory over {rounds} rounds, population {population:,}')
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(plot, dpi=100)
  plt.close(fig)

  def growth(series, column, start_index):
    return series[-1][column] - series[start_index][column]

  start = 1 if len(memory) > 1 else 0  # Round 1 is before steady state.
  half = len(memory) // 2
  notes = [
    f'From round {memory[start][0]} to {memory[-1][0]}: coordinator '
    f'{growth(memory, 1, start):+.0f} MB, worker {growth(memory, 2, start):+.0f} MB; '
    f'worker with MALLOC_ARENA_MAX=2 {growth(capped, 2, start):+.0f} MB (target: no growth).',
    f'Second half (round {memory[half][0]} to {memory[-1][0]}): worker '
    f'{growth(memory, 2, half):+.0f} MB, with MALLOC_ARENA_MAX=2 '
    f'{growth(capped, 2, half):+.0f} MB. glibc gives each busy thread a malloc arena that '
    'keeps its high-water mark; the capped worker is the control that tells that '
    'fragmentation from state kept across rounds. Both workers live in one coordinator and '
    'take turns round by round on the same clients.',
    f"The cap's effect on round time: capped / default seconds per round {cap_cost:.2f}x "
    f'(median of the per-round ratios, {r["capped_median_s"]:.3f} vs {r["median_s"]:.3f} s).',
    f'Plot: {harness.shown_path(plot)}',
  ]
  return harness.Table(
    f'Memory over {rounds} rounds (population {population:,}, 10 clients a round)',
    ['round', 'coordinator MB', 'worker MB', 'worker MB, MALLOC_ARENA_MAX=2'],
    [[m[0], m[1], m[2], c[2]] for m, c in zip(memory, capped)],
    notes,
  )

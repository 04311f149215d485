"""Benchmark: the cohort engine at 1,000 and 10,000 users a round (issue 14's scale targets)."""

from __future__ import annotations

from benchmarks import harness

TARGET_1000_S = 0.5  # 1,000 users a round from 10,000, seconds a round.


def run(*, quick: bool = False) -> list[harness.Table]:
  cases = [
    # (population, users a round, systems, rounds)
    (10_000, 1_000, ['cohort', 'per_client', 'plain_tff'], 3),
    (100_000, 10_000, ['cohort'], 4),
  ]
  if quick:
    cases = [(10_000, 1_000, ['cohort', 'per_client'], 3)]
  rows, notes = [], []
  for population, per_round, systems, rounds in cases:
    r = harness.measure(
      'benchmarks.cohort_scale_measure',
      {
        'population': population,
        'clients_per_round': per_round,
        'systems': systems,
        'rounds': rounds,
      },
      timeout_s=3600,
    )
    median = r['median_s']
    cohort = median['cohort']
    per_client, plain = median.get('per_client'), median.get('plain_tff')
    rows.append(
      [
        f'{population:,}',
        f'{per_round:,}',
        cohort,
        per_client if per_client is not None else '-',
        plain if plain is not None else '-',
        cohort / plain if plain else '-',
        r['cohorts_per_round'],
        r['worker_idle_mb'],
        r['worker_peak_mb'],
        r['worker_peak_mb'] - r['worker_idle_mb'],
      ]
    )
    if per_round == 1_000:
      notes.append(
        f'1,000 users a round from 10,000: cohort {cohort:.3f} s a round (target <= '
        f'{TARGET_1000_S} s: {harness.verdict(cohort, TARGET_1000_S)}).'
      )
  notes += [
    '`tiny` workload (8 examples a user, 16-16-2 MLP), DP-FedAvg (noise multiplier 1, clip 1), '
    'users drawn without replacement; median of rounds 2.., systems taking turns on the same '
    "users. Client data in fedpipe's SQLite layout, read where the worker runs.",
    "Cohorts: `runtime.cohort_memory_mb`=256's rule, at least one per core. Worker memory: "
    "resident set of the cohort engine's worker after building (idle) and its peak; the "
    'growth is what the rounds held, to set against the 256 MB budget.',
    'The per-client engine and plain TFF are not run at 10,000 users a round (their cost '
    'grows with each user: minutes a round).',
  ]
  return [
    harness.Table(
      'Cohort engine at scale: seconds per round and worker memory',
      [
        'population',
        'users / round',
        'cohort s',
        'per-client s',
        'plain TFF s',
        'cohort / plain TFF',
        'cohorts',
        'worker idle MB',
        'worker peak MB',
        'growth MB',
      ],
      rows,
      notes,
    )
  ]

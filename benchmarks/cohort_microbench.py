"""Microbenchmark: a digits round's local training, the cohort engine against per-client loops.

    .venv/bin/python -m benchmarks.cohort_microbench [--clients 100,1000] [--repetitions 5]

The digits DP demo's model (64 features, one hidden layer of 64, 10 classes),
scikit-learn's digits split near-equally over the clients, one local epoch of
batch 16, fixed clipping and a weight cap as DP-FedAvg runs them. Seconds of
one round's local training and aggregation sum, median over repetitions after
a warm-up round:

- cohort: `cohort_training.CohortRunner`, all clients in one call,
  vectorized over clients;
- sequential: the same graph with `vectorize=False` (the clients one after
  another inside each step, one call);
- per-client calls: the same graph called once per client (a one-client
  cohort each): the same math with a call per client, as an executor pays
  (a TensorFlow session call here, which costs less than a TFF executor's).

Standalone: not part of `benchmarks.run_all`.
"""

from __future__ import annotations

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from benchmarks import workloads
from fedpipe.computations import cohort_training, keras_model

BATCH_SIZE = 16
LEARNING_RATE = 0.2
CLIP_NORM = 0.3
HIDDEN_UNITS = (64,)


def _builder():
  return keras_model.build_mlp(num_features=64, num_classes=10, hidden_units=HIDDEN_UNITS)


def _timed(fn: Callable[[], object], repetitions: int) -> float:
  fn()  # Warm-up: graph optimization, first-call set-up.
  times = []
  for _ in range(repetitions):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _measure(digits, functional, num_clients: int, repetitions: int) -> dict:
  """One table row: `num_clients` near-equal digits clients."""
  weights = functional.initial_weights
  shares = workloads.partition(len(digits.y), num_clients)
  clients = [(digits.x[idx], digits.y[idx]) for idx in shares]
  weight_cap = float(np.median([len(idx) for idx in shares]))
  cohort = cohort_training.stack_cohort(clients, batch_size=BATCH_SIZE)
  singles = [cohort_training.stack_cohort([c], batch_size=BATCH_SIZE) for c in clients]
  settings = dict(learning_rate=LEARNING_RATE, clip_norm=CLIP_NORM, weight_cap=weight_cap)
  vectorized = cohort_training.CohortRunner(functional, **settings)
  sequential = cohort_training.CohortRunner(functional, vectorize=False, **settings)
  loops = max(1, repetitions // 2)
  row = {
    'clients': num_clients,
    'stacked x': 'x'.join(str(d) for d in cohort.x.shape),
    'padding': f'{cohort.padding_fraction:.1%}',
    'cohort s': _timed(lambda: vectorized(weights, cohort), repetitions),
    'sequential s': _timed(lambda: sequential(weights, cohort), repetitions),
    'per-client calls s': _timed(lambda: [vectorized(weights, s) for s in singles], loops),
  }
  vectorized.close()
  sequential.close()
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--clients', default='100,1000', help='comma-separated cohort sizes')
  parser.add_argument('--repetitions', type=int, default=5)
  args = parser.parse_args()

  digits = workloads.load('digits')
  functional = cohort_training.functional_model_from_builder(_builder, num_features=64)
  rows = [_measure(digits, functional, int(c), args.repetitions) for c in args.clients.split(',')]

  columns = list(rows[0])
  cells = [[f'{r[c]:.4f}' if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
  print(' | '.join(c.rjust(w) for c, w in zip(columns, widths)))
  print('-+-'.join('-' * w for w in widths))
  for row in cells:
    print(' | '.join(v.rjust(w) for v, w in zip(row, widths)))
  print(
    f'\ndigits MLP 64-{"-".join(map(str, HIDDEN_UNITS))}-10, 1 local epoch, batch {BATCH_SIZE}, '
    f'lr {LEARNING_RATE}, clip {CLIP_NORM}, weight cap = median client size; seconds per round '
    f'(median of {args.repetitions} after a warm-up; per-client loops: '
    f'{max(1, args.repetitions // 2)}).'
  )


if __name__ == '__main__':
  main()

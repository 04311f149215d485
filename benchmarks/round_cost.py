"""Benchmark 1: a FedAvg round against its limit and against plain TFF.

The limit is one centralized Keras epoch over the same examples, model and
batch size: the same arithmetic without federation. Plain TFF is a
hand-written `build_weighted_fed_avg` over in-memory datasets on TFF's
default local context.
"""

from __future__ import annotations

from benchmarks import harness

TARGET_VS_PLAIN_TFF = 1.0
TARGET_VS_KERAS_SYNTHETIC_10 = 1.5


def run(*, quick: bool = False) -> list[harness.Table]:
  cases = [('digits', 10), ('digits', 100), ('synthetic', 10), ('synthetic', 100)]
  reps = 3 if quick else 5
  synthetic_examples = 50_000 if quick else 200_000
  rows, notes = [], []
  keras_cache: dict[str, float] = {}
  for workload, clients in cases:
    common = {'workload': workload, 'repetitions': reps if workload == 'digits' else 3,
              'num_examples': synthetic_examples}
    if workload not in keras_cache:
      keras_cache[workload] = harness.measure(
          'benchmarks.measure_round', {**common, 'system': 'keras'})['median_s']
    keras = keras_cache[workload]
    plain = harness.measure('benchmarks.measure_round',
                            {**common, 'system': 'plain_tff', 'num_clients': clients})['median_s']
    fedpipe = harness.measure('benchmarks.measure_round',
                              {**common, 'system': 'fedpipe', 'num_clients': clients})['median_s']
    fedpipe_dp = '-'  # Measured on digits only, to keep `make bench` under 30 minutes.
    if workload == 'digits':
      fedpipe_dp = harness.measure(
          'benchmarks.measure_round',
          {**common, 'system': 'fedpipe_dp', 'num_clients': clients})['median_s']
    examples = 1797 if workload == 'digits' else synthetic_examples
    ratio_plain = fedpipe / plain
    ratio_keras = fedpipe / keras
    rows.append([workload, f'{examples:,}', clients, keras, plain, fedpipe, fedpipe_dp,
                 f'{ratio_plain:.2f}x ({harness.verdict(ratio_plain, TARGET_VS_PLAIN_TFF)})',
                 f'{ratio_keras:.2f}x' + (
                     f' ({harness.verdict(ratio_keras, TARGET_VS_KERAS_SYNTHETIC_10)})'
                     if (workload, clients) == ('synthetic', 10) else '')])
  notes.append('Seconds per round (per epoch for Keras), medians of the repetitions after '
               'one warm-up; every system in its own process, measured in this run.')
  notes.append(f'Targets: fedpipe <= {TARGET_VS_PLAIN_TFF}x plain TFF; fedpipe <= '
               f'{TARGET_VS_KERAS_SYNTHETIC_10}x the Keras epoch on synthetic at 10 clients.')
  notes.append('Models: digits 64-64-10 MLP; synthetic 128-256-256-10 MLP (101,642 '
               'parameters). Batch 16, SGD, one local epoch, all clients every round.')
  return [harness.Table(
      'Round cost: fedpipe vs plain TFF vs one centralized Keras epoch',
      ['workload', 'examples', 'clients', 'Keras epoch s', 'plain TFF s', 'fedpipe s',
       'fedpipe DP s', 'fedpipe / plain TFF', 'fedpipe / Keras'], rows, notes)]

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
# Where fedpipe with two clients per core at once is also measured (one
# small-client and one large-client case, to keep `make bench` short).
TWO_PER_CORE_CASES = (('digits', 100), ('synthetic', 10))
# The cohort engine at 100 clients (issue 14): against plain TFF, and on
# digits against one Keras epoch.
TARGET_COHORT_VS_PLAIN = {'digits': 0.05, 'synthetic': 0.5}
TARGET_COHORT_VS_KERAS_DIGITS_100 = 0.5


def run(*, quick: bool = False) -> list[harness.Table]:
  cases = [('digits', 10), ('digits', 100), ('synthetic', 10), ('synthetic', 100)]
  synthetic_examples = 50_000 if quick else 200_000
  rows = []
  keras_cache: dict[str, float] = {}
  for workload, clients in cases:
    digits = workload == 'digits'
    common = {'workload': workload, 'num_examples': synthetic_examples}
    if workload not in keras_cache:
      keras_cache[workload] = harness.measure(
        'benchmarks.round_cost_measure',
        {**common, 'system': 'keras', 'repetitions': 5 if digits else 2},
      )['median_s']
    keras = keras_cache[workload]
    # digits rounds are short and noisier: more turns. DP on digits only, to keep
    # `make bench` short.
    reps = (30 if clients == 10 else 10) if digits else (5 if clients == 10 else 3)
    if quick:
      reps = 3
    r = harness.measure(
      'benchmarks.round_cost_measure',
      {
        **common,
        'system': 'interleaved',
        'num_clients': clients,
        'repetitions': reps,
        'with_dp': digits,
        'with_two_per_core': (workload, clients) in TWO_PER_CORE_CASES,
      },
    )
    plain, fedpipe = r['median_s']['plain_tff'], r['median_s']['fedpipe']
    fedpipe_dp = r['median_s'].get('fedpipe_dp', '-')
    cohort = r['median_s']['fedpipe_cohort_dp']
    cohort_turns = r['turn_ratios']['fedpipe_cohort_dp']
    cohort_vs_plain = harness.median(cohort_turns)
    cohort_vs_keras = cohort / keras
    # One cohort per core is what runtime.engine=auto does on this machine.
    per_core, per_core_vs_plain = '-', '-'
    if 'fedpipe_cohort_dp_per_core' in r['median_s']:
      per_core = r['median_s']['fedpipe_cohort_dp_per_core']
      per_core_vs_plain = '{:.3f}x'.format(
        harness.median(r['turn_ratios']['fedpipe_cohort_dp_per_core'])
      )
    two_per_core, concurrency_gain = '-', '-'
    if 'fedpipe_two_per_core' in r['times']:
      two_per_core = r['median_s']['fedpipe_two_per_core']
      concurrency_gain = '{:.2f}x'.format(
        harness.median(
          [a / b for a, b in zip(r['times']['fedpipe_two_per_core'], r['times']['fedpipe'])]
        )
      )
    turns = r['turn_ratios']['fedpipe']
    ratio_plain = harness.median(turns)
    ratio_keras = fedpipe / keras
    examples = 1797 if digits else synthetic_examples
    rows.append(
      [
        workload,
        f'{examples:,}',
        clients,
        reps,
        keras,
        plain,
        fedpipe,
        fedpipe_dp,
        f'{ratio_plain:.2f}x ({harness.verdict(ratio_plain, TARGET_VS_PLAIN_TFF)}; '
        f'turns {min(turns):.2f}-{max(turns):.2f})',
        f'{ratio_keras:.2f}x'
        + (
          f' ({harness.verdict(ratio_keras, TARGET_VS_KERAS_SYNTHETIC_10)})'
          if (workload, clients) == ('synthetic', 10)
          else ''
        ),
        two_per_core,
        concurrency_gain,
        cohort,
        f'{cohort_vs_plain:.3f}x'
        + (
          f' ({harness.verdict(cohort_vs_plain, TARGET_COHORT_VS_PLAIN[workload])})'
          if clients == 100
          else ''
        ),
        f'{cohort_vs_keras:.2f}x'
        + (
          f' ({harness.verdict(cohort_vs_keras, TARGET_COHORT_VS_KERAS_DIGITS_100)})'
          if (workload, clients) == ('digits', 100)
          else ''
        ),
        per_core,
        per_core_vs_plain,
      ]
    )
  notes = [
    'Seconds per round (per epoch for Keras), medians after one warm-up. Plain TFF and '
    'fedpipe (and fedpipe DP) run in one process taking turns round by round, so a slow '
    'spell of the machine hits both; "fedpipe / plain TFF" is the median of the per-turn '
    'ratios, with the range of those ratios. The Keras epoch is measured in its own process in the same run.',
    f'Targets: fedpipe <= {TARGET_VS_PLAIN_TFF}x plain TFF; fedpipe <= '
    f'{TARGET_VS_KERAS_SYNTHETIC_10}x the Keras epoch on synthetic at 10 clients.',
    'Models: digits 64-64-10 MLP; synthetic 128-256-256-10 MLP (101,642 parameters). '
    'Batch 16, SGD, one local epoch, all clients every round.',
    "fedpipe's worker runs every client of a round at once, as TFF does (the default); "
    '"fedpipe, two per core" is the same process on a second worker with '
    'runtime.max_concurrent_computation_calls=0 (two clients per CPU core at once), taking '
    'turns with the others; "two per core / all at once" is the median per-turn ratio of the two.',
    '"fedpipe cohort DP" is the cohort engine (runtime.engine=cohort: all of the round\'s '
    'clients as one cohort, trained in one vectorized TensorFlow call) with the DP settings '
    'of "fedpipe DP", taking turns with the others; its ratio to plain TFF is the median of '
    f'its per-turn ratios. Targets at 100 clients: <= {TARGET_COHORT_VS_PLAIN["digits"]}x '
    f'plain TFF and <= {TARGET_COHORT_VS_KERAS_DIGITS_100}x the Keras epoch on digits, '
    f'<= {TARGET_COHORT_VS_PLAIN["synthetic"]}x plain TFF on synthetic.',
    '"cohort DP, one per core" is the same cohort process with the round split into one '
    'cohort per CPU core (what runtime.engine=auto does locally), which the worker runs in '
    'parallel, taking turns with the others; its ratio is the median of its per-turn ratios.',
  ]
  return [
    harness.Table(
      'Round cost: fedpipe vs plain TFF vs one centralized Keras epoch',
      [
        'workload',
        'examples',
        'clients',
        'turns',
        'Keras epoch s',
        'plain TFF s',
        'fedpipe s',
        'fedpipe DP s',
        'fedpipe / plain TFF',
        'fedpipe / Keras',
        'fedpipe, two per core s',
        'two per core / all at once',
        'fedpipe cohort DP s',
        'cohort DP / plain TFF',
        'cohort DP / Keras',
        'cohort DP, one per core s',
        'one per core / plain TFF',
      ],
      rows,
      notes,
    )
  ]

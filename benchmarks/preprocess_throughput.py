"""Benchmark 3: Beam preprocessing throughput and memory, raw CSV to per-client TFRecords."""

from __future__ import annotations

from benchmarks import harness

TARGET_ROWS_PER_S = 20_000


def run(*, quick: bool = False) -> list[harness.Table]:
  sizes = [100_000] if quick else [100_000, 1_000_000]
  rows = []
  for size in sizes:
    for mode in ('multi_processing', 'in_memory'):
      r = harness.measure(
        'benchmarks.preprocess_throughput_measure', {'rows': size, 'mode': mode}, timeout_s=1800
      )
      verdict = harness.verdict(r['rows_per_s'], TARGET_ROWS_PER_S, lower_is_better=False)
      rows.append(
        [
          f'{size:,}',
          mode,
          r['seconds'],
          f'{r["rows_per_s"]:,.0f} ({verdict})',
          r['peak_rss_mb'],
          r['clients'],
        ]
      )
  startup = {
    flag: harness.median(
      [
        harness.measure(
          'benchmarks.preprocess_throughput_measure_startup', {'import_tensorflow': flag}
        )['seconds']
        for _ in range(2)
      ]
    )
    for flag in (False, True)
  }
  notes = [
    'Synthetic CSV: 16 features, 1,000 client keys, 4 input files; the whole run '
    '(validation, GroupByKey, TFRecord writes, manifest). multi_processing uses 2 workers.',
    f'Target: >= {TARGET_ROWS_PER_S:,} rows/s on this machine, memory bounded as rows grow.',
    "multi_processing's fixed cost (benchmarks/preprocess_throughput_measure_startup.py, "
    f"a pipeline with no work on 2 workers): {startup[False]:.1f} s start-up as fedpipe's workers run (their "
    'DoFns, fedpipe/pipelines/dofns.py, do not import TensorFlow); '
    f'{startup[True]:.1f} s if each worker imported TensorFlow, as they did before.',
  ]
  return [
    harness.Table(
      'Beam preprocessing: raw CSV to per-client TFRecords (DirectRunner)',
      [
        'rows',
        'direct_running_mode',
        'seconds',
        'rows / s',
        'peak RSS MB (all processes)',
        'clients',
      ],
      rows,
      notes,
    )
  ]

r"""Runs every benchmark and writes benchmarks/RESULTS.md (`make bench`).

    python -m benchmarks.run_all [--quick] [--only=round_cost,cross_silo]

Each benchmark prints a markdown table with its baselines measured in the
same run; ratios are against those baselines, never against numbers from
another day. Benchmarks are not tests: they assert nothing.

Each benchmark (`BENCHMARKS`: `--only` name -> module) is a driver module,
`<module>.py` (its `run(quick=...)` starts the measurements and builds the
tables), and its measurements, `<module>_measure*.py`, each run by
`harness.measure` in a process of its own
(`flower_peer_client.py` is Flower's side, run in Flower's own virtualenv).
Figures live in benchmarks/RESULTS.md only (`make bench` rewrites it, and its
plots in benchmarks/results/); `--quick` writes there too, marked `(--quick)`
in its first lines, unless `--results` names another file (its plots then go
to a `results/` folder beside it).
"""

import datetime
import os
import sys
import time
import traceback

from absl import app, flags

from benchmarks import (
  client_scale,
  cohort_scale,
  cross_silo_overhead,
  flower_peer,
  harness,
  preprocess_throughput,
  privacy_utility,
  round_cost,
  secure_aggregation,
  tabular_case,
)

BENCHMARKS = {
  'round_cost': round_cost,
  'client_scale': client_scale,
  'cohort_scale': cohort_scale,
  'preprocess': preprocess_throughput,
  'privacy_utility': privacy_utility,
  'flower': flower_peer,
  'cross_silo': cross_silo_overhead,
  'secure_aggregation': secure_aggregation,
  'tabular': tabular_case,
}

_QUICK = flags.DEFINE_bool('quick', False, 'Smaller sizes and fewer repetitions (minutes).')
_ONLY = flags.DEFINE_list('only', list(BENCHMARKS), f'Which benchmarks: {", ".join(BENCHMARKS)}.')
_RESULTS = flags.DEFINE_string(
  'results',
  os.path.join(os.path.dirname(os.path.abspath(__file__)), 'RESULTS.md'),
  'Markdown file for the results.',
)


def main(argv: list[str]) -> int:
  del argv
  unknown = [b for b in _ONLY.value if b not in BENCHMARKS]
  if unknown:
    print(f'error: unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}', file=sys.stderr)
    return 2
  # Plots go beside the results: a run with `--results` elsewhere leaves
  # benchmarks/results/ alone.
  harness.set_plots_dir(os.path.join(os.path.dirname(os.path.abspath(_RESULTS.value)), 'results'))
  started = time.monotonic()
  sections = [
    '# fedpipe benchmark results',
    '',
    f'Measured {datetime.datetime.now().strftime("%Y-%m-%d %H:%M")} on '
    f'{harness.machine_description()}{" (--quick)" if _QUICK.value else ""}, with '
    '`make bench` (`python -m benchmarks.run_all`). Every ratio compares numbers measured in '
    'the same run; each measurement ran in its own process in a private network namespace.',
    '',
  ]
  for name in _ONLY.value:
    section_start = time.monotonic()
    print(f'== {name} ...', flush=True)
    try:
      tables = BENCHMARKS[name].run(quick=_QUICK.value)
    except Exception as e:
      traceback.print_exc()
      tables = [harness.Table(name, ['error'], [[str(e).splitlines()[0][:300]]])]
    for table in tables:
      text = table.markdown()
      print(text, flush=True)
      sections.append(text)
    print(f'({name}: {time.monotonic() - section_start:.0f} s)', flush=True)
  sections.append(f'Total benchmark time: {(time.monotonic() - started) / 60:.1f} minutes.\n')
  with open(_RESULTS.value, 'w') as f:
    f.write('\n'.join(sections))
  print(f'results: {_RESULTS.value}')
  return 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)))

"""Benchmark 5: the same FedAvg in Flower's simulation and in fedpipe, side by side.

Flower needs numpy >= 1.26 (fedpipe's TFF 0.87 pins 1.25), so it gets a
virtualenv of its own under benchmarks/.cache, installed here with uv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from benchmarks import harness

VENV = os.path.join(os.path.dirname(os.path.abspath(__file__)), '.cache', 'flower-venv')
PACKAGES = ['flwr[simulation]==1.14.0', 'tensorflow-cpu==2.15.1', 'scikit-learn==1.5.2']


def _uv() -> list[str]:
  for candidate in (os.path.join(harness.REPO_ROOT, '.tools', 'bin', 'uv'), shutil.which('uv')):
    if candidate and os.path.exists(candidate):
      return [candidate]
  return [sys.executable, '-m', 'uv']


def ensure_flower() -> str:
  """Flower's python, installing its virtualenv if needed.

  Raises:
    harness.MeasurementError: With uv's own words if the install fails.
  """
  python = os.path.join(VENV, 'bin', 'python')
  if os.path.exists(python):
    return python
  for command in (
    _uv() + ['venv', '-q', '--python', '3.11', VENV],
    _uv() + ['pip', 'install', '-q', '--python', python, *PACKAGES],
  ):
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
      shutil.rmtree(VENV, ignore_errors=True)
      raise harness.MeasurementError(
        f'cannot install Flower ({" ".join(command[-3:])}): {result.stderr.strip()[-800:]}'
      )
  return python


def run(*, quick: bool = False) -> list[harness.Table]:
  clients, rounds = (10, 4) if quick else (20, 10)
  args = {'clients': clients, 'rounds': rounds}
  # The cohort engine is what fedpipe trains locally by default (runtime.engine=auto).
  ours = harness.measure('benchmarks.flower_peer_measure', {**args, 'engine': 'cohort'})
  per_client = harness.measure('benchmarks.flower_peer_measure', {**args, 'engine': 'per_client'})
  columns = ['system', 's / round (median, rounds 2..)', 'total training s', 'test accuracy']
  ours_median = harness.median(ours['round_times'][1:])
  rows = [
    [
      'fedpipe, cohort engine (the default)',
      ours_median,
      sum(ours['round_times']),
      ours['test_accuracy'],
    ],
    [
      'fedpipe, per-client engine',
      harness.median(per_client['round_times'][1:]),
      sum(per_client['round_times']),
      per_client['test_accuracy'],
    ],
  ]
  notes = [
    f'Digits 80/20 split (seed 0), {clients} clients (all every round), {rounds} rounds, '
    '64-64-10 MLP, SGD 0.1, batch 16, one local epoch, FedAvg without DP; test accuracy '
    'of the final model on the held-out 20%.'
  ]
  try:
    python = ensure_flower()
    theirs = harness.measure('benchmarks.flower_peer_client', args, python=python, timeout_s=1800)
    theirs_median = harness.median(theirs['round_times'][1:])
    rows.append(
      [
        f'Flower {theirs["flwr_version"]} simulation (Ray, 2 CPUs)',
        theirs_median,
        sum(theirs['round_times']),
        theirs['test_accuracy'],
      ]
    )
    notes.append(
      f'fedpipe (cohort engine) / Flower seconds per round: {ours_median / theirs_median:.2f}x. '
      'Flower builds each client (and its Keras model) anew every round in a Ray '
      'actor; fedpipe runs every client inside one TFF worker (the cohort engine: a '
      'cohort of clients per vectorized call).'
    )
  except harness.MeasurementError as e:
    rows.append(['Flower', 'not run', 'not run', 'not run'])
    notes.append(f'Flower could not be run here: {str(e).splitlines()[0][:400]}')
  return [harness.Table('Peer: Flower simulation vs fedpipe, same FedAvg', columns, rows, notes)]

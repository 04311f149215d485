"""Benchmark 6: DP-FedAvg seconds per round, local runtime vs three silos over mutual TLS."""

from __future__ import annotations

from benchmarks import harness

TARGET_OVERHEAD = 1.3


def run(*, quick: bool = False) -> list[harness.Table]:
  rounds = 6 if quick else 12
  results = {}
  for mode in ('local', 'silos'):
    results[mode] = harness.measure(
        'benchmarks.measure_cross_silo', {'mode': mode, 'rounds': rounds, 'clients_per_round': 60})
  ratio = results['silos']['median_s'] / results['local']['median_s']
  rows = [
      ['local (one isolated worker)', results['local']['median_s'],
       results['local']['first_round_s'], '1.00x'],
      ['3 silos, mutual TLS, loopback', results['silos']['median_s'],
       results['silos']['first_round_s'],
       f'{ratio:.2f}x ({harness.verdict(ratio, TARGET_OVERHEAD)})'],
  ]
  return [harness.Table(
      'Cross-silo overhead: local runtime vs three silo servers',
      ['runtime', 'seconds / round (median)', 'first round s', 'ratio vs local'], rows,
      [f'Digits, 300 clients (100 per silo), 60 clients per round (fixed-size sampling), '
       f'DP-FedAvg as in configs/digits_dp.py, {rounds} rounds; median excludes round 1 '
       '(compilation). Silos are separate fedpipe-silo processes, each with its own isolated '
       'TFF worker; the coordinator merges on its own worker.',
       f'Target: overhead ratio <= {TARGET_OVERHEAD}.'])]

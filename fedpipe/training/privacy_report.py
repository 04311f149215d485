"""The privacy report of a run: machine-readable JSON and a text a reviewer can read."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from fedpipe.training import experiment as experiment_lib

JSON_FILENAME = 'privacy_report.json'
TEXT_FILENAME = 'privacy_report.txt'

_ASSUMPTIONS = (
  'User-level DP: a client (all of its records) is the unit of privacy.',
  'Each round, clients are sampled as stated under `sampling`; the guarantee '
  'relies on the sampled set staying secret (the sampling seed is not '
  'published).',
  'Per-round training metrics (loss, accuracy) and the final evaluation are '
  'aggregate statistics released without noise; they are not covered by epsilon.',
  'Client example counts (from the manifest) are treated as public; they set '
  'the weight cap and the fixed denominator.',
)


def build_report(
  experiment: experiment_lib.Experiment,
  *,
  rounds: int,
  epsilon: float | None,
  test_metrics: dict[str, float],
  sampling_seed_is_secret: bool,
) -> dict[str, Any]:
  """The report's fields (JSON-serializable)."""
  privacy = experiment.privacy
  report: dict[str, Any] = {
    'dp_enabled': privacy is not None,
    'epsilon': epsilon if epsilon is not None and math.isfinite(epsilon) else None,
    'delta': privacy.delta if privacy else None,
    'noise_multiplier': privacy.noise_multiplier if privacy else 0.0,
    'clients_per_round': experiment.sampling.clients_per_round,
    'population_size': experiment.sampling.population_size,
    'sampling_rate': experiment.sampling.sampling_rate,
    'rounds': rounds,
    'sampling': experiment.sampling.method,
    'accountant': privacy.accountant if privacy else None,
    'neighboring_relation': (
      'add_or_remove_one_client'
      if experiment.sampling.method == 'poisson'
      else 'replace_one_client'
    ),
    'test_accuracy': test_metrics.get('accuracy'),
    'test_loss': test_metrics.get('loss'),
    'test_examples': test_metrics.get('num_examples'),
    'sampling_seed_secret': sampling_seed_is_secret,
    'assumptions': list(_ASSUMPTIONS),
  }
  if privacy:
    report.update(
      clipping=privacy.clipping,
      clip_norm=privacy.clip_norm,
      weight_cap=privacy.weight_cap,
      expected_total_weight=privacy.expected_total_weight,
      target_epsilon=privacy.target_epsilon,
      aggregator='capped-weight fixed-denominator DP-FedAvg (McMahan et al. 2018)',
    )
  return report


def render_text(report: dict[str, Any]) -> str:
  """A readable rendering of `build_report`'s output."""
  lines = ['fedpipe privacy report', '======================', '']
  if not report['dp_enabled']:
    lines += [
      'Differential privacy: OFF. The model carries no formal privacy guarantee.',
      '',
    ]
  else:
    eps = report['epsilon']
    lines += [
      f'Guarantee: ({eps:.4g}, {report["delta"]:g})-DP at the client (user) level,'
      if eps is not None
      else 'Guarantee: none (epsilon is infinite).',
      f'  computed with the {report["accountant"].upper()} accountant of dp-accounting',
      f'  under the {report["neighboring_relation"].replace("_", " ")} relation.',
      '',
      'Mechanism:',
      f'  noise multiplier     {report["noise_multiplier"]:.4g}',
      f'  clipping             {report["clipping"]}'
      + (f' (norm {report["clip_norm"]:g})' if report.get('clip_norm') else ''),
      f'  weight cap           {report["weight_cap"]:g} examples',
      f'  fixed denominator    {report["expected_total_weight"]:.4g} (expected capped weight a round)',
      '',
    ]
  lines += [
    'Participation:',
    f'  population           {report["population_size"]} clients',
    f'  clients per round    {report["clients_per_round"]} ({report["sampling"]} sampling,'
    f' rate {report["sampling_rate"]:.4g})',
    f'  rounds               {report["rounds"]}',
    '',
    'Utility:',
    f'  held-out accuracy    {report["test_accuracy"]:.4f}'
    if report['test_accuracy'] is not None
    else '  held-out accuracy    n/a',
    '',
    'Assumptions:',
  ]
  lines += [f'  - {a}' for a in report['assumptions']]
  if report['dp_enabled'] and not report['sampling_seed_secret']:
    lines.append(
      '  - WARNING: the sampling seed was set in the config; whoever knows it '
      'knows who took part, and the amplification by sampling in epsilon does not hold against them.'
    )
  return '\n'.join(lines) + '\n'


def write_report(output_dir: str, report: dict[str, Any]) -> tuple[str, str]:
  """Writes both forms atomically; returns their paths."""
  paths = []
  for name, content in (
    (JSON_FILENAME, json.dumps(report, indent=2) + '\n'),
    (TEXT_FILENAME, render_text(report)),
  ):
    path = os.path.join(output_dir, name)
    tmp = f'{path}.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      f.write(content)
    os.replace(tmp, path)
    paths.append(path)
  return paths[0], paths[1]

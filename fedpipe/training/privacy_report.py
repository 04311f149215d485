"""The privacy report of a run: machine-readable JSON and a text a reviewer can read."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

from fedpipe.data import atomic_files
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


@dataclasses.dataclass(frozen=True)
class PrivacyReport:
  """The privacy report of a run, typed (`privacy_report.json` holds the same fields).

  Attributes:
    dp_enabled: Whether the run was differentially private.
    epsilon: The ε of the whole run at `delta` (None without DP, or infinite).
    delta: The δ (None without DP).
    noise_multiplier: Noise standard deviation over the clipping norm (0.0
      without DP).
    mechanism: The DP aggregator (None without DP).
    accountant: 'rdp' or 'pld' (None without DP).
    clipping: 'fixed' or 'adaptive' (None without DP).
    clip_norm: The fixed clipping norm (None with adaptive clipping or no DP).
    weight_cap: A client's weight cap, in examples (None without DP).
    target_epsilon: The ε the noise was calibrated for, if it was.
    rounds: Rounds completed.
    clients_per_round: Expected clients per round.
    population_size: Training clients.
    sampling: 'poisson' or 'fixed_size'.
    sampling_rate: clients_per_round / population_size.
    neighboring_relation: The neighbouring datasets ε is about.
    sampling_seed_secret: False if the sampling seed was set in the config
      (whoever knows it knows who took part).
    assumptions: What the guarantee rests on.
    report: The report as a dict, exactly as in `privacy_report.json`.
  """

  dp_enabled: bool
  epsilon: float | None
  delta: float | None
  noise_multiplier: float
  mechanism: str | None
  accountant: str | None
  clipping: str | None
  clip_norm: float | None
  weight_cap: float | None
  target_epsilon: float | None
  rounds: int
  clients_per_round: int
  population_size: int
  sampling: str
  sampling_rate: float
  neighboring_relation: str
  sampling_seed_secret: bool
  assumptions: tuple[str, ...]
  report: dict[str, Any] = dataclasses.field(repr=False, compare=False)

  @classmethod
  def from_dict(cls, report: Mapping[str, Any]) -> PrivacyReport:
    """The typed form of a report from `build_report` or `privacy_report.json`."""
    return cls(
      dp_enabled=bool(report['dp_enabled']),
      epsilon=report.get('epsilon'),
      delta=report.get('delta'),
      noise_multiplier=float(report.get('noise_multiplier') or 0.0),
      mechanism=report.get('aggregator'),
      accountant=report.get('accountant'),
      clipping=report.get('clipping'),
      clip_norm=report.get('clip_norm'),
      weight_cap=report.get('weight_cap'),
      target_epsilon=report.get('target_epsilon'),
      rounds=int(report['rounds']),
      clients_per_round=int(report['clients_per_round']),
      population_size=int(report['population_size']),
      sampling=report['sampling'],
      sampling_rate=float(report['sampling_rate']),
      neighboring_relation=report['neighboring_relation'],
      sampling_seed_secret=bool(report.get('sampling_seed_secret', True)),
      assumptions=tuple(report.get('assumptions', ())),
      report=dict(report),
    )

  def as_dict(self) -> dict[str, Any]:
    """A copy of the report dict (`privacy_report.json`'s content)."""
    return json.loads(json.dumps(self.report))

  def __str__(self) -> str:
    return render_text(self.report)


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
    # The label task's other metrics: test_auc; test_mae, test_rmse.
    **{
      f'test_{name}': float(value)
      for name, value in test_metrics.items()
      if name not in ('accuracy', 'loss', 'num_examples', 'num_batches')
    },
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
      noise_placement=privacy.placement,
    )
    if privacy.placement == 'secure':
      terms = privacy.secure_terms()
      report.update(
        mechanism='distributed discrete Gaussian with secure aggregation '
        '(Kairouz, Liu, Steinke 2021): silos add the noise and mask their sums',
        silos=len(terms.roster),
        max_colluding=terms.max_colluding,
        ring_bits=terms.bits,
        scale=terms.scale,
        noised_values=terms.dim,
      )
    else:
      report.update(
        mechanism='central Gaussian: the coordinator adds the noise after merging the '
        "silos' un-noised partial sums (it is trusted with them)",
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
    *_utility_lines(report),
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
  return (
    atomic_files.write_json(os.path.join(output_dir, JSON_FILENAME), report),
    atomic_files.write_text(os.path.join(output_dir, TEXT_FILENAME), render_text(report)),
  )


def _utility_lines(report: Mapping[str, Any]) -> list[str]:
  """The held-out metrics: accuracy (n/a if none) and the label task's others (auc, mae, rmse)."""
  lines = [
    f'  held-out accuracy    {report["test_accuracy"]:.4f}'
    if report.get('test_accuracy') is not None
    else '  held-out accuracy    n/a'
  ]
  for key, value in report.items():
    name = key[len('test_') :]
    if (
      key.startswith('test_') and name not in ('accuracy', 'loss', 'examples') and value is not None
    ):
      lines.append(f'  held-out {name:<12}{value:.4f}')
  return lines

"""The coordinator's side of silo governance: package a run as a study, check approval.

Before the first round against governed silos, the training program submits
the run's study request to every silo (idempotent: a restarted run finds its
study by content) and stops with one readable message if any silo has not
approved it or has fewer rounds left than the run needs.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any, Optional

from computations import privacy_accounting
from pipelines import experiment as experiment_lib
from runtime import cross_silo
from runtime import study_request

_TIMEOUT_S = 60.0


class StudyNotApprovedError(RuntimeError):
  """Some silo has not approved this run's study; the message says which and what to do."""


@dataclasses.dataclass(frozen=True)
class SiloStudyStatus:
  silo: str
  status: Optional[dict[str, Any]]  # None: the silo is ungoverned.


def _model_summary(experiment: experiment_lib.Experiment) -> dict[str, Any]:
  model = experiment.keras_model_builder()
  text = io.StringIO()
  model.summary(print_fn=lambda line, *args, **kwargs: text.write(line + '\n'))
  return {'name': model.name, 'parameters': int(model.count_params()),
          'summary': text.getvalue()}


def build_study_request(
    experiment: experiment_lib.Experiment,
    routing: cross_silo.SiloRoutingContext,
    *,
    name: str,
) -> study_request.StudyRequest:
  """The study that `experiment` asks every silo to approve.

  Args:
    experiment: The built experiment.
    routing: The context the run uses; it compiles the silo-side computations
      exactly as it will send them.
    name: A readable name (the config's name).

  Returns:
    The request: the silo-side training and evaluation computations, the
    model, the DP parameters and ε for the whole run.
  """
  computations = tuple(
      study_request.StudyComputation(
          role=role, proto=routing.silo_computation(comp))
      for role, comp in ((study_request.ROLE_TRAIN, experiment.train_process.next),
                         (study_request.ROLE_EVALUATE, experiment.eval_process.next)))
  p = experiment.privacy
  sampling = experiment.sampling
  epsilon = math.inf
  if p is not None:
    epsilon = privacy_accounting.compute_epsilon(
        noise_multiplier=p.noise_multiplier, sampling=sampling, rounds=experiment.rounds,
        delta=p.delta, accountant=p.accountant)
  privacy = {
      'noise_multiplier': p.noise_multiplier if p else 0.0,
      'clipping': p.clipping if p else 'none',
      'clip_norm': p.clip_norm if p and p.clip_norm is not None else 0.0,
      'delta': p.delta if p else None,
      'epsilon': epsilon if math.isfinite(epsilon) else None,
      'accountant': p.accountant if p else None,
      'sampling': sampling.method,
      'population_size': sampling.population_size,
      'clients_per_round': sampling.clients_per_round,
  }
  return study_request.StudyRequest(
      name=name, computations=computations, model=_model_summary(experiment),
      privacy=privacy, rounds=experiment.rounds)


def submit_and_check(
    federation: cross_silo.Federation,
    request: study_request.StudyRequest,
    *,
    rounds_needed: int,
) -> list[SiloStudyStatus]:
  """Submits `request` to every connected silo; returns their statuses if all approve.

  Raises:
    StudyNotApprovedError: Listing every silo that has not approved the study,
      rejected it or has fewer than `rounds_needed` rounds left, with what the
      data owner and the data scientist can do.
    cross_silo.SiloError: If a silo cannot take the request.
  """
  payload = request.to_json()
  statuses = []
  for name, conn in sorted(federation.silos.items()):
    try:
      statuses.append(SiloStudyStatus(name, conn.call_json('SubmitStudy', payload, _TIMEOUT_S)))
    except cross_silo.SiloNotGovernedError:
      statuses.append(SiloStudyStatus(name, None))
  problems = []
  for s in statuses:
    st = s.status
    if st is None:
      continue
    if st['status'] == 'pending':
      fits = ('it fits the silo policy' if not st['violations'] else
              'it breaks the silo policy: ' + '; '.join(st['violations']))
      problems.append(f'  {s.silo}: pending approval ({fits}); its data owner reviews it with '
                      f'`fedpipe-governance show {st["study_id"]}`')
    elif st['status'] == 'rejected':
      problems.append(f'  {s.silo}: rejected ({st.get("reason") or "no reason given"})')
    elif st['rounds_remaining'] < rounds_needed:
      problems.append(f'  {s.silo}: approved, but {st["rounds_remaining"]} of '
                      f'{st["rounds_approved"]} rounds are left and this run needs '
                      f'{rounds_needed}')
  if problems:
    raise StudyNotApprovedError(
        f'study {request.study_id} ({request.name}) cannot run yet:\n' + '\n'.join(problems)
        + '\nRerun the same command once every silo has approved it; nothing ran on any '
        "silo's data.")
  return statuses

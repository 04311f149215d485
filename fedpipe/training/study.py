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
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedpipe.computations import keras_model
from fedpipe.errors import FedpipeError
from fedpipe.federation import cross_silo, silo_protocol
from fedpipe.governance import store as governance_store
from fedpipe.governance import study_request
from fedpipe.training import experiment as experiment_lib

_TIMEOUT_S = 60.0


class StudyNotApprovedError(FedpipeError, RuntimeError):
  """Some silo has not approved this run's study; the message says which and what to do.

  Attributes:
    study_id: The study the silos were asked to approve.
    silos: The silos that block it (pending, rejected, or out of budget).
  """

  def __init__(self, message: str, *, study_id: str = '', silos: tuple[str, ...] = ()):
    super().__init__(message)
    self.study_id = study_id
    self.silos = silos


@dataclasses.dataclass(frozen=True)
class SiloStudyStatus:
  """A silo's answer to a submitted study.

  Attributes:
    silo: The silo's name.
    status: Where the study stands at the silo; None if the silo is ungoverned.
  """

  silo: str
  status: silo_protocol.StudyStatusReply | None


def _model_summary(experiment: experiment_lib.Experiment) -> dict[str, Any]:
  # Built in a scratch graph: Keras names layers by how many it built before
  # in the same graph, and a study must not change with that.
  with tf.Graph().as_default(), keras_model.reproducible_keras_build():
    model = experiment.keras_model_builder()
    text = io.StringIO()
    model.summary(print_fn=lambda line, *args, **kwargs: text.write(line + '\n'))
    return {
      'name': model.name,
      'parameters': int(model.count_params()),
      'summary': text.getvalue(),
    }


def build_study_request(
  experiment: experiment_lib.Experiment,
  routing: cross_silo.SiloRoutingContext,
  *,
  name: str,
  evaluations: int = 1,
) -> study_request.StudyRequest:
  """The study that `experiment` asks every silo to approve.

  Args:
    experiment: The built experiment.
    routing: The context the run uses; it compiles the silo-side computations
      exactly as it will send them.
    name: A readable name (the config's name).
    evaluations: Evaluation calls the run makes (`evaluations_needed`).

  Returns:
    The request: the silo-side training and evaluation computations, the
    model, the DP parameters and ε for the whole run.
  """
  computations = tuple(
    study_request.StudyComputation(role=role, proto=routing.silo_computation(comp))
    for role, comp in (
      (study_request.ROLE_TRAIN, experiment.train_process.next),
      (study_request.ROLE_EVALUATE, experiment.eval_process.next),
    )
  )
  p = experiment.privacy
  sampling = experiment.sampling
  epsilon = math.inf
  if p is not None:
    epsilon = experiment_lib.epsilon_after(experiment, experiment.rounds)
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
  if p is not None and p.placement == 'secure':
    privacy['secure_aggregation'] = p.secure_terms().to_json()
    dim = _noised_values(routing, experiment)
    if dim != p.secure_dim:
      raise experiment_lib.ExperimentError(
        f'secure aggregation expects the update sum ({p.secure_dim} values) at '
        f'{list(p.noised_path)} of the silo computation, which has {dim} there'
      )
  return study_request.StudyRequest(
    name=name,
    computations=computations,
    model=_model_summary(experiment),
    privacy=privacy,
    rounds=experiment.rounds,
    evaluations=evaluations,
  )


def _noised_values(
  routing: cross_silo.SiloRoutingContext, experiment: experiment_lib.Experiment
) -> int:
  result = routing.mergeable_form(experiment.train_process.next).up_to_merge.type_signature.result
  node = result.member
  for index in experiment.privacy.noised_path:
    node = node[index]
  return sum(int(np.prod(t.shape)) for t in tff.structure.flatten(node))


def evaluations_needed(*, rounds: int, eval_every: int, completed_rounds: int = 0) -> int:
  """Evaluation calls a run makes after `completed_rounds`: every `eval_every`, and at the end."""
  periodic = rounds // eval_every - completed_rounds // eval_every if eval_every else 0
  return periodic + 1


def submit_and_check(
  federation: cross_silo.Federation,
  request: study_request.StudyRequest,
  *,
  rounds_needed: int,
  evaluations_needed: int = 0,
) -> list[SiloStudyStatus]:
  """Submits `request` to every connected silo; returns their statuses if all approve.

  Raises:
    StudyNotApprovedError: Listing every silo that has not approved the study,
      rejected it or has fewer rounds or evaluations left than the run needs,
      with exactly what to ask its data owner for.
    cross_silo.SiloError: If a silo cannot take the request.
  """
  statuses = []
  for name, conn in sorted(federation.silos.items()):
    try:
      statuses.append(SiloStudyStatus(name, conn.submit_study(request, _TIMEOUT_S)))
    except cross_silo.SiloNotGovernedError:
      statuses.append(SiloStudyStatus(name, None))
  problems, pending, blocking = [], False, []
  for s in statuses:
    st = s.status
    if st is None:
      continue
    if st.status == governance_store.PENDING:
      pending = True
      blocking.append(s.silo)
      fits = (
        'it fits the silo policy'
        if not st.violations
        else 'it breaks the silo policy: ' + '; '.join(st.violations)
      )
      problems.append(
        f'  {s.silo}: pending approval ({fits}); its data owner reviews it with '
        f'`fedpipe-governance show {st.study_id}`'
      )
    elif st.status == governance_store.REJECTED:
      blocking.append(s.silo)
      problems.append(f'  {s.silo}: rejected ({st.reason or "no reason given"})')
    else:
      short = {
        k: max(need - st.remaining(k), 0)
        for k, need in (('rounds', rounds_needed), ('evaluations', evaluations_needed))
      }
      if any(short.values()):
        blocking.append(s.silo)
        left = ', '.join(f'{st.remaining(k)} of {st.approved(k)} {k}' for k in short)
        asks = ' '.join(f'--{k}={n}' for k, n in short.items() if n)
        problems.append(
          f'  {s.silo}: approved, but {left} are left and this run needs {rounds_needed} '
          f'rounds and {evaluations_needed} evaluations (the silo charges every round whose '
          'partial sum it released, including rounds that failed elsewhere); ask its data '
          f'owner to run `fedpipe-governance extend {st.study_id} {asks}`'
        )
  if problems:
    rerun = (
      'once every silo has approved it'
      if pending and len(problems) == 1
      else 'once every silo above has approved or extended it'
    )
    raise StudyNotApprovedError(
      f'study {request.study_id} ({request.name}) cannot run yet:\n'
      + '\n'.join(problems)
      + f'\nRerun the same command {rerun}; it resumes where it stopped. Nothing more ran '
      "on any silo's data.",
      study_id=request.study_id,
      silos=tuple(blocking),
    )
  return statuses

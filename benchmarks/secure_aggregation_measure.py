"""DP-FedAvg seconds per round across three governed silos: secure aggregation vs central noise.

    python -m benchmarks.secure_aggregation_measure '{"rounds": 12, "clients_per_round": 60}'

The digits demo (configs/digits_dp.py: 300 clients, noise multiplier 1.9,
fixed clipping at 0.3, Poisson sampling) trains across three `fedpipe-silo`
processes on loopback over mutual TLS, governed by a policy, with the data of
the cross-silo benchmark (`cross_silo_overhead_measure.prepare`):

* `secure`: dp.placement=secure. The study is submitted with its
  secure-aggregation terms, approved by each silo's data owner (here: this
  process, through the silo's governance store), and the coordinator routes
  its training computation as secure rounds (`SiloRoutingContext.enable_secure`,
  as `fedpipe/training/program.py` does): keys, roster confirmation, masked
  release of each silo's noised partial sum, the modular sum.
* `central`: dp.placement=central, the same config otherwise: the silos send
  their partial sums, the coordinator merges and adds the noise.

The two run on two federations of three silos each (the same data, the same
policy), both up at once, so that neither placement's silos also serve the
other's calls. They take turns
round by round (the order alternating), on the same sampled clients each
round.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('GRPC_ENABLE_FORK_SUPPORT', 'false')

import contextlib
import json
import sys
import tempfile

import tensorflow_federated as tff

from benchmarks import cross_silo_overhead_measure, harness
from configs import digits_dp
from fedpipe.computations import client_sampling
from fedpipe.config import validation
from fedpipe.federation import cross_silo, local_federation, secure_round
from fedpipe.governance import store as governance_store
from fedpipe.training import experiment as experiment_lib
from fedpipe.training import study as study_lib

PLACEMENTS = ('central', 'secure')
# The demo policy, with secure aggregation accepted among at least three silos.
POLICY = local_federation.DEMO_POLICY + '\n[secure_aggregation]\nmin_roster = 3\n'


def _config(placement: str, local: local_federation.LocalFederation, rounds: int, clients: int):
  config = digits_dp.get_config()
  config.name = f'bench_secure_aggregation_{placement}'
  config.dp.placement = placement
  config.training.rounds = rounds
  config.training.clients_per_round = clients
  runtime = config.runtime
  runtime.mode = 'silos'
  runtime.silos = local.silos_flag
  tls = local.coordinator_tls()
  runtime.tls_ca, runtime.tls_cert, runtime.tls_key = tls.ca, tls.cert, tls.key
  return validation.validate(config)


def _approve(local, fed, experiment, config, rounds: int) -> dict:
  """Submits the run's study, approves it at every silo, checks it; returns its privacy terms."""
  request = study_lib.build_study_request(experiment, fed.context, name=config.name)
  try:
    study_lib.submit_and_check(fed, request, rounds_needed=rounds)
  except study_lib.StudyNotApprovedError:
    pass  # Pending: each data owner decides below.
  for name in local.silos:
    store = governance_store.GovernanceStore(local.state_dir(name))
    try:
      study = store.get(request.study_id)
      if study.violations:
        raise RuntimeError(f'silo {name} policy refuses the study: {study.violations}')
      if study.status == governance_store.PENDING:
        store.decide(request.study_id, approve=True, rounds=rounds, evaluations=request.evaluations)
    finally:
      store.close()
  study_lib.submit_and_check(fed, request, rounds_needed=rounds)
  if experiment.privacy.placement == 'secure':
    fed.context.enable_secure(
      secure_round.SecureStudy(request.study_id, experiment.privacy.secure_terms()),
      experiment.train_process.next,
    )
  return request.privacy


def main(args: dict) -> None:
  rounds = args.get('rounds', 12)
  clients_per_round = args.get('clients_per_round', 60)
  _, silo_dirs = cross_silo_overhead_measure.prepare(args.get('num_clients', 300))
  stack = tff.framework.get_context_stack()
  with tempfile.TemporaryDirectory() as work_dir, contextlib.ExitStack() as runtimes:
    contexts, experiments, privacy = {}, {}, {}
    for placement in PLACEMENTS:
      local = runtimes.enter_context(
        local_federation.start_local_federation(
          silo_dirs, os.path.join(work_dir, placement), policy=POLICY
        )
      )
      config = _config(placement, local, rounds, clients_per_round)
      addresses = [cross_silo.SiloAddress(n, p.address) for n, p in local.silos.items()]
      fed = runtimes.enter_context(cross_silo.federation(addresses, local.coordinator_tls()))
      contexts[placement] = stack.current
      experiments[placement] = experiment_lib.build_experiment(config, fed.manifest)
      privacy[placement] = _approve(local, fed, experiments[placement], config, rounds)
    if len({tuple(e.train_client_ids) for e in experiments.values()}) != 1:
      raise RuntimeError('the two federations hold different clients')
    reference = experiments['central']
    clients = [
      client_sampling.sample_clients(
        reference.train_client_ids, scheme=reference.sampling, round_num=r + 1, seed=0
      )
      for r in range(rounds)
    ]
    states = {}
    for name, experiment in experiments.items():
      with stack.install(contexts[name]):
        states[name] = experiment.train_process.initialize()

    def round_of(name):
      experiment = experiments[name]

      def one_round(r):
        with stack.install(contexts[name]):
          states[name] = experiment.train_process.next(states[name], clients[r]).state

      return one_round

    times = harness.take_turns({name: round_of(name) for name in PLACEMENTS}, rounds)
  harness.emit(
    {
      'times': {name: t[1:] for name, t in times.items()},
      'median_s': {name: harness.median(t[1:]) for name, t in times.items()},
      'first_round_s': {name: t[0] for name, t in times.items()},
      'turn_ratios': [s / c for s, c in zip(times['secure'][1:], times['central'][1:])],
      'clients_per_round': [len(c) for c in clients],
      'epsilon': {name: p['epsilon'] for name, p in privacy.items()},
      'model_parameters': experiments['secure'].privacy.secure_dim,
    }
  )


if __name__ == '__main__':
  main(json.loads(sys.argv[1]))

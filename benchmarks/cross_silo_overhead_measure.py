"""DP-FedAvg seconds per round, local runtime and three silos, taking turns.

    python -m benchmarks.cross_silo_overhead_measure '{"rounds": 12, "clients_per_round": 60}'

Both runtimes train the demo config (digits, 300 clients, DP-FedAvg) from the
same Beam-written data: `local` on one isolated worker; `silos` across three
`fedpipe-silo` processes over mutual TLS on loopback, each holding a third of
the clients, with the coordinator's merge on its own worker. Both are up at
once in this process and take turns round by round (the order alternating),
so a slow spell of the machine hits both alike. Rounds sample a fixed number
of clients so both do the same work.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('GRPC_ENABLE_FORK_SUPPORT', 'false')

import contextlib
import json
import sys

import tensorflow_federated as tff

from benchmarks import harness
from configs import digits_dp
from fedpipe.computations import client_sampling
from fedpipe.data import manifest as manifest_lib
from fedpipe.datasets import bundled_data, silo_partition
from fedpipe.federation import cross_silo, local_federation
from fedpipe.runtime import execution_context
from fedpipe.training import experiment as experiment_lib

SILOS = ('silo-a', 'silo-b', 'silo-c')
CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), '.cache', 'cross_silo')


def _preprocess(raw_dir: str, out_dir: str) -> None:
  if os.path.exists(manifest_lib.manifest_path(out_dir)):
    return
  from fedpipe.pipelines import pipeline as preprocess_pipeline

  preprocess_pipeline.run_on_bundled_layout(raw_dir, out_dir)


def prepare(num_clients: int) -> tuple[str, dict[str, str]]:
  """Beam-written data for all clients, and for each silo's share."""
  root = os.path.join(CACHE, str(num_clients))
  raw = bundled_data.write_bundled_dataset(
    source='sklearn:digits', raw_dir=os.path.join(root, 'raw'), num_clients=num_clients
  )
  _preprocess(raw.raw_dir, os.path.join(root, 'all'))
  raw_dirs = [os.path.join(root, f'raw-{s}') for s in SILOS]
  if not all(os.path.exists(os.path.join(d, 'train.csv')) for d in raw_dirs):
    silo_partition.partition_raw_csv(
      train_file=raw.train_file,
      eval_file=raw.test_file,
      feature_spec_file=raw.feature_spec_file,
      client_key='client_id',
      silo_dirs=raw_dirs,
    )
  silo_dirs = {}
  for name, raw_dir in zip(SILOS, raw_dirs):
    silo_dirs[name] = os.path.join(root, name)
    _preprocess(raw_dir, silo_dirs[name])
  return os.path.join(root, 'all'), silo_dirs


@contextlib.contextmanager
def _silos_runtime(silo_dirs: dict[str, str], work_dir: str):
  # Ungoverned: runtime overhead only.
  with local_federation.start_local_federation(silo_dirs, work_dir, policy=None) as local:
    addresses = [cross_silo.SiloAddress(n, p.address) for n, p in local.silos.items()]
    with cross_silo.federation(addresses, local.coordinator_tls()) as fed:
      yield fed.manifest


def main(args: dict) -> None:
  import tempfile

  num_clients = args.get('num_clients', 300)
  rounds = args.get('rounds', 10)
  all_dir, silo_dirs = prepare(num_clients)
  config = digits_dp.get_config()
  config.training.sampling = 'fixed_size'
  config.training.clients_per_round = args.get('clients_per_round', 60)
  stack = tff.framework.get_context_stack()
  with tempfile.TemporaryDirectory() as work_dir, contextlib.ExitStack() as runtimes:
    silo_manifest = runtimes.enter_context(_silos_runtime(silo_dirs, work_dir))
    silo_context = stack.current
    runtimes.enter_context(execution_context.local_worker_context(all_dir))
    contexts = {'local': stack.current, 'silos': silo_context}
    manifests = {'local': manifest_lib.read_manifest(all_dir), 'silos': silo_manifest}
    experiments = {
      name: experiment_lib.build_experiment(config, manifests[name]) for name in contexts
    }
    states = {}
    for name, experiment in experiments.items():
      with stack.install(contexts[name]):
        states[name] = experiment.train_process.initialize()

    def round_of(name):
      experiment = experiments[name]
      clients = [
        client_sampling.sample_clients(
          experiment.train_client_ids, scheme=experiment.sampling, round_num=r + 1, seed=0
        )
        for r in range(rounds)
      ]

      def one_round(r):
        with stack.install(contexts[name]):
          states[name] = experiment.train_process.next(states[name], clients[r]).state

      return one_round

    times = harness.take_turns({name: round_of(name) for name in contexts}, rounds)
  harness.emit(
    {
      'times': {name: t[1:] for name, t in times.items()},
      'median_s': {name: harness.median(t[1:]) for name, t in times.items()},
      'first_round_s': {name: t[0] for name, t in times.items()},
      'turn_ratios': [s / ln for s, ln in zip(times['silos'][1:], times['local'][1:])],
    }
  )


if __name__ == '__main__':
  main(json.loads(sys.argv[1]))

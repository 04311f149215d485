"""One measurement of scale: seconds per round and memory for a population and round size.

    python -m benchmarks.client_scale_measure '{"population": 10000, "clients_per_round": 100,
                                         "rounds": 4, "memory_every": 0}'

Virtual silos on one isolated worker: `population` clients of 8 examples
each (the `tiny` workload), DP-FedAvg over `clients_per_round` clients drawn
without replacement each round. Reports seconds per round and the peak
resident memory of this coordinator process and of the worker; with
`memory_every` > 0 also their current memory every that many rounds.

With `arena_control`, a second worker started with glibc's malloc arenas
capped (MALLOC_ARENA_MAX=2) runs the same rounds, the two taking turns
round by round: the control that tells allocator fragmentation from state
kept across rounds, and what the cap costs in round time.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('GRPC_ENABLE_FORK_SUPPORT', 'false')

import contextlib
import json
import sys

import tensorflow_federated as tff

from benchmarks import harness, workloads
from fedpipe.computations import (
  client_data,
  client_sampling,
  dp_fedavg,
  dp_parameters,
  keras_model,
)
from fedpipe.runtime import execution_context

EXAMPLES_PER_CLIENT = 8


def main(args: dict) -> None:
  population, per_round = args['population'], args['clients_per_round']
  w = workloads.load('tiny', num_examples=population * EXAMPLES_PER_CLIENT)
  data_dir = workloads.client_data_dir(w, population)
  ids = [workloads.client_id(i) for i in range(population)]
  model_fn = keras_model.build_model_fn(
    lambda: keras_model.build_mlp(
      num_features=w.num_features, num_classes=w.num_classes, hidden_units=w.hidden_units
    ),
    num_features=w.num_features,
  )
  params = dp_parameters.derive_dp_parameters(
    client_example_counts=workloads.client_example_counts(w, population),
    clients_per_round=per_round,
    sampling='fixed_size',
    noise_multiplier=1.0,
    clip_norm=1.0,
  )
  process = dp_fedavg.build_dp_fedavg_process(
    model_fn,
    client_optimizer=tff.learning.optimizers.build_sgdm(0.1),
    server_optimizer=tff.learning.optimizers.build_sgdm(1.0, momentum=0.5),
    dataset_fn=client_data.make_dataset_fn(
      split='train',
      num_features=w.num_features,
      batch_size=16,
      storage=workloads.client_data_storage(w, population),
    ),
    **params.dp_fedavg_arguments(),
  )
  every = args.get('memory_every', 0)
  stack = tff.framework.get_context_stack()
  with contextlib.ExitStack() as workers:
    # name -> (context, worker_binary pid)
    runs = {}
    if args.get('arena_control'):
      os.environ['MALLOC_ARENA_MAX'] = '2'  # The worker inherits it.
      try:
        capped = workers.enter_context(execution_context.local_worker_context(data_dir))
      finally:
        del os.environ['MALLOC_ARENA_MAX']
      runs['capped'] = (stack.current, harness.worker_pids_of(capped.pid)[0])
    worker = workers.enter_context(execution_context.local_worker_context(data_dir))
    runs = {'worker': (stack.current, harness.worker_pids_of(worker.pid)[0]), **runs}
    states = {}
    for name, (context, _) in runs.items():
      with stack.install(context):
        states[name] = process.initialize()
    clients = [
      client_sampling.sample_clients(ids, scheme=params.sampling, round_num=r + 1, seed=0)
      for r in range(args['rounds'])
    ]

    def round_of(name):
      def one_round(r):
        with stack.install(runs[name][0]):
          states[name] = process.next(states[name], clients[r]).state

      return one_round

    memory = []

    def sample_memory(r):
      if every and ((r + 1) % every == 0 or r == 0):
        memory.append([r + 1, harness.rss_mb()] + [harness.rss_mb(pid) for _, pid in runs.values()])

    times = harness.take_turns(
      {name: round_of(name) for name in runs}, args['rounds'], after_each=sample_memory
    )
    peaks = {name: harness.peak_rss_mb(pid) for name, (_, pid) in runs.items()}
  steady = {name: t[1:] if len(t) > 1 else t for name, t in times.items()}
  result = {
    'median_s': harness.median(steady['worker']),
    'first_round_s': times['worker'][0],
    'coordinator_peak_mb': harness.peak_rss_mb(),
    'worker_peak_mb': peaks['worker'],
    'memory': memory,
  }
  if 'capped' in runs:
    result['capped_median_s'] = harness.median(steady['capped'])
    result['capped_turn_ratios'] = [c / w for c, w in zip(steady['capped'], steady['worker'])]
  harness.emit(result)


if __name__ == '__main__':
  main(json.loads(sys.argv[1]))

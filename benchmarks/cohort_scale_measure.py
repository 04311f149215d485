"""One measurement of the cohort engine at scale: seconds per round and worker memory.

    python -m benchmarks.cohort_scale_measure '{"population": 10000, "clients_per_round": 1000,
                                                "rounds": 4, "systems": ["cohort", "per_client"]}'

The `tiny` workload (8 examples a user, 16-16-2 MLP) as `client_scale_measure`
runs it: `population` users in one client-data directory (fedpipe's SQLite
layout), DP-FedAvg over `clients_per_round` users drawn without replacement
each round. Systems, taking turns round by round on the same sampled users:
`cohort` (`cohort_fedavg`, the round's users grouped into cohorts by
`runtime.cohort_memory_mb`'s rule, at least one per core), `per_client`
(`dp_fedavg`, one TFF client per user, on its own worker) and `plain_tff`
(TFF's `build_weighted_fed_avg` over the sampled users' in-memory datasets,
on TFF's own local context). Reports each system's median seconds per round
(rounds 2..), and the cohort worker's resident memory: before the first
round (idle, model and graphs loaded) and its peak.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('GRPC_ENABLE_FORK_SUPPORT', 'false')

import collections
import contextlib
import json
import sys
import time

import tensorflow as tf
import tensorflow_federated as tff

from benchmarks import harness, workloads
from fedpipe.computations import (
  client_data,
  client_sampling,
  cohort_data,
  cohort_fedavg,
  dp_fedavg,
  dp_parameters,
  keras_model,
)
from fedpipe.runtime import execution_context

EXAMPLES_PER_CLIENT = 8
COHORT_MEMORY_MB = 256  # runtime.cohort_memory_mb's default.
_KEEP_ALIVE = []


def _max_cohort_size(w: workloads.Workload, builder) -> int:
  """`runtime.cohort_memory_mb`'s rule (`training.experiment._max_cohort_size`) for this workload."""
  with tf.Graph().as_default():
    values = sum(int(v.shape.num_elements()) for v in builder().trainable_weights)
  steps = -(-EXAMPLES_PER_CLIENT // 16)
  per_user = 4 * 3 * values + 4 * (w.num_features + 2 + w.num_classes) * 16 * steps
  return max(1, COHORT_MEMORY_MB * 2**20 // per_user)


def main(args: dict) -> None:
  population, per_round = args['population'], args['clients_per_round']
  systems = args.get('systems', ['cohort'])
  w = workloads.load('tiny', num_examples=population * EXAMPLES_PER_CLIENT)
  started = time.monotonic()
  data_dir = workloads.client_data_dir(w, population)
  write_s = time.monotonic() - started
  storage = workloads.client_data_storage(w, population)
  ids = [workloads.client_id(i) for i in range(population)]
  counts = workloads.client_example_counts(w, population)

  def builder():
    return keras_model.build_mlp(
      num_features=w.num_features, num_classes=w.num_classes, hidden_units=w.hidden_units
    )

  model_fn = keras_model.build_model_fn(builder, num_features=w.num_features)
  params = dp_parameters.derive_dp_parameters(
    client_example_counts=counts,
    clients_per_round=per_round,
    sampling='fixed_size',
    noise_multiplier=1.0,
    clip_norm=1.0,
  )
  server = tff.learning.optimizers.build_sgdm(1.0, momentum=0.5)
  rounds = args['rounds']
  sampled = [
    client_sampling.sample_clients(ids, scheme=params.sampling, round_num=r + 1, seed=0)
    for r in range(rounds)
  ]
  max_cohort = _max_cohort_size(w, builder)
  cores = os.cpu_count() or 1
  stack = tff.framework.get_context_stack()
  with contextlib.ExitStack() as workers:
    entries = {}  # name -> (process, round r -> its argument, context)
    worker_pid = None
    if 'cohort' in systems:
      worker = workers.enter_context(execution_context.local_worker_context(data_dir))
      worker_pid = harness.worker_pids_of(worker.pid)[0]
      process = cohort_fedavg.build_cohort_dp_fedavg_process(
        model_fn,
        builder,
        num_features=w.num_features,
        aggregator=dp_fedavg.build_dp_aggregator(**params.dp_fedavg_arguments()),
        cohort_fn=cohort_data.make_cohort_fn(
          split='train', num_features=w.num_features, batch_size=16, storage=storage
        ),
        client_learning_rate=0.1,
        server_optimizer=server,
      )
      examples = dict(zip(ids, counts))
      cohorts = [
        cohort_fedavg.group_into_cohorts(s, examples, max_cohort_size=max_cohort, min_cohorts=cores)
        for s in sampled
      ]
      entries['cohort'] = (process, cohorts.__getitem__, stack.current)
    if 'per_client' in systems:
      workers.enter_context(execution_context.local_worker_context(data_dir))
      process = dp_fedavg.build_dp_fedavg_process(
        model_fn,
        client_optimizer=tff.learning.optimizers.build_sgdm(0.1),
        server_optimizer=server,
        dataset_fn=client_data.make_dataset_fn(
          split='train', num_features=w.num_features, batch_size=16, storage=storage
        ),
        **params.dp_fedavg_arguments(),
      )
      entries['per_client'] = (process, sampled.__getitem__, stack.current)
    if 'plain_tff' in systems:
      index = {c: i for i, c in enumerate(ids)}
      parts = workloads.partition(len(w.y), population)

      def datasets(r):
        return [
          tf.data.Dataset.from_tensor_slices(
            collections.OrderedDict(x=w.x[parts[index[c]]], y=w.y[parts[index[c]]])
          ).batch(16)
          for c in sampled[r]
        ]

      context = tff.backends.native.create_sync_local_cpp_execution_context()
      _KEEP_ALIVE.append(context)
      process = tff.learning.algorithms.build_weighted_fed_avg(
        model_fn,
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(0.1),
        server_optimizer_fn=server,
      )
      entries['plain_tff'] = (process, datasets, context)

    states = {}
    for name, (process, _, context) in entries.items():
      with stack.install(context):
        states[name] = process.initialize()
    idle_mb = harness.rss_mb(worker_pid) if worker_pid else None

    def round_of(name):
      process, argument, context = entries[name]

      def one_round(r):
        with stack.install(context):
          states[name] = process.next(states[name], argument(r)).state

      return one_round

    times = harness.take_turns({name: round_of(name) for name in entries}, rounds)
    peak_mb = harness.peak_rss_mb(worker_pid) if worker_pid else None
  steady = {name: t[1:] if len(t) > 1 else t for name, t in times.items()}
  harness.emit(
    {
      'median_s': {name: harness.median(t) for name, t in steady.items()},
      'first_round_s': {name: t[0] for name, t in times.items()},
      'cohorts_per_round': len(entries['cohort'][1](0)) if 'cohort' in entries else None,
      'max_cohort_size': max_cohort,
      'worker_idle_mb': idle_mb,
      'worker_peak_mb': peak_mb,
      'data_write_s': write_s,
    }
  )


if __name__ == '__main__':
  main(json.loads(sys.argv[1]))
  sys.stdout.flush()
  os._exit(0)  # TFF's local context can wait on its worker forever in a finalizer.

"""One measurement of round cost (run by the harness in its own process).

    python -m benchmarks.round_cost_measure '{"system": "interleaved", "workload": "digits",
                                         "num_clients": 10, "repetitions": 5}'

Systems: `keras` (one centralized epoch: the same arithmetic without
federation) and `interleaved`: plain TFF (`build_weighted_fed_avg` over
in-memory datasets on TFF's default local context, as a hand-written TFF
program does), fedpipe (its process over client ids, data read by the worker
from TFRecords, on its isolated worker) and, with `with_dp`, fedpipe with the
capped-weight DP aggregator, taking turns round by round in one process.
With `with_two_per_core`, also fedpipe on a second worker that runs two
clients per CPU core at once (`max_concurrent_computation_calls=0`) instead
of every client at once (the default, as TFF's): that option's effect,
measured side by side.
Emits seconds per round (or epoch) of each repetition.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('GRPC_ENABLE_FORK_SUPPORT', 'false')

import collections
import contextlib
import json
import sys

import tensorflow as tf
import tensorflow_federated as tff

from benchmarks import harness, workloads
from fedpipe.computations import (
  client_data,
  cohort_data,
  cohort_fedavg,
  dp_fedavg,
  dp_parameters,
  fedavg,
  keras_model,
)


def _keras_builder(w: workloads.Workload):
  return lambda: keras_model.build_mlp(
    num_features=w.num_features, num_classes=w.num_classes, hidden_units=w.hidden_units
  )


def keras_epoch(w: workloads.Workload, repetitions: int) -> list[float]:
  model = _keras_builder(w)()
  model.compile(
    optimizer=tf.keras.optimizers.SGD(workloads.LEARNING_RATE),
    loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
  )
  data = tf.data.Dataset.from_tensor_slices((w.x, w.y)).batch(workloads.BATCH_SIZE).cache()
  # Warm up (tracing, first-call set-up) on a few batches, not a whole epoch.
  model.fit(data.take(20), epochs=1, verbose=0)
  return harness.timed_repetitions(
    lambda: model.fit(data, epochs=1, verbose=0), warmup=0, repetitions=repetitions
  )


_KEEP_ALIVE = []


def _plain_tff(w: workloads.Workload, num_clients: int):
  """Plain TFF's process and its in-memory client datasets."""
  datasets = [
    tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=w.x[idx], y=w.y[idx])).batch(
      workloads.BATCH_SIZE
    )
    for idx in workloads.partition(len(w.y), num_clients)
  ]
  model_fn = keras_model.build_model_fn(_keras_builder(w), num_features=w.num_features)
  process = tff.learning.algorithms.build_weighted_fed_avg(
    model_fn,
    client_optimizer_fn=tff.learning.optimizers.build_sgdm(workloads.LEARNING_RATE),
    server_optimizer_fn=tff.learning.optimizers.build_sgdm(1.0),
  )
  return process, datasets


def _fedpipe(w: workloads.Workload, num_clients: int, *, dp: bool):
  """fedpipe's process over client ids (data read by the worker from its client data).

  With `dp`, DP-FedAvg (`dp_fedavg.build_dp_fedavg_process`) with every
  client every round, noise multiplier 1 and clip norm 1, its weight cap and
  denominator derived from the clients' example counts.
  """
  model_fn = keras_model.build_model_fn(_keras_builder(w), num_features=w.num_features)
  common = dict(
    client_optimizer=tff.learning.optimizers.build_sgdm(workloads.LEARNING_RATE),
    server_optimizer=tff.learning.optimizers.build_sgdm(1.0),
    dataset_fn=client_data.make_dataset_fn(
      split='train',
      num_features=w.num_features,
      batch_size=workloads.BATCH_SIZE,
      shuffle=False,
      storage=workloads.client_data_storage(w, num_clients),
    ),
  )
  if not dp:
    return fedavg.build_fedavg_process(model_fn, **common)
  params = dp_parameters.derive_dp_parameters(
    client_example_counts=workloads.client_example_counts(w, num_clients),
    clients_per_round=num_clients,
    sampling='fixed_size',
    noise_multiplier=1.0,
    clip_norm=1.0,
  )
  return dp_fedavg.build_dp_fedavg_process(model_fn, **common, **params.dp_fedavg_arguments())


def _fedpipe_cohort_dp(w: workloads.Workload, num_clients: int):
  """The cohort engine's DP-FedAvg (`cohort_fedavg`) with `_fedpipe`'s DP settings, and
  its round argument: all clients as one cohort."""
  builder = _keras_builder(w)
  model_fn = keras_model.build_model_fn(builder, num_features=w.num_features)
  params = dp_parameters.derive_dp_parameters(
    client_example_counts=workloads.client_example_counts(w, num_clients),
    clients_per_round=num_clients,
    sampling='fixed_size',
    noise_multiplier=1.0,
    clip_norm=1.0,
  )
  process = cohort_fedavg.build_cohort_dp_fedavg_process(
    model_fn,
    builder,
    num_features=w.num_features,
    aggregator=dp_fedavg.build_dp_aggregator(**params.dp_fedavg_arguments()),
    cohort_fn=cohort_data.make_cohort_fn(
      split='train',
      num_features=w.num_features,
      batch_size=workloads.BATCH_SIZE,
      shuffle=False,
      storage=workloads.client_data_storage(w, num_clients),
    ),
    client_learning_rate=workloads.LEARNING_RATE,
    server_optimizer=tff.learning.optimizers.build_sgdm(1.0),
  )
  ids = [workloads.client_id(i) for i in range(num_clients)]
  return process, [cohort_fedavg.cohort_string(ids)]


_CORES = os.cpu_count() or 1


def interleaved_rounds(
  w: workloads.Workload,
  num_clients: int,
  repetitions: int,
  *,
  with_dp: bool,
  with_two_per_core: bool = False,
) -> dict[str, list[float]]:
  """Seconds per round of plain TFF and fedpipe (and fedpipe DP), rounds interleaved.

  All systems live in this one process and take turns round by round (the
  order rotating each repetition), so a slow spell of this noisy machine
  hits every system alike; the ratio of each turn is reported too. Plain
  TFF runs on TFF's own local context, fedpipe on its isolated worker.
  """
  from fedpipe.runtime import execution_context, isolated_worker

  plain_process, datasets = _plain_tff(w, num_clients)
  ids = [workloads.client_id(i) for i in range(num_clients)]
  plain_context = tff.backends.native.create_sync_local_cpp_execution_context()
  # Its finalizer stops its worker and can wait on it forever: keep it alive
  # until `os._exit` below.
  _KEEP_ALIVE.append(plain_context)
  stack = tff.framework.get_context_stack()
  data_dir = workloads.client_data_dir(w, num_clients)
  with contextlib.ExitStack() as workers:
    # name -> (process, its round argument, context).
    entries = {'plain_tff': (plain_process, datasets, plain_context)}
    if with_two_per_core:
      workers.enter_context(
        execution_context.local_worker_context(
          data_dir, max_concurrent_computation_calls=isolated_worker.TWO_PER_CORE
        )
      )
      two_per_core_context = stack.current
    workers.enter_context(execution_context.local_worker_context(data_dir))
    fedpipe = _fedpipe(w, num_clients, dp=False)
    entries['fedpipe'] = (fedpipe, ids, stack.current)
    if with_dp:
      entries['fedpipe_dp'] = (_fedpipe(w, num_clients, dp=True), ids, stack.current)
    cohort_process, cohorts = _fedpipe_cohort_dp(w, num_clients)
    entries['fedpipe_cohort_dp'] = (cohort_process, cohorts, stack.current)
    if num_clients >= _CORES > 1:
      # The same round as one cohort per core, which the worker runs in parallel.
      per_core = cohort_fedavg.group_into_cohorts(
        ids, {}, max_cohort_size=num_clients, min_cohorts=_CORES
      )
      entries['fedpipe_cohort_dp_per_core'] = (cohort_process, per_core, stack.current)
    if with_two_per_core:
      entries['fedpipe_two_per_core'] = (fedpipe, ids, two_per_core_context)

    states = {}
    for name, (process, _, context) in entries.items():
      with stack.install(context):
        states[name] = process.initialize()

    def round_of(name):
      process, data, context = entries[name]

      def one_round(_):
        with stack.install(context):
          states[name] = process.next(states[name], data).state

      return one_round

    rounds = {name: round_of(name) for name in entries}
    for one_round in rounds.values():  # Warm-up: tracing, first-call set-up.
      one_round(0)
    return harness.take_turns(rounds, repetitions)


def main(args: dict) -> None:
  w = workloads.load(args['workload'], num_examples=args.get('num_examples', 200_000))
  system, reps = args['system'], args.get('repetitions', 3)
  if system == 'keras':
    times = keras_epoch(w, reps)
    harness.emit({'times': times, 'median_s': harness.median(times), 'examples': int(len(w.y))})
  elif system == 'interleaved':
    times = interleaved_rounds(
      w,
      args['num_clients'],
      reps,
      with_dp=args.get('with_dp', False),
      with_two_per_core=args.get('with_two_per_core', False),
    )
    harness.emit(
      {
        'times': times,
        'median_s': {name: harness.median(t) for name, t in times.items()},
        'turn_ratios': {
          name: [a / b for a, b in zip(t, times['plain_tff'])]
          for name, t in times.items()
          if name != 'plain_tff'
        },
        'examples': int(len(w.y)),
      }
    )
  else:
    raise ValueError(f'unknown system {system!r}')


if __name__ == '__main__':
  main(json.loads(sys.argv[1]))
  # TFF's local context stops its worker in a finalizer that can wait on it
  # forever; the harness kills whatever this process leaves behind.
  sys.stdout.flush()
  os._exit(0)

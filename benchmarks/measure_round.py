"""One measurement of round cost (run by the harness in its own process).

    python -m benchmarks.measure_round '{"system": "fedpipe", "workload": "digits",
                                         "num_clients": 10, "repetitions": 5}'

Systems: `keras` (one centralized epoch: the same arithmetic without
federation), `plain_tff` (`build_weighted_fed_avg` over in-memory datasets on
TFF's default local context, as a hand-written TFF program does), `fedpipe`
(fedpipe's process over client ids, data read by the worker from TFRecords,
on its isolated worker) and `fedpipe_dp` (the same with the capped-weight DP
aggregator). Emits seconds per round (or epoch) of each repetition.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('GRPC_ENABLE_FORK_SUPPORT', 'false')

# pylint: disable=g-import-not-at-top,wrong-import-position
import collections
import json
import sys

import tensorflow as tf
import tensorflow_federated as tff

from benchmarks import harness
from benchmarks import workloads
from computations import client_data
from computations import dp_aggregator
from computations import fedavg
from computations import keras_model


def _keras_builder(w: workloads.Workload):
  return lambda: keras_model.build_mlp(
      num_features=w.num_features, num_classes=w.num_classes, hidden_units=w.hidden_units)


def keras_epoch(w: workloads.Workload, repetitions: int) -> list[float]:
  model = _keras_builder(w)()
  model.compile(optimizer=tf.keras.optimizers.SGD(workloads.LEARNING_RATE),
                loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  data = tf.data.Dataset.from_tensor_slices((w.x, w.y)).batch(workloads.BATCH_SIZE).cache()
  return harness.timed_repetitions(lambda: model.fit(data, epochs=1, verbose=0),
                                   repetitions=repetitions)


def plain_tff_round(w: workloads.Workload, num_clients: int, repetitions: int) -> list[float]:
  datasets = [
      tf.data.Dataset.from_tensor_slices(collections.OrderedDict(
          x=w.x[idx], y=w.y[idx])).batch(workloads.BATCH_SIZE)
      for idx in workloads.partition(len(w.y), num_clients)
  ]
  model_fn = keras_model.build_model_fn(_keras_builder(w), num_features=w.num_features)
  tff.backends.native.set_sync_local_cpp_execution_context()
  process = tff.learning.algorithms.build_weighted_fed_avg(
      model_fn,
      client_optimizer_fn=tff.learning.optimizers.build_sgdm(workloads.LEARNING_RATE),
      server_optimizer_fn=tff.learning.optimizers.build_sgdm(1.0))
  state = [process.initialize()]

  def one_round():
    state[0] = process.next(state[0], datasets).state

  return harness.timed_repetitions(one_round, repetitions=repetitions)


def fedpipe_round(w: workloads.Workload, num_clients: int, repetitions: int, *,
                  dp: bool) -> list[float]:
  from runtime import execution_context  # pylint: disable=g-import-not-at-top

  data_dir = workloads.client_data_dir(w, num_clients)
  ids = [workloads.client_id(i) for i in range(num_clients)]
  model_fn = keras_model.build_model_fn(_keras_builder(w), num_features=w.num_features)
  aggregator = None
  if dp:
    aggregator = dp_aggregator.CappedWeightDPFactory.gaussian_fixed(
        noise_multiplier=1.0, clip_norm=1.0, weight_cap=len(w.y) / num_clients,
        expected_total_weight=float(num_clients))
  process = fedavg.build_fedavg_process(
      model_fn,
      client_optimizer=tff.learning.optimizers.build_sgdm(workloads.LEARNING_RATE),
      server_optimizer=tff.learning.optimizers.build_sgdm(1.0),
      model_aggregator=aggregator,
      dataset_fn=client_data.make_dataset_fn(
          split='train', num_features=w.num_features, batch_size=workloads.BATCH_SIZE,
          shuffle=False))
  with execution_context.local_worker_context(data_dir):
    state = [process.initialize()]

    def one_round():
      state[0] = process.next(state[0], ids).state

    return harness.timed_repetitions(one_round, repetitions=repetitions)


def main(args: dict) -> None:
  w = workloads.load(args['workload'], num_examples=args.get('num_examples', 200_000))
  system, reps = args['system'], args.get('repetitions', 3)
  if system == 'keras':
    times = keras_epoch(w, reps)
  elif system == 'plain_tff':
    times = plain_tff_round(w, args['num_clients'], reps)
  elif system in ('fedpipe', 'fedpipe_dp'):
    times = fedpipe_round(w, args['num_clients'], reps, dp=system == 'fedpipe_dp')
  else:
    raise ValueError(f'unknown system {system!r}')
  harness.emit({'times': times, 'median_s': harness.median(times),
                'examples': int(len(w.y))})


if __name__ == '__main__':
  main(json.loads(sys.argv[1]))

"""A cohort's padded training tensors, read from client ids where the data lives.

`cohort_training.train_cohort` trains K clients at once from padded tensors
`x [K, S, B, F]`, `y [K, S, B]` and `mask [K, S, B]`; `cohort_training.stack_cohort`
builds them in NumPy from arrays. `make_cohort_fn` builds the same tensors
inside a TensorFlow computation (a `tff.tensorflow.computation` the worker
runs at the data's site) from a 1-D string tensor of client ids, reading
relative to the worker's working directory, in the layout the manifest's
`storage` names, as `client_data.make_dataset_fn` does for one client:

* `sqlite`: one query of `clients.sqlite` for the whole cohort
  (`client_id IN (...)`, see `fedpipe.data.client_store`), whose rows come
  back ordered by client id; each row's client id is mapped to its position
  k in the id tensor in the graph (`tf.unique` over ids and rows), so client
  k's records are its rows in `seq` order, whatever the ids' order;
* `tfrecord_per_client`: the K files `<split>/<client_id>.tfrecord`.

Both give the same tensors for the same data.

Each client's batches are the per-client engine's: its examples repeated
`epochs` times, then batched, so a batch can span two epochs and a client of
n examples takes `ceil(n * epochs / batch_size)` steps, the last one partial.
Without shuffling the order is the file's order in every epoch, exactly as
`make_dataset_fn(shuffle=False)` yields it; with shuffling each epoch is a
fresh uniformly random permutation of the client's examples (`tf.random.uniform`
sort keys, unseeded: a new draw on every run). `make_dataset_fn`'s shuffle
buffer of 1024 examples only approximates that for larger clients, so the two
engines agree in distribution, not draw by draw.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import NamedTuple

import tensorflow as tf

from fedpipe.computations import client_data
from fedpipe.data import client_store, manifest, record_schema
from fedpipe.errors import FedpipeError

# Batched with this size, a dataset of records is one batch: all of it.
_ALL = tf.int64.max


class CohortDataError(FedpipeError, ValueError):
  """An argument of `make_cohort_fn` (or its client-id tensor) is invalid; the message says which."""


class CohortBatches(NamedTuple):
  """K clients' local batches, padded to common shapes (as `train_cohort` takes them).

  Attributes:
    x: Features, `[K, S, B, num_features]` float32, zeros where padded.
    y: Labels, `[K, S, B]` int64 (float32 for regression), zeros where padded.
    mask: 1.0 for a real example, 0.0 for padding, `[K, S, B]` float32.
    num_examples: Examples each client processes, its size times the epochs
      (what TFF counts as the client's `num_examples`), `[K]` int64.

  S is the most steps any client of the cohort takes (0 if every client's
  file is empty) and B the batch size.
  """

  x: tf.Tensor
  y: tf.Tensor
  mask: tf.Tensor
  num_examples: tf.Tensor


def _positive_int(name: str, value: object) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise CohortDataError(f'{name} must be a positive integer, got {value!r}')
  return int(value)


def _read_cohort(paths: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Every record of the K files, in file order, and the index of the file each came from.

  One `flat_map` over the files (its function is instantiated once per
  cohort, not per client). An empty file contributes no records.
  """

  def records_of(k: tf.Tensor) -> tf.data.Dataset:
    records = client_data.read_records(tf.gather(paths, k))
    return tf.data.Dataset.zip((tf.data.Dataset.from_tensors(k).repeat(), records))

  num_files = tf.size(paths, out_type=tf.int64)
  everything = tf.data.Dataset.range(num_files).flat_map(records_of).batch(_ALL)
  # A cohort without records batches to no element: fall back to an empty one.
  nothing = tf.data.Dataset.from_tensors((tf.zeros([0], tf.int64), tf.zeros([0], tf.string)))
  return everything.concatenate(nothing).take(1).get_single_element()


def _read_cohort_store(ids: tf.Tensor, query: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """The cohort's records from one query of `clients.sqlite`, as `_read_cohort` returns them.

  The rows come ordered by (client id, seq). `tf.unique` over the ids
  followed by the rows' ids numbers each distinct id by its first position
  in `ids` and gives each row that number; a stable sort by it groups the
  rows by client in the ids' order, each client's rows still in `seq` order.
  An id that occurs twice gets its records twice, as it would read its
  file twice.

  Returns:
    `(client_index [N], serialized [N], sizes [K])`: records grouped by
    position k in `ids` (ascending), and each position's number of records.
  """
  everything = client_data.read_store_records(query, num_columns=2).batch(_ALL)
  nothing = tf.data.Dataset.from_tensors((tf.zeros([0], tf.string), tf.zeros([0], tf.string)))
  row_ids, serialized = everything.concatenate(nothing).take(1).get_single_element()
  num_clients = tf.size(ids, out_type=tf.int64)
  _, group = tf.unique(tf.concat([ids, row_ids], 0), out_idx=tf.int64)
  id_group, row_group = group[:num_clients], group[num_clients:]  # Groups < K: rows' ids are ids.
  group_sizes = tf.math.unsorted_segment_sum(tf.ones_like(row_group), row_group, num_clients)
  group_starts = tf.cumsum(group_sizes, exclusive=True)
  by_group = tf.argsort(row_group, stable=True)
  sizes = tf.gather(group_sizes, id_group)  # [K]
  client_index = tf.repeat(tf.range(num_clients), sizes)
  within = tf.range(tf.size(client_index, out_type=tf.int64)) - tf.gather(
    tf.cumsum(sizes, exclusive=True), client_index
  )
  source = tf.gather(by_group, tf.gather(group_starts, tf.gather(id_group, client_index)) + within)
  return client_index, tf.gather(serialized, source), sizes


def _parse(
  serialized: tf.Tensor, num_features: int, label_task: str = record_schema.MULTICLASS
) -> tuple[tf.Tensor, tf.Tensor]:
  """The records' features `[N, num_features]` and labels `[N]`, in the record schema's dtypes.

  A weight `w` the records may carry is not read: the cohort engine trains
  without example weights.
  """
  description = {
    f.key: tf.io.FixedLenFeature(f.shape(num_features), tf.as_dtype(f.dtype))
    for f in record_schema.record_features(label_task=label_task)
  }
  parsed = tf.io.parse_example(serialized, description)
  return parsed[record_schema.FEATURES.key], parsed[record_schema.LABEL.key]


def _shuffled_order(client_index: tf.Tensor, epochs: int) -> tf.Tensor:
  """Record indices grouped by (client, epoch), each group a random permutation of its client's records.

  Slot `starts[k] * epochs + e * n_k + i` holds the record client k takes
  i-th in epoch e. Random keys are sorted first, then the (client, epoch)
  group ids with a stable sort, so each group keeps the random order.
  """
  num_records = tf.size(client_index, out_type=tf.int64)
  epoch = tf.repeat(tf.range(epochs, dtype=tf.int64), num_records)  # [E * N], epoch-major.
  record = tf.tile(tf.range(num_records), [epochs])
  group = tf.tile(client_index, [epochs]) * epochs + epoch
  by_key = tf.argsort(tf.random.uniform(tf.shape(group)), stable=True)
  by_group = tf.argsort(tf.gather(group, by_key), stable=True)
  return tf.gather(record, tf.gather(by_key, by_group))


def make_cohort_fn(
  *,
  split: str,
  num_features: int,
  batch_size: int,
  epochs: int = 1,
  shuffle: bool = True,
  storage: str = manifest.LEGACY_STORAGE,
  label_task: str = record_schema.MULTICLASS,
) -> Callable[[tf.Tensor], CohortBatches]:
  """A function from a cohort's client ids to its padded batches, for use inside TFF computations.

  The function takes a string tensor of K >= 1 client ids, shape `[K]` (K
  known or not when traced), and returns a `CohortBatches` of `x [K, S, B, F]`,
  `y [K, S, B]`, `mask [K, S, B]` and `num_examples [K]`, where B is
  `batch_size` and S the most steps, `ceil(n_k * epochs / batch_size)`, of any
  client. Client k's step s, slot b holds its example at position
  `p = s * B + b` of its epochs' concatenated example order, and is real
  (mask 1) if `p < n_k * epochs`. At run time it fails, before reading any
  file or building the query, if an id is not a valid client id
  (`manifest.CLIENT_ID_PATTERN`: `InvalidArgumentError` 'invalid client id')
  or there is no id; in `clients.sqlite` an id without records fails naming
  it (`InvalidArgumentError` 'no records'), in the per-client layout a
  missing file fails naming it (`NotFoundError`); a record of another width
  fails to parse (`InvalidArgumentError`). As for `make_dataset_fn`, a
  missing `clients.sqlite` crashes the worker (see there).

  Args:
    split: `manifest.TRAIN_SPLIT` or `manifest.EVAL_SPLIT`.
    num_features: Width of the `x` feature.
    batch_size: Examples per batch (B).
    epochs: Passes over each client's data (local epochs).
    shuffle: False: every epoch in file order, exactly the batches of
      `client_data.make_dataset_fn(shuffle=False)`; True: a fresh random
      permutation of the client's examples for each epoch (see the module
      docstring).
    storage: The data directory's layout: pass its manifest's `storage`,
      `manifest.STORAGE_SQLITE` or `manifest.STORAGE_TFRECORD_PER_CLIENT`
      (the default, as for `client_data.make_dataset_fn`, which says why).
    label_task: The manifest's `label_task`: `y` is int64, or float32 for
      'regression'.

  Returns:
    The function, which builds graph ops (call it while tracing a
    `tff.tensorflow.computation`, or in a `tf.function`, or eagerly).

  Raises:
    CohortDataError: For an unknown split or storage, or a size that is not
      a positive integer; the function raises it for ids that are not a 1-D
      tensor or a statically empty one.
  """
  if split not in manifest.SPLITS:
    raise CohortDataError(f'split must be one of {manifest.SPLITS}, got {split!r}')
  if storage not in manifest.STORAGES:
    raise CohortDataError(
      f"storage must be one of {manifest.STORAGES} (the manifest's storage field: pass "
      f'storage=manifest.storage), got {storage!r}'
    )
  if label_task not in record_schema.LABEL_TASKS:
    raise CohortDataError(
      f"label_task must be one of {record_schema.LABEL_TASKS} (the manifest's label_task), "
      f'got {label_task!r}'
    )
  num_features = _positive_int('num_features', num_features)
  batch_size = _positive_int('batch_size', batch_size)
  epochs = _positive_int('epochs', epochs)

  def cohort_for_ids(client_ids: tf.Tensor) -> CohortBatches:
    ids = tf.convert_to_tensor(client_ids, tf.string)
    if ids.shape.rank != 1:
      raise CohortDataError(
        f'client_ids must be a 1-D string tensor (one cohort), got shape {ids.shape}'
      )
    if ids.shape[0] == 0:
      raise CohortDataError('client_ids is empty; a cohort needs at least one client id')
    valid = tf.strings.regex_full_match(ids, manifest.CLIENT_ID_PATTERN)
    checks = [
      tf.debugging.Assert(
        tf.reduce_all(valid), ['invalid client id:', tf.boolean_mask(ids, ~valid)]
      ),
      tf.debugging.Assert(tf.size(ids) > 0, ['a cohort needs at least one client id']),
    ]
    num_clients = tf.size(ids, out_type=tf.int64)
    if storage == manifest.STORAGE_SQLITE:
      before, between, after = client_store.cohort_query(split)
      with tf.control_dependencies(checks):
        query = tf.strings.join([before, tf.strings.reduce_join(ids, separator=between), after])
      client_index, serialized, sizes = _read_cohort_store(ids, query)
      missing = tf.equal(sizes, 0)
      found = tf.debugging.Assert(
        ~tf.reduce_any(missing),
        [
          f'no records in {manifest.STORE_FILENAME} (split {split}) for client id(s):',
          tf.boolean_mask(ids, missing),
        ],
      )
      with tf.control_dependencies([found]):
        serialized, sizes = tf.identity(serialized), tf.identity(sizes)
    else:
      with tf.control_dependencies(checks):
        paths = tf.strings.join([split, '/', ids, manifest.RECORD_EXTENSION])
      client_index, serialized = _read_cohort(paths)
      sizes = tf.math.unsorted_segment_sum(tf.ones_like(client_index), client_index, num_clients)
    features, labels = _parse(serialized, num_features, label_task)
    num_records = tf.size(client_index, out_type=tf.int64)
    starts = tf.cumsum(sizes, exclusive=True)
    totals = sizes * epochs  # [K]
    steps = tf.reduce_max((totals + batch_size - 1) // batch_size)
    position = tf.range(steps * batch_size)  # p = s * B + b, [S * B].

    real = position[tf.newaxis, :] < totals[:, tf.newaxis]  # [K, S * B]
    if shuffle:
      order = _shuffled_order(client_index, epochs)
      slot = starts[:, tf.newaxis] * epochs + position[tf.newaxis, :]
      record = tf.gather(order, tf.where(real, slot, 0))
    else:
      local = position[tf.newaxis, :] % tf.maximum(sizes, 1)[:, tf.newaxis]
      record = starts[:, tf.newaxis] + local
    # Padding reads an appended row of zeros (record N), so it holds zeros as
    # `stack_cohort`'s padding does, also when the cohort has no records.
    record = tf.where(real, record, num_records)
    features = tf.concat([features, tf.zeros([1, num_features], features.dtype)], 0)
    labels = tf.concat([labels, tf.zeros([1], labels.dtype)], 0)

    shape = tf.stack([num_clients, steps, batch_size])
    x = tf.reshape(tf.gather(features, record), tf.concat([shape, [num_features]], 0))
    y = tf.reshape(tf.gather(labels, record), shape)
    mask = tf.reshape(tf.cast(real, tf.float32), shape)
    k = ids.shape[0]
    x.set_shape([k, None, batch_size, num_features])
    y.set_shape([k, None, batch_size])
    mask.set_shape([k, None, batch_size])
    return CohortBatches(x=x, y=y, mask=mask, num_examples=totals)

  return cohort_for_ids

"""Client datasets built where the computation runs, from client ids.

The coordinator never holds client records: it sends client ids, and this
TensorFlow computation, executed by the worker at the data's site, reads the
client's records relative to the worker's working directory (the data
directory), in the layout the manifest's `storage` names (see
`fedpipe.data.manifest`; `fedpipe.data.record_schema` for the records):

* `sqlite`: one query of `clients.sqlite` (`fedpipe.data.client_store`) with
  `tf.data.experimental.SqlDataset`, the query text joined in the graph
  around the client id;
* `tfrecord_per_client`: the file `<split>/<client_id>.tfrecord`.

Either way the id is checked against `manifest.CLIENT_ID_PATTERN` first, at
run time: the id comes from the coordinator, and the check (no separators,
no quotes) is what makes the path, or the SQL text, safe to build from it.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedpipe.data import client_store, manifest, record_schema

_SHUFFLE_BUFFER = 1024
_READ_BUFFER_BYTES = 256 * 1024
# Examples parsed per call. Parsing has a fixed cost per call: parsing each
# small batch on its own cost a large round markedly more CPU than training
# from memory; parsing 512 at a time and re-batching matches it.
_PARSE_CHUNK = 512


def batch_spec(
  num_features: int, *, label_task: str = record_schema.MULTICLASS, weighted: bool = False
) -> collections.OrderedDict:
  """The element spec of a batched client dataset: `x`, `y` and, if `weighted`, `w`.

  Args:
    num_features: Width of the `x` feature.
    label_task: The manifest's `label_task`: `y` is int64, or float32 for
      'regression'.
    weighted: The manifest's `weighted`: records carry `w`.
  """
  return collections.OrderedDict(
    (f.key, tf.TensorSpec([None, *f.shape(num_features)], tf.as_dtype(f.dtype)))
    for f in record_schema.record_features(label_task=label_task, weighted=weighted)
  )


def _feature_description(
  num_features: int, *, label_task: str = record_schema.MULTICLASS, weighted: bool = False
) -> dict[str, tf.io.FixedLenFeature]:
  """How `tf.io.parse_example` reads one record of the record schema."""
  return {
    f.key: tf.io.FixedLenFeature(f.shape(num_features), tf.as_dtype(f.dtype))
    for f in record_schema.record_features(label_task=label_task, weighted=weighted)
  }


def read_records(path: tf.Tensor) -> tf.data.Dataset:
  """The serialized records of one TFRecord file.

  `tf.data.TFRecordDataset` wraps its reader in a `flat_map`, and TF
  instantiates that function again for every iterator, once per client per
  round, which costs about as much as training a small client.
  The reader op alone has no function to instantiate.
  """
  variant = tf.raw_ops.TFRecordDataset(
    filenames=path, compression_type='', buffer_size=_READ_BUFFER_BYTES
  )
  return tf.data.experimental.from_variant(variant, tf.TensorSpec([], tf.string))


def read_store_records(query: tf.Tensor, num_columns: int = 1) -> tf.data.Dataset:
  """The rows of a query of `clients.sqlite` in the working directory, as string tensors.

  `SqlDataset` has no function to instantiate either. It opens the file
  read-only and immutable (`client_store.reader_uri`), so nothing is created
  or locked. BLOB columns come back as `tf.string` bytes.

  Args:
    query: A scalar string tensor, built from `client_store.client_query` or
      `cohort_query` around ids that passed the client-id check.
    num_columns: How many (string) columns the query selects: 1 gives scalar
      elements, more give tuples.
  """
  types = tf.string if num_columns == 1 else (tf.string,) * num_columns
  return tf.data.experimental.SqlDataset('sqlite', client_store.reader_uri(), query, types)


def _check_storage(storage: str) -> str:
  """`storage` if it is a layout the readers read (`manifest.STORAGES`).

  Raises:
    ValueError: Naming the fix, if it is not.
  """
  if storage not in manifest.STORAGES:
    raise ValueError(
      f"storage must be one of {manifest.STORAGES} (the manifest's storage field: pass "
      f'storage=manifest.storage), got {storage!r}'
    )
  return storage


def make_dataset_fn(
  *,
  split: str,
  num_features: int,
  batch_size: int,
  epochs: int = 1,
  shuffle: bool = True,
  storage: str = manifest.LEGACY_STORAGE,
  label_task: str = record_schema.MULTICLASS,
  weighted: bool = False,
) -> Callable[[tf.Tensor], tf.data.Dataset]:
  """A function from a client-id tensor to its batched dataset, for use inside TFF computations.

  Args:
    split: `manifest.TRAIN_SPLIT` or `manifest.EVAL_SPLIT`.
    num_features: Width of the `x` feature.
    batch_size: Examples per batch.
    epochs: Passes over the client's data (local epochs).
    shuffle: Reshuffle each pass (training); off for evaluation.
    storage: The data directory's layout: pass its manifest's `storage`,
      `manifest.STORAGE_SQLITE` (what the writers write) or
      `manifest.STORAGE_TFRECORD_PER_CLIENT` (the default, what a manifest
      without the field means). The default is the old layout because a
      wrong guess then fails cleanly, naming the missing
      `<split>/<id>.tfrecord`, where guessing 'sqlite' for a directory
      without `clients.sqlite` crashes the worker (see below).
    label_task: The manifest's `label_task` (the dtype of `y`).
    weighted: The manifest's `weighted`: batches carry the weights `w`.

  Returns:
    A function that fails at the worker if the id is not a valid client id
    (`InvalidArgumentError` 'invalid client id', before any file is opened
    or query built), and otherwise reads the client's records in order:
    its rows of `clients.sqlite` (an id without rows reads as an empty
    dataset; an unreadable file fails naming the query, so the id) or
    `<split>/<id>.tfrecord` (a missing file fails naming it). A missing
    `clients.sqlite` crashes the worker process instead (TensorFlow 2.14's
    SqlDataset dereferences the connection it failed to open when its
    iterator is destroyed): `manifest.read_manifest` refuses a 'sqlite'
    directory without the file, and the storage must be the manifest's.

  Raises:
    ValueError: For an unknown split or storage, or non-positive sizes.
  """
  if split not in manifest.SPLITS:
    raise ValueError(f'split must be one of {manifest.SPLITS}, got {split!r}')
  _check_storage(storage)
  description = _feature_description(num_features, label_task=label_task, weighted=weighted)
  if batch_size < 1 or epochs < 1 or num_features < 1:
    raise ValueError(
      f'batch_size, epochs and num_features must be >= 1, got '
      f'{batch_size}, {epochs}, {num_features}'
    )

  def dataset_for_client(client_id: tf.Tensor) -> tf.data.Dataset:
    check = tf.debugging.Assert(
      tf.strings.regex_full_match(client_id, manifest.CLIENT_ID_PATTERN),
      ['invalid client id:', client_id],
    )
    if storage == manifest.STORAGE_SQLITE:
      before, after = client_store.client_query(split)
      with tf.control_dependencies([check]):
        dataset = read_store_records(tf.strings.join([before, client_id, after]))
    else:
      with tf.control_dependencies([check]):
        path = tf.strings.join([split, '/', client_id, manifest.RECORD_EXTENSION])
      dataset = read_records(path)
    if shuffle:
      dataset = dataset.shuffle(_SHUFFLE_BUFFER, reshuffle_each_iteration=True)
    if epochs > 1:
      dataset = dataset.repeat(epochs)
    # A parsing dataset op rather than `map(parse_examples)`: no function to
    # instantiate per client (see `read_records`).
    parsed = dataset.batch(_PARSE_CHUNK).apply(
      tf.data.experimental.parse_example_dataset(description)
    )
    return parsed.unbatch().batch(batch_size)

  return dataset_for_client


def build_dataset_computation(**kwargs) -> tff.Computation:
  """`make_dataset_fn(**kwargs)` as a `tff.tensorflow.computation` of type `(str -> B*)`."""
  dataset_fn = make_dataset_fn(**kwargs)

  @tff.tensorflow.computation(np.str_)
  def dataset_for_client(client_id):
    return dataset_fn(client_id)

  return dataset_for_client

"""Client datasets built where the computation runs, from client ids.

The coordinator never holds client records: it sends client ids, and this
TensorFlow computation, executed by the worker at the data's site, opens
`<split>/<client_id>.tfrecord` relative to the worker's working directory
(see `fedpipe.data.manifest` for the layout, `fedpipe.data.record_schema`
for the records).
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedpipe.data import manifest, record_schema

_SHUFFLE_BUFFER = 1024
_READ_BUFFER_BYTES = 256 * 1024
# Examples parsed per call. Parsing has a fixed cost per call: parsing each
# small batch on its own cost a large round markedly more CPU than training
# from memory; parsing 512 at a time and re-batching matches it.
_PARSE_CHUNK = 512


def batch_spec(num_features: int) -> collections.OrderedDict:
  """The element spec of a batched client dataset."""
  return collections.OrderedDict(
    (f.key, tf.TensorSpec([None, *f.shape(num_features)], tf.as_dtype(f.dtype)))
    for f in record_schema.RECORD_FEATURES
  )


def _feature_description(num_features: int) -> dict[str, tf.io.FixedLenFeature]:
  """How `tf.io.parse_example` reads one record of the record schema."""
  return {
    f.key: tf.io.FixedLenFeature(f.shape(num_features), tf.as_dtype(f.dtype))
    for f in record_schema.RECORD_FEATURES
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


def make_dataset_fn(
  *,
  split: str,
  num_features: int,
  batch_size: int,
  epochs: int = 1,
  shuffle: bool = True,
) -> Callable[[tf.Tensor], tf.data.Dataset]:
  """A function from a client-id tensor to its batched dataset, for use inside TFF computations.

  Args:
    split: `manifest.TRAIN_SPLIT` or `manifest.EVAL_SPLIT`.
    num_features: Width of the `x` feature.
    batch_size: Examples per batch.
    epochs: Passes over the client's data (local epochs).
    shuffle: Reshuffle each pass (training); off for evaluation.

  Returns:
    A function that fails at the worker if the id is not a valid client id
    (no path components), and otherwise reads `<split>/<id>.tfrecord`.

  Raises:
    ValueError: For an unknown split or non-positive sizes.
  """
  if split not in manifest.SPLITS:
    raise ValueError(f'split must be one of {manifest.SPLITS}, got {split!r}')
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
      tf.data.experimental.parse_example_dataset(_feature_description(num_features))
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

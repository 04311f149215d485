"""The record schema of client data: the two features of every example.

Each record of a client's TFRecord file is a `tf.train.Example` with

* `x`: the example's `num_features` normalized feature values, float32, in
  the Example's `float_list`;
* `y`: its class label, one int64, in the Example's `int64_list`.

The preprocessing pipeline writes records in this schema
(`example_records.ExampleEncoder`), the manifest declares it
(`record_format`), and the readers in `fedpipe.computations.client_data`
parse and batch it. Everything about the schema is defined here, in pure
Python, so each of them reads it from one place.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class RecordFeature:
  """One feature of the record schema.

  Attributes:
    key: The feature's name in the Example (and in a batch).
    dtype: Its dtype's name, as NumPy and TensorFlow spell it.
    list_field: The Example `Feature` field that holds its values.
    is_vector: True for one value per input feature (shape `[num_features]`),
      False for one value (shape `[]`).
  """

  key: str
  dtype: str
  list_field: str
  is_vector: bool

  def shape(self, num_features: int) -> list[int]:
    """The feature's shape in one example."""
    return [num_features] if self.is_vector else []


FEATURES = RecordFeature(key='x', dtype='float32', list_field='float_list', is_vector=True)
LABEL = RecordFeature(key='y', dtype='int64', list_field='int64_list', is_vector=False)
RECORD_FEATURES = (FEATURES, LABEL)


def record_format(num_features: int) -> dict[str, dict[str, Any]]:
  """The manifest's `record_format`: each feature's dtype and shape in one example."""
  return {f.key: {'dtype': f.dtype, 'shape': f.shape(num_features)} for f in RECORD_FEATURES}

"""The record schema of client data: the features of every example.

Each record of a client's TFRecord file is a `tf.train.Example` with

* `x`: the example's `num_features` normalized feature values, float32, in
  the Example's `float_list` (a categorical column is a one-hot slice of it,
  see `fedpipe.pipelines.feature_spec`);
* `y`: its label, one value: an int64 class in the Example's `int64_list`
  for the label tasks 'multiclass' and 'binary' (0 or 1), one float32 in
  its `float_list` for 'regression';
* `w`: only if the feature spec has a weight column, the example's weight,
  one float32 in the Example's `float_list`.

The preprocessing pipeline writes records in this schema
(`example_records.ExampleEncoder`), the manifest declares it
(`record_format`, and its `label_task`), and the readers in
`fedpipe.computations.client_data` parse and batch it. Everything about the
schema is defined here, in pure Python, so each of them reads it from one
place. Client data written before label tasks existed holds `x` and `y`
(int64) only: the 'multiclass' task.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fedpipe.errors import FedpipeError

# The label tasks (the feature spec's `label.task`).
MULTICLASS = 'multiclass'
BINARY = 'binary'
REGRESSION = 'regression'
LABEL_TASKS = (MULTICLASS, BINARY, REGRESSION)


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
FLOAT_LABEL = RecordFeature(key='y', dtype='float32', list_field='float_list', is_vector=False)
WEIGHT = RecordFeature(key='w', dtype='float32', list_field='float_list', is_vector=False)
# The records of a multiclass task without weights (all client data before label tasks).
RECORD_FEATURES = (FEATURES, LABEL)


class LabelTaskError(FedpipeError, ValueError):
  """A label task is not one of `LABEL_TASKS`."""


def check_label_task(task: object) -> str:
  """Returns `task` if it is one of `LABEL_TASKS`.

  Raises:
    LabelTaskError: Naming the task and the allowed ones, if it is not.
  """
  if task not in LABEL_TASKS:
    raise LabelTaskError(
      f'label task {task!r} is not one of {", ".join(repr(t) for t in LABEL_TASKS)}; '
      'set label.task in the feature spec to one of them'
    )
  return str(task)


def label_feature(label_task: str = MULTICLASS) -> RecordFeature:
  """The `y` feature of a label task: int64 for classes, float32 for regression."""
  return FLOAT_LABEL if check_label_task(label_task) == REGRESSION else LABEL


def record_features(
  *, label_task: str = MULTICLASS, weighted: bool = False
) -> tuple[RecordFeature, ...]:
  """The features of one record: `x`, `y` in the task's dtype and, if `weighted`, `w`."""
  features = (FEATURES, label_feature(label_task))
  return features + (WEIGHT,) if weighted else features


def record_format(
  num_features: int, *, label_task: str = MULTICLASS, weighted: bool = False
) -> dict[str, dict[str, Any]]:
  """The manifest's `record_format`: each feature's dtype and shape in one example."""
  return {
    f.key: {'dtype': f.dtype, 'shape': f.shape(num_features)}
    for f in record_features(label_task=label_task, weighted=weighted)
  }

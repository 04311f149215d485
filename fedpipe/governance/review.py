"""What a silo-side computation does, read from its proto, and whether a silo may run it.

A study's label for a computation ("train_round", "evaluate") is the
coordinator's claim. The silo reads the computation itself:

* every TensorFlow op must be on `ALLOWED_OPS` (model arithmetic, the
  client-data reader, TFF's own plumbing) or on the policy's extra list; ops
  that reach outside the computation (reading or writing files other than
  through the client-data reader, Python callbacks, printing, debugging
  hooks) are named with why they are refused;
* every TFF intrinsic must be on `ALLOWED_INTRINSICS`;
* it must take client ids placed at CLIENTS (that is how a silo's data is
  read) and everything it returns must be placed at SERVER: an aggregate over
  clients, never a per-client value, and never a string (raw records);
* an evaluation may release only a few numbers (`MAX_EVALUATION_OUTPUTS`):
  metrics, not a model-sized update.

These checks are necessary, not sufficient: a computation that passes them
can still be written to single out one client inside its aggregate, which is
why the data owner approves studies and limits their calls and privacy cost.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator
from typing import Any

from google.protobuf import message as message_lib
from tensorflow_federated.proto.v0 import computation_pb2

from fedpipe.governance import fingerprint as computation_fingerprint
from fedpipe.governance import store as governance_store

MAX_EVALUATION_OUTPUTS = 64

# Ops of fedpipe's own training and evaluation (every optimizer, clipping
# mode and model it builds) and of common Keras layers, losses and metrics.
ALLOWED_OPS = frozenset(
  {
    # Arithmetic, shapes and control flow.
    'Abs',
    'Add',
    'AddN',
    'AddV2',
    'All',
    'Any',
    'ArgMax',
    'ArgMin',
    'Assert',
    'BatchMatMulV2',
    'BiasAdd',
    'BiasAddGrad',
    'BroadcastArgs',
    'BroadcastGradientArgs',
    'BroadcastTo',
    'Cast',
    'Ceil',
    'ClipByValue',
    'ConcatV2',
    'Const',
    'Cumsum',
    'Div',
    'DivNoNan',
    'DynamicStitch',
    'Einsum',
    'Enter',
    'Equal',
    'Exit',
    'Exp',
    'ExpandDims',
    'Fill',
    'Floor',
    'FloorDiv',
    'FloorMod',
    'GatherV2',
    'Greater',
    'GreaterEqual',
    'Identity',
    'IdentityN',
    'If',
    'InTopKV2',
    'IsFinite',
    'IsNan',
    'L2Loss',
    'Less',
    'LessEqual',
    'Log',
    'Log1p',
    'LogicalAnd',
    'LogicalNot',
    'LogicalOr',
    'LoopCond',
    'MatMul',
    'Max',
    'Maximum',
    'Mean',
    'Merge',
    'Min',
    'Minimum',
    'Mul',
    'Neg',
    'NextIteration',
    'NoOp',
    'NotEqual',
    'OneHot',
    'OnesLike',
    'Pack',
    'Pad',
    'PadV2',
    'PartitionedCall',
    'Placeholder',
    'Pow',
    'Prod',
    'Range',
    'Rank',
    'RealDiv',
    'Reciprocal',
    'Reshape',
    'Round',
    'Rsqrt',
    'RsqrtGrad',
    'Select',
    'SelectV2',
    'Shape',
    'ShapeN',
    'Sign',
    'Size',
    'Slice',
    'Split',
    'SplitV',
    'Sqrt',
    'SqrtGrad',
    'Square',
    'SquaredDifference',
    'Squeeze',
    'StatefulPartitionedCall',
    'StatelessIf',
    'StatelessWhile',
    'StopGradient',
    'StridedSlice',
    'StridedSliceGrad',
    'Sub',
    'Sum',
    'Switch',
    'Tile',
    'TopKV2',
    'Transpose',
    'Unpack',
    'While',
    'ZerosLike',
    # Layers, activations, losses.
    'AvgPool',
    'AvgPoolGrad',
    'Conv2D',
    'Conv2DBackpropFilter',
    'Conv2DBackpropInput',
    'Elu',
    'EluGrad',
    'FusedBatchNormGradV3',
    'FusedBatchNormV3',
    'LeakyRelu',
    'LeakyReluGrad',
    'LogSoftmax',
    'MaxPool',
    'MaxPoolGrad',
    'Relu',
    'Relu6',
    'Relu6Grad',
    'ReluGrad',
    'Selu',
    'SeluGrad',
    'Sigmoid',
    'SigmoidGrad',
    'Softmax',
    'SoftmaxCrossEntropyWithLogits',
    'Softplus',
    'SoftplusGrad',
    'SparseSoftmaxCrossEntropyWithLogits',
    'Tanh',
    'TanhGrad',
    # Variables local to the computation.
    'AssignAddVariableOp',
    'AssignSubVariableOp',
    'AssignVariableOp',
    'ReadVariableOp',
    'ResourceGather',
    'VarHandleOp',
    'VarIsInitializedOp',
    # Randomness without files (shuffling, dropout, noise).
    'RandomShuffle',
    'RandomStandardNormal',
    'RandomUniform',
    'RandomUniformInt',
    'StatelessRandomNormalV2',
    'StatelessRandomUniformV2',
    'StatelessRandomGetKeyCounter',
    'StatelessRandomGetKeyCounterAlg',
    'StatelessRandomUniformIntV2',
    # The client-data reader: TFRecords named from the client id, or a query of
    # clients.sqlite built around it (data/client_store), parsed in batches.
    'StaticRegexFullMatch',
    'StringJoin',
    'TFRecordDataset',
    'TFRecordDatasetV2',
    'SqlDataset',
    'ParseExampleDatasetV2',
    # tf.data plumbing over those records.
    'BatchDatasetV2',
    'DatasetCardinality',
    'FilterDataset',
    'FlatMapDataset',
    'MapDataset',
    'ModelDataset',
    'OptimizeDatasetV2',
    'OptionsDataset',
    'PaddedBatchDatasetV2',
    'PrefetchDataset',
    'ReduceDataset',
    'RepeatDataset',
    'ShuffleDatasetV3',
    'ShuffleDataset',
    'SkipDataset',
    'TakeDataset',
    'TensorDataset',
    'TensorSliceDataset',
    'UnbatchDataset',
    'ZipDataset',
    # The cohort engine (computations/cohort_data, cohort_training): a cohort's
    # ids split from its one string, its users' records read in one pass and
    # stacked per user (unique ids, segment sums, counts), none touching files.
    'Bincount',
    'ConcatenateDataset',
    'DatasetToSingleElement',
    'ParseExampleV2',
    'RangeDataset',
    'ReduceJoin',
    'StringSplitV2',
    'Unique',
    'UnsortedSegmentSum',
    'Where',
  }
)

# Why some ops are refused (any op not on the allowlist is refused too).
REFUSED_OPS = {
  **dict.fromkeys(
    (
      'ReadFile',
      'MatchingFiles',
      'FileExists',
      'IsDirectory',
      'GetChildren',
      'TextLineDataset',
      'TextLineDatasetV2',
      'FixedLengthRecordDataset',
      'FixedLengthRecordDatasetV2',
      'CSVDataset',
      'ExperimentalCSVDataset',
      'LoadDataset',
      'RestoreV2',
      'Restore',
      'ImmutableConst',
      'DecodeImage',
    ),
    'reads files other than through the client-data reader',
  ),
  **dict.fromkeys(
    (
      'WriteFile',
      'SaveV2',
      'Save',
      'SaveDataset',
      'SnapshotDataset',
      'ExperimentalSnapshotDataset',
      'DeleteFile',
      'RecursivelyCreateDir',
      'WriteSummary',
      'CreateSummaryFileWriter',
    ),
    'writes or deletes files on the silo',
  ),
  **dict.fromkeys(
    ('PyFunc', 'EagerPyFunc', 'PyFuncStateless'), 'runs arbitrary Python code on the silo'
  ),
  **dict.fromkeys(('Print', 'PrintV2'), "prints data to the silo's logs"),
  **dict.fromkeys(
    (
      'DebugIdentity',
      'DebugIdentityV2',
      'DebugNanCount',
      'DebugNumericSummary',
      'DebugNumericSummaryV2',
      'CopyHost',
      'Copy',
    ),
    'is a debugging hook',
  ),
}

ALLOWED_INTRINSICS = frozenset(
  {
    'federated_aggregate',
    'federated_apply',
    'federated_broadcast',
    'federated_map',
    'federated_map_all_equal',
    'federated_mean',
    'federated_sum',
    'federated_value_at_server',
    'federated_weighted_mean',
    'federated_zip_at_clients',
    'federated_zip_at_server',
  }
)


@dataclasses.dataclass(frozen=True)
class Description:
  """What a computation is: its type, what leaves the silo, its ops and intrinsics."""

  type_signature: str
  leaves_silo: str
  tensorflow_ops: tuple[str, ...]
  intrinsics: tuple[str, ...]
  output_numbers: float  # Numbers released per call; inf if a dimension is unknown.
  problems: tuple[str, ...]  # Structural reasons to refuse it, whatever its role.

  def to_json(self) -> dict[str, Any]:
    return {
      'type_signature': self.type_signature,
      'leaves_silo': self.leaves_silo,
      'tensorflow_ops': list(self.tensorflow_ops),
      'intrinsics': list(self.intrinsics),
      'io_ops': sorted(
        set(self.tensorflow_ops) & set(REFUSED_OPS)
        | ({'TFRecordDataset', 'SqlDataset'} & set(self.tensorflow_ops))
      ),
      'output_numbers': None if math.isinf(self.output_numbers) else int(self.output_numbers),
      'problems': list(self.problems),
    }


def _intrinsic_uris(message: message_lib.Message) -> Iterator[str]:
  for field, value in message.ListFields():
    if field.name == 'intrinsic':
      yield value.uri
    if field.name == 'graph_def' or field.type != field.TYPE_MESSAGE:
      continue
    if field.message_type.GetOptions().map_entry:
      continue
    for item in value if field.label == field.LABEL_REPEATED else [value]:
      yield from _intrinsic_uris(item)


def _ops(proto: computation_pb2.Computation) -> set[str]:
  ops: set[str] = set()
  for graph in computation_fingerprint.graph_defs(proto):
    ops.update(node.op for node in graph.node)
    for function in graph.library.function:
      ops.update(node.op for node in function.node_def)
  # Calls of functions defined in the graph's own library are not ops.
  names = {
    f.signature.name for g in computation_fingerprint.graph_defs(proto) for f in g.library.function
  }
  return ops - names


def _leaves(type_spec, placement=None) -> Iterator[tuple[Any, Any]]:
  """(tensor type, placement) of every tensor leaf of a TFF type."""
  import tensorflow_federated as tff

  if isinstance(type_spec, tff.StructType):
    for _, element in tff.structure.iter_elements(type_spec):
      yield from _leaves(element, placement)
  elif isinstance(type_spec, tff.FederatedType):
    yield from _leaves(type_spec.member, type_spec.placement)
  elif isinstance(type_spec, tff.SequenceType):
    yield from _leaves(type_spec.element, placement)
  else:
    yield type_spec, placement


def _numbers(tensor_type) -> float:
  shape = getattr(tensor_type, 'shape', ())
  if shape is None or any(d is None for d in shape):
    return math.inf
  return float(math.prod(shape))


def _is_string(tensor_type) -> bool:
  import numpy as np

  dtype = getattr(tensor_type, 'dtype', None)
  try:
    return dtype is not None and np.dtype(dtype).kind in ('U', 'S', 'O')
  except TypeError:
    return True


def describe(
  proto: computation_pb2.Computation, extra_allowed_ops: Iterable[str] = ()
) -> Description:
  """Reads what `proto` does and every structural reason to refuse it.

  Args:
    proto: A serialized computation as a silo receives it.
    extra_allowed_ops: Ops the silo's policy allows beyond `ALLOWED_OPS`.

  Returns:
    A `Description`; its `problems` name each refused op, intrinsic and type.
  """
  import tensorflow_federated as tff

  ops = _ops(proto)
  intrinsics = set(_intrinsic_uris(proto))
  signature = tff.framework.deserialize_computation(proto).type_signature
  allowed = ALLOWED_OPS | frozenset(extra_allowed_ops)
  problems = []
  for op in sorted(ops - allowed):
    why = REFUSED_OPS.get(
      op, "is not on the silo's op allowlist (a policy may add it: [review] extra_allowed_ops)"
    )
    problems.append(f'op {op} {why}')
  for uri in sorted(intrinsics - ALLOWED_INTRINSICS):
    problems.append(f'intrinsic {uri} is not allowed on a silo')
  parameter = signature.parameter if isinstance(signature, tff.FunctionType) else None
  result = signature.result if isinstance(signature, tff.FunctionType) else signature
  takes_client_ids = parameter is not None and any(
    p is tff.CLIENTS and _is_string(t) for t, p in _leaves(parameter)
  )
  if not takes_client_ids:
    problems.append(
      "it takes no client ids placed at CLIENTS: it is not a computation over this silo's clients"
    )
  leaves = list(_leaves(result))
  output_numbers = sum(_numbers(t) for t, _ in leaves)
  if not leaves:
    problems.append('it returns nothing')
  for tensor_type, placement in leaves:
    if placement is not tff.SERVER:
      where = 'per client' if placement is tff.CLIENTS else 'unplaced'
      problems.append(
        f'what leaves the silo includes {tensor_type} {where}: only aggregates '
        'over clients (placed at SERVER) may leave'
      )
      break
  if any(_is_string(t) for t, _ in leaves):
    problems.append(
      'what leaves the silo includes strings: raw records or file contents may not leave'
    )
  return Description(
    type_signature=str(signature),
    leaves_silo=str(result),
    tensorflow_ops=tuple(sorted(ops)),
    intrinsics=tuple(sorted(intrinsics)),
    output_numbers=output_numbers,
    problems=tuple(problems),
  )


def role_problems(role: str, description: Description) -> list[str]:
  """Reasons a computation cannot have `role`, judged by what it releases."""
  if role == governance_store.ROLE_EVALUATE and description.output_numbers > MAX_EVALUATION_OUTPUTS:
    count = (
      'an unknown number of'
      if math.isinf(description.output_numbers)
      else f'{int(description.output_numbers)}'
    )
    return [
      f'it releases {count} numbers per call; an evaluation releases metrics only '
      f'(at most {MAX_EVALUATION_OUTPUTS})'
    ]
  return []

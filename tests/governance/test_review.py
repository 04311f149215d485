"""The silo's structural review of computations, and what a caller learns of worker errors."""

import numpy as np
import pytest

from fedpipe.federation import silo_server
from fedpipe.governance import review as computation_review


def _wire(comp):
  from fedpipe.runtime import execution_context

  return execution_context.wire_computation(comp)


def _over_clients(client_fn, result_spec_fn=None):
  import tensorflow_federated as tff

  @tff.federated_computation(tff.FederatedType(np.str_, tff.CLIENTS))
  def comp(client_ids):
    values = tff.federated_map(client_fn, client_ids)
    return result_spec_fn(values) if result_spec_fn else tff.federated_sum(values)

  return comp


def test_fedpipe_style_aggregate_passes_and_counts_what_leaves():
  import tensorflow as tf
  import tensorflow_federated as tff

  @tff.tensorflow.computation(np.str_)
  def count(client_id):
    records = tf.data.TFRecordDataset(tf.strings.join(['train/', client_id, '.tfrecord']))
    return records.reduce(np.int64(0), lambda n, _: n + 1)

  d = computation_review.describe(_wire(_over_clients(count)))
  assert d.problems == () and d.output_numbers == 1
  assert computation_review.role_problems('evaluate', d) == []
  assert any(op.startswith('TFRecordDataset') for op in d.tensorflow_ops)
  assert 'federated_aggregate' in d.intrinsics  # The native form of federated_sum.


@pytest.mark.parametrize('op', ['read_file', 'write_file', 'py_function', 'print'])
def test_ops_that_reach_outside_are_named(op):
  import tensorflow as tf
  import tensorflow_federated as tff

  @tff.tensorflow.computation(np.str_)
  def client(client_id):
    if op == 'read_file':
      return tf.strings.length(tf.io.read_file(client_id))
    if op == 'write_file':
      with tf.control_dependencies([tf.io.write_file('/tmp/x', client_id)]):
        return tf.constant(1)
    if op == 'print':
      with tf.control_dependencies([tf.print(client_id)]):
        return tf.constant(1)
    return tf.reshape(tf.py_function(lambda s: 1, [client_id], tf.int32), [])

  problems = computation_review.describe(_wire(_over_clients(client))).problems
  expected = {
    'read_file': 'op ReadFile reads files',
    'write_file': 'op WriteFile writes',
    'py_function': 'op EagerPyFunc runs arbitrary Python',
    'print': 'op PrintV2 prints',
  }
  assert any(expected[op] in p for p in problems), problems


def test_per_client_values_strings_and_unplaced_results_cannot_leave():
  import tensorflow as tf
  import tensorflow_federated as tff

  @tff.tensorflow.computation(np.str_)
  def echo(client_id):
    return tf.identity(client_id)

  per_client = computation_review.describe(_wire(_over_clients(echo, lambda v: v))).problems
  assert any('per client' in p for p in per_client), per_client
  assert any('includes strings' in p for p in per_client), per_client

  @tff.tensorflow.computation(np.str_)
  def unplaced(path):
    return tf.io.read_file(path)

  problems = computation_review.describe(_wire(unplaced)).problems
  assert any('takes no client ids' in p for p in problems)
  assert any('unplaced' in p for p in problems)


def test_an_evaluation_releases_few_numbers_and_extra_ops_need_the_policy():
  import tensorflow as tf
  import tensorflow_federated as tff

  @tff.tensorflow.computation(np.str_)
  def wide(client_id):
    del client_id
    return tf.fill([65], 1.0)

  d = computation_review.describe(_wire(_over_clients(wide)))
  assert d.output_numbers == 65
  assert 'releases 65 numbers' in computation_review.role_problems('evaluate', d)[0]
  assert computation_review.role_problems('train_round', d) == []

  @tff.tensorflow.computation(np.str_)
  def cosine(client_id):
    return tf.math.cos(tf.cast(tf.equal(client_id, 'x'), tf.float32))

  proto = _wire(_over_clients(cosine))
  assert any(
    "op Cos is not on the silo's op allowlist" in p
    for p in computation_review.describe(proto).problems
  )
  assert computation_review.describe(proto, extra_allowed_ops=('Cos',)).problems == ()


def test_worker_errors_reach_the_caller_without_tensor_values():
  details = (
    'assertion failed: [record:] [0.25 0.5 7 11] [[{{node Assert}}]]\nsecond line with [values]'
  )
  told = silo_server.redact_worker_error(details)
  assert '0.25' not in told and 'second line' not in told
  assert told.startswith('assertion failed: […] […]') and "silo's log" in told
  assert silo_server.redact_worker_error(
    'Failed to run computation: x; No such file or directory'
  ).startswith('Failed to run computation: x; No such file or directory')

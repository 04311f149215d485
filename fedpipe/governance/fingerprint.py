"""Content hashes of TFF computations, the same wherever they are built.

A data owner approves computations by hash; the silo recomputes the hash of
every computation a caller sends and runs only approved ones. TFF's
serialized computations are not byte-stable across processes: the compiler
names intermediate values with a per-process counter (`_var12`, `_fed3`) and
stamps a `cache_key` on some nodes, and TensorFlow suffixes each traced
function's name with a process-wide counter (`__inference_map_lambda_2806`).
The fingerprint renames every such generated name in depth-first order of
first reference, clears cache keys, orders function libraries by the new
names, then hashes the deterministic serialization: two builds of the same
computation agree, and a computation that differs by one op does not.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator

from google.protobuf import message as message_lib
from tensorflow.core.framework import graph_pb2
from tensorflow_federated.proto.v0 import computation_pb2

_GENERATED_NAME = re.compile(r'^_[a-z]{3}\d+$')
_CLEARED_FIELDS = frozenset({'cache_key'})
_TRACED_FUNCTION = re.compile(r'^__(inference|forward|backward)_')
_COUNTER_SUFFIX = re.compile(r'(_\d+)+$')


def _funcs(attr) -> list:
  """The function references (`NameAttrList`) an attribute value holds."""
  if attr.HasField('func'):
    return [attr.func]
  return list(attr.list.func) if attr.HasField('list') else []


def _function_refs(attr_values) -> list[str]:
  """Function names referenced by a node's or function's attributes."""
  refs = []
  for attr in attr_values:
    for func in _funcs(attr):
      refs.append(func.name)
      refs += _function_refs(func.attr.values())
  return refs


def _rename_attrs(attr_values, names: dict[str, str]) -> None:
  for attr in attr_values:
    if attr.HasField('s'):  # Forward/backward function names in gradient attrs.
      text = attr.s.decode('utf-8', 'replace')
      if text in names:
        attr.s = names[text].encode()
      elif _TRACED_FUNCTION.match(text):
        attr.s = _COUNTER_SUFFIX.sub('', text).encode()
    for func in _funcs(attr):
      func.name = names.get(func.name, func.name)
      _rename_attrs(func.attr.values(), names)


def _canonical_graph(serialized: bytes) -> bytes:
  """A GraphDef with its library's functions renamed by first reference, then sorted."""
  graph = graph_pb2.GraphDef.FromString(serialized)
  functions = {f.signature.name: f for f in graph.library.function}
  names: dict[str, str] = {}

  def visit_nodes(nodes) -> None:
    for node in nodes:
      for ref in [node.op] + _function_refs(node.attr.values()):
        if ref in functions and ref not in names:
          names[ref] = f'__fn{len(names)}'
          visit_nodes(functions[ref].node_def)

  visit_nodes(graph.node)
  unreferenced = sorted(
    (f.SerializeToString(deterministic=True), n) for n, f in functions.items() if n not in names
  )
  for _, n in unreferenced:
    names[n] = f'__fn{len(names)}'
  for node in list(graph.node) + [n for f in graph.library.function for n in f.node_def]:
    node.ClearField('experimental_debug_info')  # Names of traced functions: counters again.
    node.op = names.get(node.op, node.op)
    _rename_attrs(node.attr.values(), names)
  for function in graph.library.function:
    function.signature.name = names[function.signature.name]
    _rename_attrs(function.attr.values(), names)
  for gradient in graph.library.gradient:
    gradient.function_name = names.get(gradient.function_name, gradient.function_name)
    gradient.gradient_func = names.get(gradient.gradient_func, gradient.gradient_func)
  ordered = sorted(graph.library.function, key=lambda f: f.signature.name)
  del graph.library.function[:]
  graph.library.function.extend(ordered)
  return graph.SerializeToString(deterministic=True)


def _canonicalize(message: message_lib.Message, names: dict[str, str]) -> None:
  for field, value in message.ListFields():
    if field.name in _CLEARED_FIELDS:
      message.ClearField(field.name)
      continue
    if _is_graph_def(field):
      value.value = _canonical_graph(value.value)
      continue
    for item in _nested_messages(field, value):
      _canonicalize(item, names)
    if (
      field.type == field.TYPE_STRING
      and field.label != field.LABEL_REPEATED
      and _GENERATED_NAME.match(value)
    ):
      setattr(message, field.name, names.setdefault(value, f'_n{len(names)}'))


def _is_graph_def(field) -> bool:
  return field.name == 'graph_def' and field.message_type.full_name == 'google.protobuf.Any'


def _nested_messages(field, value) -> list[message_lib.Message]:
  if field.type != field.TYPE_MESSAGE or field.message_type.GetOptions().map_entry:
    return []
  return list(value) if field.label == field.LABEL_REPEATED else [value]


def graph_defs(message: message_lib.Message) -> Iterator[graph_pb2.GraphDef]:
  """Every TensorFlow graph inside a computation proto, parsed."""
  for field, value in message.ListFields():
    if _is_graph_def(field):
      yield graph_pb2.GraphDef.FromString(value.value)
      continue
    for item in _nested_messages(field, value):
      yield from graph_defs(item)


def fingerprint(computation: computation_pb2.Computation) -> str:
  """`sha256:<hex>` of `computation` with generated names and cache keys normalized."""
  canonical = computation_pb2.Computation()
  canonical.CopyFrom(computation)
  _canonicalize(canonical, {})
  digest = hashlib.sha256(canonical.SerializeToString(deterministic=True)).hexdigest()
  return f'sha256:{digest}'


def short(fp: str) -> str:
  """The first 12 hex digits, for messages and tables."""
  return fp.split(':', 1)[-1][:12]

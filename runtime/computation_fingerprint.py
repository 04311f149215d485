"""Content hashes of TFF computations, the same wherever they are built.

A data owner approves computations by hash; the silo recomputes the hash of
every computation a caller sends and runs only approved ones. TFF's
serialized computations are not byte-stable across processes: the compiler
names intermediate values with a per-process counter (`_var12`, `_fed3`) and
stamps a `cache_key` on some nodes. The fingerprint renames every such
generated name in depth-first order of first appearance and clears cache keys,
then hashes the deterministic serialization, so two builds of the same
computation agree and a computation that differs by one op does not.
"""

from __future__ import annotations

import hashlib
import re

from google.protobuf import message as message_lib
from tensorflow_federated.proto.v0 import computation_pb2

_GENERATED_NAME = re.compile(r'^_[a-z]{3}\d+$')
_CLEARED_FIELDS = frozenset({'cache_key'})


def _canonicalize(message: message_lib.Message, names: dict[str, str]) -> None:
  for field, value in message.ListFields():
    if field.name in _CLEARED_FIELDS:
      message.ClearField(field.name)
      continue
    repeated = field.label == field.LABEL_REPEATED
    if field.type == field.TYPE_MESSAGE:
      for item in (value if repeated else [value]):
        if field.message_type.GetOptions().map_entry:
          continue
        _canonicalize(item, names)
    elif field.type == field.TYPE_STRING and not repeated and _GENERATED_NAME.match(value):
      setattr(message, field.name, names.setdefault(value, f'_n{len(names)}'))


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

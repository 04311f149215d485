"""Typed reads of decoded JSON from another party, with errors that name the field.

A silo decodes what coordinators send (study requests, status requests) and
a coordinator what silos answer; a field that is missing or of the wrong type
is reported as `<what> has no field <name>` or `<what> field <name> must be a
string, got a list`, raised as the caller's own error class, never as a
`KeyError` or `TypeError` from deep inside the decoder.
"""

from __future__ import annotations

from typing import Any

_TYPE_NAMES = {dict: 'an object', list: 'a list', str: 'a string', int: 'a whole number'}


def json_type(value: Any) -> str:
  """The JSON type of a decoded value, as a message names it ('an object', 'null', ...)."""
  if value is None:
    return 'null'
  if isinstance(value, bool):
    return 'a boolean'
  if isinstance(value, float):
    return 'a number'
  return _TYPE_NAMES.get(type(value), type(value).__name__)


def require_object(value: Any, what: str, error: type[Exception]) -> dict[str, Any]:
  """`value` if it is a JSON object; else raises `error` naming `what`."""
  if not isinstance(value, dict):
    raise error(f'{what} must be a JSON object, got {json_type(value)}')
  return value


def field(
  data: dict[str, Any],
  key: str,
  kind: type,
  *,
  what: str,
  error: type[Exception],
  within: str = '',
  optional: bool = False,
) -> Any:
  """`data[key]`, checked to be a `kind`.

  Args:
    data: A decoded JSON object.
    key: The field.
    kind: `dict`, `list`, `str` or `int` (booleans are not ints here), or
      `object` for any value.
    what: What `data` is, for messages ('the study request').
    error: The error class to raise.
    within: The path of `data` inside the payload ('privacy'), prefixed to
      the field's name in messages.
    optional: Whether null is allowed (then returned as None).

  Raises:
    error: If the field is missing or not a `kind`.
  """
  name = f'{within}.{key}' if within else key
  if key not in data:
    raise error(f'{what} has no field {name}')
  value = data[key]
  if kind is object or (value is None and optional):
    return value
  if isinstance(value, bool) or not isinstance(value, kind):
    raise error(f'{what} field {name} must be {_TYPE_NAMES[kind]}, got {json_type(value)}')
  return value

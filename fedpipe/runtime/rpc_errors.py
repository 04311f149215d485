"""One-line summaries of failed gRPC calls (to a worker or a silo) for messages and logs.

A failed call's details can run to pages: TFF appends the whole computation
it was evaluating (` while evaluating local ...`) and TensorFlow its graph
context on further lines. A user is told the status code and the first line
without that context; the cause of a TFF error is found by walking its chain
of causes, where TFF wraps the gRPC error in its own exceptions.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc

_TFF_CONTEXT = ' while evaluating local'
DEFAULT_LIMIT = 400


def error_chain(error: BaseException | None) -> Iterator[BaseException]:
  """`error`, then its cause or context, and theirs, each once."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def find_rpc_error(error: BaseException) -> grpc.RpcError | None:
  """The first gRPC error with a status code in `error`'s chain, or None."""
  for e in error_chain(error):
    if isinstance(e, grpc.RpcError) and hasattr(e, 'code'):
      return e
  return None


def details_line(details: str | None) -> str:
  """The first line of a call's details, without TFF's ` while evaluating local ...` context."""
  return (details or '').split('\n', 1)[0].split(_TFF_CONTEXT, 1)[0].strip()


def rpc_summary(error: grpc.RpcError, limit: int | None = DEFAULT_LIMIT) -> str:
  """`CODE: first line of the details`, the line cut at `limit` characters (None: not cut)."""
  return f'{error.code().name}: {details_line(error.details())[:limit]}'


def exception_summary(error: BaseException, limit: int | None = DEFAULT_LIMIT) -> str:
  """`TypeName: first line of the message`, the line cut at `limit` characters (None: not cut)."""
  first_line = str(error).split('\n', 1)[0]
  return f'{type(error).__name__}: {first_line[:limit]}'


def error_summary(error: BaseException, limit: int | None = DEFAULT_LIMIT) -> str:
  """One line for any error: the gRPC status in its chain if there is one, else the error itself."""
  rpc = find_rpc_error(error)
  return rpc_summary(rpc, limit) if rpc is not None else exception_summary(error, limit)

"""Client ids: the file-name-safe names of the clients a raw client key denotes.

A data owner's client key (a user id, an e-mail address, a device serial) is
kept as the client id when it is already a safe file name (see
`manifest.CLIENT_ID_PATTERN`); any other key is replaced by `k` followed by
the first 20 hex digits (80 bits) of its SHA-256. The mapping is
deterministic, so every split and every rerun names a client the same way.

Note that the id is not a secret: a kept key is the key itself, and a hashed
low-entropy key (a phone number) can be recovered by trying them all.

Where ids travel (`COHORT_SEPARATOR`, `SILO_SEPARATOR`): the cohort engine
sends a cohort of users as one value, their ids joined by ','; across silos
an id or a cohort is prefixed with its silo's name and '/'. Both the
computations that build such values and the silo's governance gate that
checks them read the separators here.
"""

from __future__ import annotations

import hashlib

from fedpipe.data import manifest

HASHED_ID_PREFIX = 'k'
HASHED_ID_HEX_DIGITS = 20

# The cohort engine's CLIENTS value names several users: their ids joined by
# this separator, which no client id contains (`manifest.CLIENT_ID_PATTERN`).
COHORT_SEPARATOR = ','
# Across silos a client is '<silo>/<client id>' and a cohort of one silo's
# users '<silo>/<id>,<id>,...': silo names contain no '/' either.
SILO_SEPARATOR = '/'


def client_id_for_key(client_key: str) -> str:
  """Returns the client id of a raw client key.

  Args:
    client_key: The client key as read from a record (not empty).

  Returns:
    `client_key` itself if it matches `manifest.CLIENT_ID_PATTERN`, otherwise
    `'k'` followed by the first 20 hex digits of the SHA-256 of its UTF-8
    encoding.

  Raises:
    ValueError: If `client_key` is empty.
  """
  if not client_key:
    raise ValueError('client_key is empty; records need a non-empty client key.')
  if manifest.is_valid_client_id(client_key):
    return client_key
  digest = hashlib.sha256(client_key.encode('utf-8', 'surrogatepass')).hexdigest()
  return HASHED_ID_PREFIX + digest[:HASHED_ID_HEX_DIGITS]


def cohort_members(value: str) -> list[str]:
  """The client ids one CLIENTS value names: a client id names itself, a cohort each of its users.

  Args:
    value: A client id, or a cohort: client ids joined by `COHORT_SEPARATOR`.

  Returns:
    The ids in order, repeats and empty ones ('' for 'a,,b' or a trailing
    separator) included, so that a caller checking them sees what was sent.
  """
  return value.split(COHORT_SEPARATOR)

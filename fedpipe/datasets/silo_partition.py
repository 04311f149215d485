"""Splits one raw dataset into several silos' raw datasets, by client key.

For demos, tests and benchmarks of the cross-silo runtime: each silo then
runs the preprocessing pipeline on its own files, as a real data owner would.
Clients are dealt to silos round-robin in sorted key order, so every silo
holds whole clients (all of a client's rows, in both splits).
"""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Sequence

from fedpipe.errors import FedpipeError


class SiloPartitionError(FedpipeError, ValueError):
  """The raw files cannot be split as asked."""


def _read(path: str) -> tuple[list[str], list[dict[str, str]]]:
  with open(path, newline='', encoding='utf-8') as f:
    reader = csv.DictReader(f)
    return list(reader.fieldnames or []), list(reader)


def partition_raw_csv(
  *,
  train_file: str,
  eval_file: str,
  feature_spec_file: str,
  client_key: str,
  silo_dirs: Sequence[str],
) -> list[dict[str, int]]:
  """Writes `train.csv`, `test.csv` and `feature_spec.json` into each silo dir.

  Args:
    train_file: Raw training CSV with a client key column.
    eval_file: Raw evaluation CSV with the same columns.
    feature_spec_file: The shared feature spec, copied to every silo.
    client_key: Name of the client key column.
    silo_dirs: One output directory per silo.

  Returns:
    Per silo, the number of clients and rows written per file.

  Raises:
    SiloPartitionError: If there are fewer clients than silos or the key
      column is missing.
  """
  header, train_rows = _read(train_file)
  eval_header, eval_rows = _read(eval_file)
  if client_key not in header or client_key not in eval_header:
    raise SiloPartitionError(f'column {client_key!r} missing in {train_file} or {eval_file}')
  keys = sorted({row[client_key] for row in train_rows})
  if len(keys) < len(silo_dirs):
    raise SiloPartitionError(f'{len(keys)} clients cannot fill {len(silo_dirs)} silos')
  silo_of = {key: i % len(silo_dirs) for i, key in enumerate(keys)}
  counts = []
  for i, silo_dir in enumerate(silo_dirs):
    os.makedirs(silo_dir, exist_ok=True)
    written = {'clients': sum(1 for s in silo_of.values() if s == i)}
    for name, rows, fields in (
      ('train.csv', train_rows, header),
      ('test.csv', eval_rows, eval_header),
    ):
      mine = [r for r in rows if silo_of.get(r[client_key]) == i]
      with open(os.path.join(silo_dir, name), 'w', newline='', encoding='utf-8') as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(mine)
      written[name] = len(mine)
    shutil.copyfile(feature_spec_file, os.path.join(silo_dir, 'feature_spec.json'))
    counts.append(written)
  return counts

"""Files replaced atomically: written under a temporary name next to their path, then renamed.

A reader (or a process that resumes after a crash) sees the old content or
the new, never a part: the new content goes to `<path>.tmp-<random>` in the
same directory and `os.replace` renames it onto `path`; on any failure the
temporary file is removed and `path` is left as it was. Each writer has its
own temporary name, so two writers of one path never write into each other.

`durable=True` also fsyncs the file before the rename and its directory after
it, so the new content survives a power loss once the call returns: for files
a later run depends on (keys, a run's secret seed, its config).

A directory written in full under another name (a client-data directory, a
generated dataset) is swapped into place with `replace_directory`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

# The mode a plain `open(path, 'w')` creates files with (before the umask).
DEFAULT_MODE = 0o666


def temp_path(path: str, suffix: str = '') -> str:
  """A temporary name for `path`'s new content, unique to this call, in `path`'s directory.

  Args:
    path: The file that will be replaced.
    suffix: Appended to the name, for writers that need an extension (a Keras
      model file must end with `.keras`).
  """
  return f'{path}.tmp-{uuid.uuid4().hex[:12]}{suffix}'


def _fsync_directory(path: str) -> None:
  fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


@contextlib.contextmanager
def replacing(path: str, *, suffix: str = '', durable: bool = False) -> Iterator[str]:
  """Yields a temporary path to write `path`'s new content to; renames it onto `path` after.

  For writers that take a path (`model.save(tmp)`). The temporary file is
  removed if the block raises, or if it did not create the file.

  Args:
    path: The file to replace (or create).
    suffix: See `temp_path`.
    durable: Fsync the written file and `path`'s directory.

  Yields:
    The temporary path.
  """
  tmp = temp_path(path, suffix)
  try:
    yield tmp
    if durable:
      fd = os.open(tmp, os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise
  if durable:
    _fsync_directory(path)


def write_bytes(path: str, data: bytes, *, mode: int = DEFAULT_MODE, durable: bool = False) -> str:
  """Replaces `path` with `data` atomically.

  Args:
    path: The file to replace (or create); its directory must exist.
    data: The new content.
    mode: Permission bits of the new file (the umask applies), e.g. 0o600
      for a secret.
    durable: Fsync the file and its directory (see the module docstring).

  Returns:
    `path`.

  Raises:
    OSError: If the file cannot be written; `path` is then unchanged.
  """
  with replacing(path) as tmp:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      if durable:
        f.flush()
        os.fsync(f.fileno())
  if durable:
    _fsync_directory(path)
  return path


def write_text(path: str, text: str, *, mode: int = DEFAULT_MODE, durable: bool = False) -> str:
  """Replaces `path` with `text` (UTF-8) atomically; see `write_bytes`."""
  return write_bytes(path, text.encode('utf-8'), mode=mode, durable=durable)


def json_text(value: Any, *, indent: int | None = 2, sort_keys: bool = False) -> str:
  """`value` as the JSON text `write_json` writes: indented, ending with a newline."""
  return json.dumps(value, indent=indent, sort_keys=sort_keys) + '\n'


def write_json(
  path: str,
  value: Any,
  *,
  indent: int | None = 2,
  sort_keys: bool = False,
  mode: int = DEFAULT_MODE,
  durable: bool = False,
) -> str:
  """Replaces `path` with `value` as JSON (`json_text`) atomically; see `write_bytes`."""
  return write_text(
    path, json_text(value, indent=indent, sort_keys=sort_keys), mode=mode, durable=durable
  )


def replace_directory(new_dir: str, target: str) -> None:
  """Renames the complete directory `new_dir` onto `target`, replacing what is there.

  POSIX cannot rename a directory onto a non-empty one, so an existing
  `target` is first renamed aside, to a hidden name unique to this call next
  to it (`.<name>.previous-<random>`), and renamed back if moving `new_dir`
  fails; once `new_dir` is in place the old one is deleted. A reader sees the
  old directory or the new one, never a mix, though `target` is missing
  between the two renames. Local filesystems only (`os.rename`).

  Args:
    new_dir: The new content, complete; on `target`'s filesystem (build it
      next to `target`).
    target: The directory to replace (or create); its parent must exist.

  Raises:
    OSError: If a rename fails; `target` is then as it was and `new_dir` is
      left for the caller to remove.
  """
  target = os.path.abspath(target)
  parent, name = os.path.split(target)
  previous = os.path.join(parent, f'.{name}.previous-{uuid.uuid4().hex[:12]}')
  had_previous = os.path.lexists(target)
  if had_previous:
    os.rename(target, previous)
  try:
    os.rename(new_dir, target)
  except BaseException:
    if had_previous:
      os.rename(previous, target)
    raise
  if had_previous:
    if os.path.isdir(previous) and not os.path.islink(previous):
      shutil.rmtree(previous, ignore_errors=True)
    else:
      with contextlib.suppress(OSError):
        os.remove(previous)

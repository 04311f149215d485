"""The output directory of a training run, and the rules for resuming into it.

    .lock               held by the run using the directory; names its pid
    run_config.json     the config the run was started with
    sampling_seed       the secret client-sampling seed (mode 0600)
    checkpoints/        program state, one version per saved round
    model.json          the model's architecture and the data's shape
    metrics.csv         one row per round
    tensorboard/        the same metrics for TensorBoard
    worker.log          the TFF worker's output
    model.keras, privacy_report.{json,txt}, training_curves.png   at the end

Rerunning the same command resumes. Rerunning with a config that changes the
mathematics of the run (anything but the fields in `_RESUMABLE_CHANGES`), or
with another model (`check_model`), is refused, since the checkpoints and the
privacy accounting would no longer describe one run.

One run at a time: `lock` takes an exclusive lock on `.lock` before anything
else is written, and a second run on the same directory is refused, naming
the first's pid. The kernel releases the lock when its holder exits, even on
`kill -9`, so a rerun after a crash never finds a stale lock.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import fcntl
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from typing import Any

from ml_collections import config_dict

from fedpipe.data import atomic_files
from fedpipe.errors import FedpipeError

LOCK_FILE = '.lock'
RUN_CONFIG = 'run_config.json'
MODEL_RECORD = 'model.json'
SAMPLING_SEED = 'sampling_seed'
_CHECKPOINT_PREFIX = 'program_state_'
# Fields added to the config since runs were first written, with the value
# that reproduces what older runs did: those runs resume.
_ADDED_FIELDS = {'model.builder': ''}
_RESUMABLE_CHANGES = (
  'training.rounds',
  'training.checkpoint_every',
  'training.keep_checkpoints',
  'training.eval_every',
  'runtime',
)


class RunDirectoryError(FedpipeError, RuntimeError):
  """The output directory cannot be used: not writable, held by another run, or not this run's."""


class RunDirectoryInUseError(RunDirectoryError):
  """Another process holds the run directory's lock."""


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f'{prefix}{k}.'))
    return out
  return {prefix[:-1]: tree}


def _comparable(config: config_dict.ConfigDict) -> dict[str, Any]:
  flat = _flatten(json.loads(config.to_json()))
  return {
    k: v
    for k, v in flat.items()
    if not any(k == p or k.startswith(p + '.') for p in _RESUMABLE_CHANGES)
  }


@dataclasses.dataclass(frozen=True)
class RunDirectory:
  """Paths of a run's outputs."""

  root: str

  @property
  def checkpoints(self) -> str:
    return os.path.join(self.root, 'checkpoints')

  @property
  def metrics_csv(self) -> str:
    return os.path.join(self.root, 'metrics.csv')

  @property
  def tensorboard(self) -> str:
    return os.path.join(self.root, 'tensorboard')

  @property
  def worker_log(self) -> str:
    return os.path.join(self.root, 'worker.log')

  @property
  def model(self) -> str:
    return os.path.join(self.root, 'model.keras')

  @property
  def model_weights(self) -> str:
    """The trained weights alone, written instead of `model` for a model Keras cannot save."""
    return os.path.join(self.root, 'model.weights.h5')

  def has_checkpoints(self) -> bool:
    return self.last_checkpoint() > 0

  def last_checkpoint(self) -> int:
    """The last round whose training state is saved (0: none), from the file names alone."""
    if not os.path.isdir(self.checkpoints):
      return 0
    rounds = [0]
    for name in os.listdir(self.checkpoints):
      suffix = name[len(_CHECKPOINT_PREFIX) :] if name.startswith(_CHECKPOINT_PREFIX) else ''
      if suffix.isdigit():
        rounds.append(int(suffix))
    return max(rounds)

  def read_metrics(self) -> list[dict[str, float]]:
    """The rows of `metrics.csv`: {'round': n, <metric>: value, ...}; empty cells left out."""
    try:
      with open(self.metrics_csv, newline='', encoding='utf-8') as f:
        rows = list(csv.DictReader(f))
    except FileNotFoundError:
      return []
    metrics = []
    for row in rows:
      values: dict[str, float] = {'round': int(float(row.pop('key')))}
      values.update({k: float(v) for k, v in row.items() if k and v not in (None, '')})
      metrics.append(values)
    return sorted(metrics, key=lambda m: m['round'])


def _entries(root: str) -> list[str]:
  """The names in `root` other than the lock file; [] if `root` does not exist."""
  if not os.path.isdir(root):
    return []
  return [name for name in os.listdir(root) if name != LOCK_FILE]


def _foreign_directory_error(root: str) -> RunDirectoryError:
  return RunDirectoryError(
    f'{root} is not empty and is not a fedpipe run directory; choose another --output_dir.'
  )


def _file_on_the_way(path: str) -> str | None:
  """The first of `path` and its ancestors that exists and is not a directory."""
  parts = []
  head = path
  while head and head != os.path.dirname(head):
    parts.append(head)
    head = os.path.dirname(head)
  for candidate in reversed(parts):
    if os.path.lexists(candidate) and not os.path.isdir(candidate):
      return candidate
  return None


def _make_writable_directory(root: str) -> None:
  """Creates `root` if needed; raises RunDirectoryError unless it is a writable directory."""
  blocker = _file_on_the_way(root)
  if blocker == root:
    raise RunDirectoryError(
      f'{root} is a file, not a directory; give --output_dir the path of a new or '
      'existing run directory.'
    )
  if blocker is not None:
    raise RunDirectoryError(
      f'cannot create the run directory {root}: {blocker} is a file, not a directory; '
      'give an --output_dir whose parent directories can be created.'
    )
  try:
    os.makedirs(root, exist_ok=True)
  except OSError as e:
    raise RunDirectoryError(
      f'cannot create the run directory {root}: {e.strerror or e}; give an --output_dir '
      'in a directory you can write to.'
    ) from e
  if not os.access(root, os.W_OK | os.X_OK):
    raise RunDirectoryError(
      f'the run directory {root} is not writable by this user; give an --output_dir '
      'you can write to, or change its permissions.'
    )


def _holder_pid(fd: int) -> int | None:
  """The pid the lock's holder wrote, or None if it has not written one yet."""
  for _ in range(10):
    text = os.pread(fd, 32, 0).decode('ascii', 'replace').strip()
    if text.isdigit():
      return int(text)
    time.sleep(0.05)  # The holder writes its pid right after locking.
  return None


@contextlib.contextmanager
def lock(output_dir: str) -> Iterator[str]:
  """Holds the run directory's lock: one run (or study submission) per directory.

  Creates the directory if needed, then takes an exclusive `flock` on
  `<output_dir>/.lock` and writes this process's pid into it. Nothing else
  is written before the lock is held. The kernel releases the lock when the
  process exits, however it exits; a normal exit also empties the file.

  Args:
    output_dir: The run's directory.

  Yields:
    The absolute path of the run directory.

  Raises:
    RunDirectoryInUseError: If another process holds the lock; the message
      names its pid.
    RunDirectoryError: If `output_dir` is a file, cannot be created or
      written, or is a non-empty directory that is not a fedpipe run.
  """
  root = os.path.abspath(output_dir)
  _make_writable_directory(root)
  if _entries(root) and not os.path.exists(os.path.join(root, RUN_CONFIG)):
    raise _foreign_directory_error(root)
  path = os.path.join(root, LOCK_FILE)
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
  except OSError as e:
    raise RunDirectoryError(
      f'cannot create the lock file {path}: {e.strerror or e}; give an --output_dir you '
      'can write to.'
    ) from e
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise RunDirectoryError(
          f'cannot lock {path}: {e.strerror or e}; give an --output_dir on a local filesystem.'
        ) from e
      pid = _holder_pid(fd)
      holder = f'pid {pid}' if pid is not None else 'a process that has just started'
      raise RunDirectoryInUseError(
        f'{root} is in use by another run ({holder}); wait for it to end or stop it, '
        'or give another --output_dir.'
      ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'{os.getpid()}\n'.encode('ascii'), 0)
    try:
      yield root
    finally:
      os.ftruncate(fd, 0)
  finally:
    os.close(fd)


def prepare(
  output_dir: str, config: config_dict.ConfigDict, *, overwrite: bool = False
) -> RunDirectory:
  """Creates the directory, or checks that `config` may resume the run in it.

  Args:
    output_dir: The run's directory.
    config: The validated config of this invocation.
    overwrite: Delete a previous run in `output_dir` and start afresh.

  Returns:
    The `RunDirectory`.

  Raises:
    RunDirectoryError: If `output_dir` holds a different run, or files that
      are not a fedpipe run, or cannot be created or written.
  """
  run = RunDirectory(os.path.abspath(output_dir))
  config_path = os.path.join(run.root, RUN_CONFIG)
  if os.path.exists(run.root) and overwrite:
    if _entries(run.root) and not os.path.exists(config_path):
      raise RunDirectoryError(
        f'{run.root} is not empty and is not a fedpipe run directory; refusing '
        'to delete it. Choose another --output_dir.'
      )
    # The lock file stays: a run waiting on it must keep seeing this run's lock.
    for name in _entries(run.root):
      path = os.path.join(run.root, name)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
      else:
        os.remove(path)
  if os.path.exists(config_path):
    with open(config_path, encoding='utf-8') as f:
      previous = _flatten(json.load(f))
    previous = {
      k: v
      for k, v in {**_ADDED_FIELDS, **previous}.items()
      if not any(k == p or k.startswith(p + '.') for p in _RESUMABLE_CHANGES)
    }
    current = _comparable(config)
    changed = sorted(
      k for k in previous.keys() | current.keys() if previous.get(k) != current.get(k)
    )
    if changed:
      details = ', '.join(
        f'config.{k}: {previous.get(k)!r} -> {current.get(k)!r}' for k in changed[:8]
      )
      raise RunDirectoryError(
        f'{run.root} holds a run with a different config ({details}); it '
        'cannot be resumed with this one. Use another --output_dir, or '
        '--overwrite to discard that run.'
      )
  elif _entries(run.root):
    raise _foreign_directory_error(run.root)
  _make_writable_directory(run.root)
  atomic_files.write_text(
    config_path, config.to_json(indent=2, sort_keys=True) + '\n', durable=True
  )
  return run


def remove_unstarted(root: str) -> None:
  """Deletes the run directory `root` if it holds no checkpoint: a run that never trained.

  For a run that this process created and that failed before its first
  round, so that it writes nothing. Call it after releasing the lock.
  """
  run = RunDirectory(os.path.abspath(root))
  if os.path.isdir(run.root) and not os.path.islink(run.root) and not run.has_checkpoints():
    shutil.rmtree(run.root, ignore_errors=True)


def read_model_record(run: RunDirectory) -> dict[str, Any] | None:
  """What `check_model` recorded: num_features, num_classes, architecture (label_task); None if nothing."""
  try:
    with open(os.path.join(run.root, MODEL_RECORD), encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def check_model(
  run: RunDirectory,
  *,
  architecture: str,
  num_features: int,
  num_classes: int,
  label_task: str = 'multiclass',
) -> None:
  """Records the run's model, or checks that a resumed run trains the same one.

  Args:
    run: The run directory.
    architecture: Identifies the model (`keras_model.architecture`).
    num_features: Input width of the client data.
    num_classes: Number of classes in the client data.
    label_task: The client data's label task; recorded unless 'multiclass'
      (what a record without it means), so records of earlier runs match.

  Raises:
    RunDirectoryError: If the directory holds a run of a different model.
  """
  record = {'num_features': num_features, 'num_classes': num_classes, 'architecture': architecture}
  if label_task != 'multiclass':
    record['label_task'] = label_task
  previous = read_model_record(run)
  if previous is not None and previous != record:
    changed = [k for k in {**previous, **record} if previous.get(k) != record.get(k)]
    raise RunDirectoryError(
      f'{run.root} holds a run of a different model ({", ".join(changed)} changed); it '
      'cannot be resumed with this one. Use another output directory, or overwrite to '
      'discard that run.'
    )
  if previous is None:
    atomic_files.write_json(os.path.join(run.root, MODEL_RECORD), record, sort_keys=True)


def sampling_seed(run: RunDirectory, configured: int | None) -> tuple[int, bool]:
  """The run's client-sampling seed and whether it is secret.

  A configured seed is used as is (reproducible, but public). Otherwise a
  random 63-bit seed is made on the first invocation and kept, readable only
  by the owner, so that a resumed run samples as the original would have.
  """
  if configured is not None:
    return int(configured), False
  path = os.path.join(run.root, SAMPLING_SEED)
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      return int(f.read().strip()), True
  seed = secrets.randbits(63)
  atomic_files.write_text(path, f'{seed}\n', mode=0o600, durable=True)
  return seed, True

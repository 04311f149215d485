"""The output directory of a training run, and the rules for resuming into it.

    run_config.json     the config the run was started with
    sampling_seed       the secret client-sampling seed (mode 0600)
    checkpoints/        program state, one version per saved round
    metrics.csv         one row per round
    tensorboard/        the same metrics for TensorBoard
    worker.log          the TFF worker's output
    model.keras, privacy_report.{json,txt}, training_curves.png   at the end

Rerunning the same command resumes. Rerunning with a config that changes the
mathematics of the run (anything but the fields in `_RESUMABLE_CHANGES`) is
refused, since the checkpoints and the privacy accounting would no longer
describe one run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
from typing import Any, Optional

from ml_collections import config_dict

RUN_CONFIG = 'run_config.json'
SAMPLING_SEED = 'sampling_seed'
_RESUMABLE_CHANGES = (
    'training.rounds',
    'training.checkpoint_every',
    'training.keep_checkpoints',
    'training.eval_every',
    'runtime',
)


class RunDirectoryError(RuntimeError):
  """The output directory holds something this run must not resume or overwrite."""


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
      k: v for k, v in flat.items()
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

  def has_checkpoints(self) -> bool:
    return os.path.isdir(self.checkpoints) and any(
        name.startswith('program_state_') and '_temp' not in name
        for name in os.listdir(self.checkpoints)
    )


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
      are not a fedpipe run.
  """
  run = RunDirectory(os.path.abspath(output_dir))
  config_path = os.path.join(run.root, RUN_CONFIG)
  if os.path.exists(run.root) and overwrite:
    if os.listdir(run.root) and not os.path.exists(config_path):
      raise RunDirectoryError(
          f'{run.root} is not empty and is not a fedpipe run directory; refusing '
          'to delete it. Choose another --output_dir.'
      )
    shutil.rmtree(run.root)
  if os.path.exists(config_path):
    with open(config_path, encoding='utf-8') as f:
      previous = _flatten(json.load(f))
    previous = {
        k: v for k, v in previous.items()
        if not any(k == p or k.startswith(p + '.') for p in _RESUMABLE_CHANGES)
    }
    current = _comparable(config)
    changed = sorted(k for k in previous.keys() | current.keys()
                     if previous.get(k) != current.get(k))
    if changed:
      details = ', '.join(
          f'config.{k}: {previous.get(k)!r} -> {current.get(k)!r}' for k in changed[:8]
      )
      raise RunDirectoryError(
          f'{run.root} holds a run with a different config ({details}); it '
          'cannot be resumed with this one. Use another --output_dir, or '
          '--overwrite to discard that run.'
      )
  elif os.path.isdir(run.root) and os.listdir(run.root):
    raise RunDirectoryError(
        f'{run.root} is not empty and is not a fedpipe run directory; choose '
        'another --output_dir.'
    )
  os.makedirs(run.root, exist_ok=True)
  tmp = f'{config_path}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(config.to_json(indent=2, sort_keys=True) + '\n')
  os.replace(tmp, config_path)
  return run


def sampling_seed(run: RunDirectory, configured: Optional[int]) -> tuple[int, bool]:
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
  fd = os.open(f'{path}.tmp', os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
  with os.fdopen(fd, 'w') as f:
    f.write(f'{seed}\n')
  os.replace(f'{path}.tmp', path)
  return seed, True

"""Federated training as one call: the library a notebook uses, and `fedpipe-train` runs.

    import tensorflow as tf
    from fedpipe.training import federated_training

    def make_model():  # Your own model: uncompiled, 64 features in, 10 logits out.
      return tf.keras.Sequential([
        tf.keras.Input(shape=(64,)),
        tf.keras.layers.Dense(32, activation='relu'),
        tf.keras.layers.Dense(10),
      ])

    result = federated_training.train(make_model, 'data/digits/clients', training__rounds=20)
    result.model.predict(features)   # The trained global model.
    result.privacy.epsilon           # And what it cost: (ε, δ) at the client level.

`data` is a directory of preprocessed client data (`fedpipe-preprocess`'s
output, trained on an isolated local TFF worker), or a federation of silos
from `fedpipe.connect(...)` (trained across them over mutual TLS, each silo's
data staying in the silo). Training is user-level DP-FedAvg unless the config
says otherwise (`fedpipe.config.base.get_default_config()`); single fields
change with keyword arguments, `__` standing for the config's dots:
`dp__noise_multiplier=1.0`, `training__clients_per_round=20`, `name='try1'`.

A run lives in its output directory exactly as a `fedpipe-train` run does
(one run at a time, checkpoints, metrics.csv, TensorBoard, the privacy report,
model.keras): calling `train` again with the same directory resumes it, or
returns its result if it is complete. `train` works inside a running event
loop (a Jupyter cell) as outside one.

It shows progress only (a bar in Jupyter, one line per round elsewhere, or
your own `progress` callback). The rest of what a run says (its DP plan, the
silos, study approvals, resuming) goes to the `fedpipe` logger: warnings
appear as Python shows warnings, the rest with
`logging.getLogger('fedpipe').setLevel(logging.INFO)` and a handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import html
import logging
import os
import queue
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import tensorflow as tf
from ml_collections import config_dict

from fedpipe.computations import keras_model
from fedpipe.config import base, validation
from fedpipe.errors import FedpipeError
from fedpipe.training import loop as training_loop
from fedpipe.training import privacy_report, program

TrainResult = program.TrainResult
RoundProgress = training_loop.RoundProgress
PrivacyReport = privacy_report.PrivacyReport
ModelFn = Callable[[], tf.keras.Model]
ProgressCallback = Callable[[RoundProgress], None]

__all__ = [
  'NotebookProgress',
  'PrivacyReport',
  'RoundProgress',
  'TrainResult',
  'TrainingDataError',
  'default_progress',
  'make_config',
  'print_progress',
  'train',
]


class TrainingDataError(FedpipeError, TypeError):
  """`train` was given something it cannot train on as `data`."""


class _Federation(Protocol):
  """What `train` uses of a federation from `fedpipe.connect(...)`."""

  silos_spec: str
  tls: Any  # Has .ca, .cert, .key: the coordinator's mutual-TLS files.


def train(
  model_fn: ModelFn | None,
  data: str | os.PathLike | _Federation | None,
  *,
  config: config_dict.ConfigDict | None = None,
  output_dir: str | os.PathLike | None = None,
  progress: ProgressCallback | None = None,
  overwrite: bool = False,
  **overrides: Any,
) -> TrainResult:
  """Trains `model_fn`'s model on `data` with federated averaging, by default with user-level DP.

  Args:
    model_fn: A zero-argument function returning a new, uncompiled
      `tf.keras.Model` that takes the data's `num_features` floats and
      outputs `num_classes` logits (or probabilities from a final softmax);
      for data whose label task is 'binary' one logit, for 'regression' one
      value (the manifest's `label_task` sets the loss and metrics).
      It is called several times (TFF builds the model inside its
      computations), so it must build a new model each time. None: the model
      that `config.model.builder` names (default the bundled MLP).
    data: The directory of preprocessed client data (with manifest.json), or
      a federation from `fedpipe.connect(...)` (anything with `silos_spec`,
      the '[name=]host:port,...' of its silos, and `tls`, the coordinator's
      mutual-TLS files `.ca`, `.cert`, `.key`). None: as the config says
      (`data.processed_dir`, or `runtime.mode=silos` and its fields).
    config: An experiment config (ml_collections `ConfigDict`, e.g. a
      `configs/<name>.py`'s `get_config()`); it is copied, not changed.
      None: `fedpipe.config.base.get_default_config()`.
    output_dir: The run directory. An existing run there with the same config
      and model resumes from its last checkpoint, or if complete is returned
      as it is. None: a new temporary directory.
    progress: Called with a `RoundProgress` after each round, on the calling
      thread; an exception it raises stops training after that round, its
      checkpoint saved. None: `default_progress()` (a bar in Jupyter, one line
      per round elsewhere); `lambda p: None` for silence.
    overwrite: Discard a previous run in `output_dir` instead of resuming it.
    **overrides: Config fields to set, `__` standing for the dots
      (`training__rounds=5` sets `config.training.rounds`); applied last.

  Returns:
    The `TrainResult`: the trained Keras model, per-round metrics, the
    privacy report, the final evaluation and the run directory.

  Raises:
    fedpipe.config.validation.ConfigError: Naming each invalid field or
      override, or a `config.model.builder` that cannot be loaded.
    TrainingDataError: If `data` is neither a directory nor a federation.
    fedpipe.computations.keras_model.ModelMismatchError: If the model does
      not fit the data (naming the shapes it must have) or is compiled.
    fedpipe.errors.FedpipeError: For any other problem the user can fix (the
      data, the run directory, a silo, a failed round: the last checkpoint
      stays, and calling `train` again resumes).
    KeyboardInterrupt: If interrupted; inside an event loop, training stops
      after the round in progress, its checkpoint saved.
  """
  config = make_config(model_fn, data, config=config, overrides=overrides)
  if output_dir is None:
    output_dir = tempfile.mkdtemp(prefix=f'fedpipe-{config.name}-')
  run = functools.partial(
    program.execute,
    config,
    os.fspath(output_dir),
    keras_model_builder=model_fn,
    overwrite=overwrite,
  )
  report = progress if progress is not None else default_progress()
  with _tensorflow_logs_quiet():
    if _event_loop_running():
      # asyncio.run (in program.execute) refuses to run inside a running loop.
      return _run_on_own_thread(run, report)
    return run(on_round=report)


def make_config(
  model_fn: ModelFn | None,
  data: str | os.PathLike | _Federation | None,
  *,
  config: config_dict.ConfigDict | None = None,
  overrides: dict[str, Any] | None = None,
) -> config_dict.ConfigDict:
  """The validated config `train` runs: a copy of `config` with `data` and `overrides` applied.

  Args:
    model_fn: As for `train` (checked to be callable; with a model_fn the
      config must not name a `model.builder` as well).
    data: As for `train`.
    config: As for `train`.
    overrides: As `train`'s keyword arguments.

  Returns:
    A new, validated config.

  Raises:
    fedpipe.config.validation.ConfigError: Naming each invalid field.
    TrainingDataError: If `data` is neither a directory nor a federation.
    fedpipe.computations.keras_model.ModelMismatchError: If `model_fn` is not
      callable.
  """
  if model_fn is not None and not callable(model_fn):
    raise keras_model.ModelMismatchError(
      f'model_fn: got {type(model_fn).__name__}; pass a zero-argument function that returns '
      'a new, uncompiled tf.keras.Model (or None for config.model.builder)'
    )
  if config is None:
    config = base.get_default_config()
  elif isinstance(config, config_dict.FrozenConfigDict):
    config = config.as_configdict()
  elif isinstance(config, config_dict.ConfigDict):
    config = copy.deepcopy(config)
  else:
    raise validation.ConfigError(
      [
        f'config: got {type(config).__name__}; pass an ml_collections ConfigDict (start from '
        'fedpipe.config.base.get_default_config()), or None for that default'
      ]
    )
  _bind_data(config, data)
  problems = []  # All at once, as validation reports them.
  try:
    validation.apply_overrides(config, overrides or {})
  except validation.ConfigError as e:
    problems.extend(e.problems)
  if model_fn is not None and config.model.builder:
    problems.append(
      f'config.model.builder: is {config.model.builder!r} and a model_fn was given too; '
      "pass one of them (model_fn=None, or model__builder='')"
    )
  try:
    validation.validate(config)
  except validation.ConfigError as e:
    problems.extend(e.problems)
  if problems:
    raise validation.ConfigError(problems)
  return config


def _bind_data(config: config_dict.ConfigDict, data: Any) -> None:
  if data is None:
    return
  if isinstance(data, (str, os.PathLike)):
    config.data.processed_dir = os.fspath(data)
    config.runtime.mode = 'local'
    return
  silos = getattr(data, 'silos_spec', None)
  tls = getattr(data, 'tls', None)
  if isinstance(silos, str) and all(hasattr(tls, f) for f in ('ca', 'cert', 'key')):
    runtime = config.runtime
    runtime.mode = 'silos'
    runtime.silos = silos
    runtime.tls_ca = os.fspath(tls.ca)
    runtime.tls_cert = os.fspath(tls.cert)
    runtime.tls_key = os.fspath(tls.key)
    return
  raise TrainingDataError(
    f'data: got {type(data).__name__}; pass the directory of preprocessed client data '
    '(the output of fedpipe-preprocess, with manifest.json) or a federation from '
    'fedpipe.connect(silos, tls)'
  )


def print_progress(progress: RoundProgress) -> None:
  """Prints one line for the round (`training_loop.format_progress`), as `fedpipe-train` does."""
  print(training_loop.format_progress(progress), flush=True)


class NotebookProgress:
  """A progress bar in a Jupyter output, updated in place: round k of n and the latest metrics.

  One instance draws one bar; `default_progress` makes a new one per call
  of `train`.
  """

  def __init__(self) -> None:
    self._handle: Any = None

  def __call__(self, progress: RoundProgress) -> None:
    from IPython import display  # Only ever called inside a Jupyter kernel.

    content = display.HTML(self.html(progress))
    if self._handle is None:
      self._handle = display.display(content, display_id=True)
    else:
      self._handle.update(content)

  @staticmethod
  def html(progress: RoundProgress) -> str:
    """The bar and the round's metrics as HTML."""
    m = progress.metrics
    parts = [f'round {progress.round}/{progress.rounds}']
    # loss and the model's metrics (accuracy; auc; mae, rmse), then the evaluation's.
    for key, value in m.items():
      if key.startswith('train_') and key != 'train_examples':
        parts.append(f'{key[len("train_") :]} {value:.4f}')
    for key, value in m.items():
      if key.startswith('eval_') and key != 'eval_loss':
        parts.append(f'eval {key[len("eval_") :]} {value:.4f}')
    if progress.epsilon is not None:
      parts.append(f'ε {progress.epsilon:.3f}')
    if 'round_seconds' in m:
      parts.append(f'{m["round_seconds"]:.2f} s/round')
    return (
      f'<div><progress value="{progress.round}" max="{progress.rounds}" '
      'style="width: 24em; vertical-align: middle"></progress> '
      f'<code>{html.escape("   ".join(parts))}</code></div>'
    )


def default_progress() -> ProgressCallback:
  """A `NotebookProgress` inside a Jupyter kernel, else `print_progress` (one line per round)."""
  return NotebookProgress() if _in_jupyter() else print_progress


def _in_jupyter() -> bool:
  ipython = sys.modules.get('IPython')  # Not imported: not in IPython.
  shell = ipython.get_ipython() if ipython is not None else None
  return shell is not None and hasattr(shell, 'kernel')


@contextlib.contextmanager
def _tensorflow_logs_quiet() -> Iterator[None]:
  """Keeps TensorFlow's INFO and WARNING lines (checkpoint assets, deprecations) out of the call's output."""
  logger = tf.get_logger()
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def _event_loop_running() -> bool:
  try:
    asyncio.get_running_loop()
  except RuntimeError:
    return False
  return True


def _run_on_own_thread(run: Callable[..., TrainResult], progress: ProgressCallback) -> TrainResult:
  """Runs `run` on a new thread (no event loop there); `progress` runs on this one.

  If this thread is interrupted (KeyboardInterrupt: a notebook's stop
  button) or `progress` raises, training stops after the round in progress,
  its checkpoint saved, and the exception is raised here once it has.
  """
  rounds: queue.Queue[RoundProgress] = queue.Queue()
  stop = threading.Event()
  outcome: dict[str, Any] = {}

  def on_round(p: RoundProgress) -> None:
    rounds.put(p)
    if stop.is_set():
      raise KeyboardInterrupt

  def target() -> None:
    try:
      outcome['result'] = run(on_round=on_round)
    except BaseException as e:  # Handed to the caller's thread.
      outcome['error'] = e

  thread = threading.Thread(target=target, name='fedpipe-train')
  thread.start()
  try:
    while thread.is_alive() or not rounds.empty():
      try:
        p = rounds.get(timeout=0.1)
      except queue.Empty:
        continue
      progress(p)
  except BaseException:
    stop.set()
    thread.join()  # The round in progress ends and is saved; a second interrupt stops waiting.
    raise
  thread.join()
  if 'error' in outcome:
    raise outcome['error']
  return outcome['result']

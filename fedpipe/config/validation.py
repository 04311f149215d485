"""Checks an experiment config once, at the program's edge.

Every problem is reported with the field's full name, the value found and
what is allowed, all at once, so a user fixes a config in one pass.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ml_collections import config_dict

from fedpipe.errors import FedpipeError

SOURCES = ('sklearn:digits', 'sklearn:breast_cancer', 'sklearn:wine', 'synthetic_credit', 'none')
# What a `model.builder` function is called with: the first two always, the
# others if its signature takes them (by name, or with **kwargs). num_outputs
# is the output width the label task needs (num_classes for 'multiclass', 1
# for 'binary' and 'regression'); feature_spec the client data's
# `fedpipe.pipelines.feature_spec.FeatureSpec` (None if the manifest has no
# valid one), whose `input_layout()` says where each column sits in x.
# activation and center_inputs are config.model's, as the bundled MLP takes them.
MODEL_BUILDER_ARGUMENTS = (
  'num_features',
  'num_classes',
  'hidden_units',
  'seed',
  'num_outputs',
  'feature_spec',
  'activation',
  'center_inputs',
)
# config.model.activation: the bundled MLP's (keras_model.ACTIVATIONS, which
# this layer cannot import; a test keeps the two equal).
MLP_ACTIVATIONS = ('relu', 'tanh', 'elu', 'sigmoid')
_REQUIRED_BUILDER_ARGUMENTS = MODEL_BUILDER_ARGUMENTS[:2]


class ConfigError(FedpipeError, ValueError):
  """One or more config fields are invalid; the message names each."""

  def __init__(self, problems: Iterable[str]):
    self.problems = list(problems)
    super().__init__('invalid config:\n' + '\n'.join(f'  - {p}' for p in self.problems))


def _builder_problem(spec: str, what: str) -> str:
  return (
    f"config.model.builder: got {spec!r}; {what}. Give 'module:function' naming a function "
    "that returns a new tf.keras.Model, or '' for the bundled MLP"
  )


def load_model_builder(spec: str) -> Callable[..., Any]:
  """The function that `config.model.builder` ('module:function') names.

  Args:
    spec: 'module:function', where module is importable (installed, or on
      PYTHONPATH) and function may be a dotted attribute path in it.

  Returns:
    The function. It is called with keyword arguments
    `MODEL_BUILDER_ARGUMENTS` (those its signature takes).

  Raises:
    ConfigError: If `spec` is malformed, the module cannot be imported, it
      has no such function, or the function cannot take `num_features` and
      `num_classes` as keyword arguments; the message names
      `config.model.builder` and the fix.
  """
  module_name, sep, attribute = spec.partition(':')
  if not sep or not module_name or not attribute:
    raise ConfigError([_builder_problem(spec, "it is not of the form 'module:function'")])
  try:
    target: Any = importlib.import_module(module_name)
  except Exception as e:  # An import runs the module's code: any error means "unusable".
    raise ConfigError(
      [
        _builder_problem(
          spec,
          f'module {module_name!r} cannot be imported ({type(e).__name__}: {e}); install it '
          'or put its directory on PYTHONPATH',
        )
      ]
    ) from e
  for part in attribute.split('.'):
    if not hasattr(target, part):
      raise ConfigError(
        [_builder_problem(spec, f'module {module_name!r} has no attribute {attribute!r}')]
      )
    target = getattr(target, part)
  if not callable(target):
    raise ConfigError(
      [_builder_problem(spec, f'{attribute!r} is a {type(target).__name__}, not a function')]
    )
  try:
    parameters = inspect.signature(target).parameters.values()
  except (TypeError, ValueError):
    return target  # No introspectable signature: calling it will tell.
  if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
    names = {
      p.name
      for p in parameters
      if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    missing = [a for a in _REQUIRED_BUILDER_ARGUMENTS if a not in names]
    if missing:
      raise ConfigError(
        [
          _builder_problem(
            spec,
            f'{attribute} does not take the keyword argument(s) {", ".join(missing)}; it is '
            'called with num_features and num_classes (and hidden_units, seed, num_outputs '
            'and feature_spec if it takes them)',
          )
        ]
      )
  return target


def apply_overrides(config: config_dict.ConfigDict, overrides: Mapping[str, Any]) -> None:
  """Sets single fields of `config` from keyword arguments, `__` standing for the dots.

  `{'training__rounds': 5, 'name': 'try1'}` sets `config.training.rounds`
  and `config.name`: the `--config.training.rounds=5` of the programs, as
  Python keyword arguments.

  Args:
    config: The config to change in place.
    overrides: Field paths with `__` for `.`, and their new values.

  Raises:
    ConfigError: Naming each key that is not a field (with the full key when
      a field of that name exists in one section), that names a whole
      section, or whose value has the wrong type.
  """
  problems = []
  for key, value in overrides.items():
    path = key.replace('__', '.')
    parts = path.split('.')
    node: Any = config
    try:
      for part in parts[:-1]:
        node = node[part]
      if not isinstance(node, config_dict.ConfigDict) or parts[-1] not in node:
        raise KeyError(path)
    except (KeyError, TypeError):
      problems.append(_unknown_field(config, key))
      continue
    if isinstance(node[parts[-1]], config_dict.ConfigDict):
      fields = ', '.join(f'{key}__{name}' for name in sorted(node[parts[-1]].keys())[:3])
      problems.append(f'config.{path}: is a section; set its fields ({fields}, ...)')
      continue
    try:
      node[parts[-1]] = value
    except (TypeError, ValueError):
      wanted = node.get_type(parts[-1])
      problems.append(
        f'config.{path} ({key}=): got {value!r} ({type(value).__name__}); the field takes '
        f'{wanted.__name__} values'
      )
  if problems:
    raise ConfigError(problems)


def _unknown_field(config: config_dict.ConfigDict, key: str) -> str:
  leaf = key.split('__')[-1]
  matches = [
    f'{section}__{leaf}'
    for section, value in config.items()
    if isinstance(value, config_dict.ConfigDict) and leaf in value
  ]
  hint = f'; did you mean {" or ".join(matches)}?' if matches else ''
  return (
    f'{key}: the config has no field config.{key.replace("__", ".")}{hint} '
    '(keyword arguments name fields as section__field, e.g. training__rounds=5)'
  )


def _get(config: config_dict.ConfigDict, path: str) -> Any:
  node = config
  for part in path.split('.'):
    node = node[part]
  return node


class _Checker:
  """Collects problems as `config.<path>: <what is wrong>` lines."""

  def __init__(self, config: config_dict.ConfigDict):
    self._config = config
    self.problems: list[str] = []

  def value(self, path: str) -> Any:
    try:
      return _get(self._config, path)
    except (KeyError, AttributeError):
      self.problems.append(
        f'config.{path}: missing (start from fedpipe.config.base.get_base_config())'
      )
      return None

  def check(self, path: str, ok: Callable[[Any], bool], allowed: str) -> Any:
    value = self.value(path)
    if value is None:
      if not any(p.startswith(f'config.{path}:') for p in self.problems):
        self.problems.append(f'config.{path}: is None; must be {allowed}')
      return None
    try:
      good = ok(value)
    except (TypeError, ValueError):
      good = False
    if not good:
      self.problems.append(f'config.{path}: got {value!r}; must be {allowed}')
    return value if good else None

  def one_of(self, path: str, choices: tuple[str, ...]) -> Any:
    return self.check(path, lambda v: v in choices, f'one of {", ".join(choices)}')

  def integer(self, path: str, minimum: int) -> Any:
    return self.check(
      path,
      lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum,
      f'an integer >= {minimum}',
    )

  def number(
    self,
    path: str,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
  ) -> Any:
    def ok(v):
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return False
      return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    lo = '(' if low_open else '['
    hi = ')' if high_open else ']'
    return self.check(path, ok, f'a number in {lo}{low:g}, {high:g}{hi}')

  def text(self, path: str) -> Any:
    return self.check(path, lambda v: isinstance(v, str) and bool(v), 'a non-empty string')

  def add(self, problem: str) -> None:
    self.problems.append(problem)


def validate(config: config_dict.ConfigDict) -> config_dict.ConfigDict:
  """Returns `config` unchanged if it is valid.

  Raises:
    ConfigError: Listing every invalid field.
  """
  c = _Checker(config)
  c.text('name')
  c.integer('seed', 0)

  source = c.one_of('data.source', SOURCES)
  c.one_of('data.raw_format', ('csv', 'jsonl'))
  if source != 'none':
    c.text('data.raw_dir')
    c.integer('data.num_clients', 1)
    c.one_of('data.partition', ('iid', 'dirichlet'))
    c.number('data.dirichlet_alpha', low=0, low_open=True)
    c.number('data.test_fraction', low=0, high=1, low_open=True, high_open=True)
  c.text('data.train_files')
  eval_files = c.value('data.eval_files')
  if eval_files is not None and not isinstance(eval_files, str):
    c.add(f'config.data.eval_files: got {eval_files!r}; must be a file pattern or None')
  c.text('data.feature_spec')
  c.text('data.processed_dir')
  c.integer('data.min_examples_per_client', 1)
  c.number('data.max_malformed_fraction', low=0, high=1)
  c.integer('data.statistics.max_rows_per_user', 1)
  c.integer('data.statistics.histogram_bins', 1)
  c.number('data.statistics.noise_multiplier', low=0)

  builder = c.value('model.builder')
  if builder is not None and not isinstance(builder, str):
    c.add(_builder_problem(builder, 'it must be a string'))
  elif builder:
    try:
      load_model_builder(builder)
    except ConfigError as e:
      c.problems.extend(e.problems)
  hidden = c.value('model.hidden_units')
  if hidden is not None and (
    not isinstance(hidden, (tuple, list))
    or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden)
  ):
    c.add(f'config.model.hidden_units: got {hidden!r}; must be a tuple of positive integers')
  c.one_of('model.activation', MLP_ACTIVATIONS)
  c.check('model.center_inputs', lambda v: isinstance(v, bool), 'true or false')

  c.integer('training.rounds', 1)
  c.integer('training.clients_per_round', 1)
  sampling = c.one_of('training.sampling', ('poisson', 'fixed_size'))
  seed = c.value('training.sampling_seed')
  if seed is not None and (not isinstance(seed, int) or seed < 0):
    c.add(f'config.training.sampling_seed: got {seed!r}; must be None or an integer >= 0')
  c.integer('training.local_epochs', 1)
  c.integer('training.batch_size', 1)
  c.number('training.client_learning_rate', low=0, low_open=True)
  c.one_of('training.server_optimizer', ('sgdm', 'adam'))
  c.number('training.server_learning_rate', low=0, low_open=True)
  c.number('training.server_momentum', low=0, high=1, high_open=True)
  c.one_of('training.server_lr_schedule', ('constant', 'cosine'))
  c.number('training.server_lr_final_fraction', low=0, high=1)
  c.number('training.adam_beta1', low=0, high=1, high_open=True)
  c.number('training.adam_beta2', low=0, high=1, high_open=True)
  c.number('training.adam_epsilon', low=0, low_open=True)
  c.number('training.proximal_strength', low=0)
  c.integer('training.checkpoint_every', 1)
  c.integer('training.keep_checkpoints', 1)
  c.integer('training.eval_every', 0)

  dp_enabled = c.check('dp.enabled', lambda v: isinstance(v, bool), 'true or false')
  if dp_enabled:
    noise = c.value('dp.noise_multiplier')
    target = c.value('dp.target_epsilon')
    if (noise is None) == (target is None):
      c.add(
        'config.dp: set exactly one of dp.noise_multiplier and dp.target_epsilon '
        f'(got noise_multiplier={noise!r}, target_epsilon={target!r})'
      )
    if noise is not None:
      c.number('dp.noise_multiplier', low=0)
    if target is not None:
      c.number('dp.target_epsilon', low=0, low_open=True)
    c.number('dp.delta', low=0, high=1, low_open=True, high_open=True)
    clipping = c.one_of('dp.clipping', ('fixed', 'adaptive'))
    if clipping == 'fixed':
      c.number('dp.clip_norm', low=0, low_open=True)
    else:
      c.number('dp.initial_clip_norm', low=0, low_open=True)
      c.number('dp.target_unclipped_quantile', low=0, high=1)
      c.number('dp.clip_learning_rate', low=0)
      if c.value('dp.clipped_count_stddev') is not None:
        c.number('dp.clipped_count_stddev', low=0)
    if c.value('dp.weight_cap') is not None:
      c.number('dp.weight_cap', low=0, low_open=True)
    accountant = c.one_of('dp.accountant', ('rdp', 'pld'))
    if accountant == 'pld' and sampling == 'fixed_size':
      c.add(
        'config.dp.accountant: pld cannot analyse training.sampling=fixed_size; '
        'use dp.accountant=rdp or training.sampling=poisson'
      )

  mode = c.one_of('runtime.mode', ('local', 'silos'))
  if dp_enabled and c.one_of('dp.placement', ('central', 'secure')) == 'secure':
    c.number('dp.secure_scale', low=0, low_open=True)
    c.integer('dp.max_colluding', 0)
    for field, wanted, why in (
      ('dp.clipping', 'fixed', 'adaptive clipping is not supported with it yet'),
      ('training.sampling', 'poisson', 'its accounting is for Poisson sampling'),
      ('dp.accountant', 'rdp', 'the distributed discrete Gaussian is accounted with RDP'),
    ):
      if c.value(field) != wanted:
        c.add(f'config.{field}: dp.placement=secure needs {field}={wanted} ({why})')
    if c.value('dp.target_epsilon') is not None:
      c.add(
        'config.dp.target_epsilon: dp.placement=secure takes dp.noise_multiplier '
        '(calibrating to a target epsilon is for central noise only)'
      )
  if mode == 'silos':
    for field in ('silos', 'tls_ca', 'tls_cert', 'tls_key'):
      c.check(
        f'runtime.{field}',
        lambda v: isinstance(v, str) and bool(v),
        'set for runtime.mode=silos (or pass --silos/--tls_* to the program)',
      )
    c.one_of('runtime.on_silo_failure', ('fail', 'drop'))
    c.number('runtime.silo_round_timeout_s', low=0, low_open=True)
    c.number('runtime.silo_connect_timeout_s', low=0, low_open=True)
    c.integer('runtime.min_silos_per_round', 1)
  engine = c.one_of('runtime.engine', ENGINES)
  if engine in ('cohort', 'auto'):
    c.number('runtime.cohort_memory_mb', low=0, low_open=True)
  if engine == 'cohort':
    for conflict in cohort_engine_conflicts(config):
      c.add(f'config.{conflict}: change it, or set runtime.engine=per_client (or auto)')
  c.check('runtime.allow_exposed_worker', lambda v: isinstance(v, bool), 'true or false')
  c.check('runtime.allow_unconfined_worker', lambda v: isinstance(v, bool), 'true or false')
  c.check(
    'runtime.max_concurrent_computation_calls',
    lambda v: isinstance(v, int) and not isinstance(v, bool),
    'an integer (0: two per CPU core; < 0: no limit)',
  )
  if c.problems:
    raise ConfigError(c.problems)
  return config


ENGINES = ('auto', 'cohort', 'per_client')
# What the cohort engine runs: (field, value it needs, why). It runs locally
# and across silos (each silo trains its own sampled users as cohorts), with
# central or secure noise placement. Nothing in a config keeps it out today.
_COHORT_ENGINE_NEEDS: tuple[tuple[str, str, str], ...] = ()


# The label tasks the cohort engine trains: all of them, with the per-client
# engine's loss and metrics for each.
COHORT_ENGINE_TASKS = ('multiclass', 'binary', 'regression')


def label_task_conflicts(label_task: str) -> list[str]:
  """Why the cohort engine cannot train data of `label_task` (empty if it can)."""
  if label_task in COHORT_ENGINE_TASKS:
    return []
  return [
    f'label.task is {label_task!r}; the cohort engine trains the label tasks '
    f'{", ".join(repr(t) for t in COHORT_ENGINE_TASKS)}'
  ]


def cohort_engine_conflicts(
  config: config_dict.ConfigDict, *, label_task: str | None = None
) -> list[str]:
  """The fields that keep `config` from the cohort engine, each with the value it needs and why.

  Args:
    config: The config.
    label_task: The client data's label task (the feature spec's
      `label.task`), if known: checked against `COHORT_ENGINE_TASKS`.

  Returns:
    The conflicts; empty if the cohort engine can train it
    (`runtime.engine=auto` then picks it).
  """
  conflicts = [] if label_task is None else label_task_conflicts(label_task)
  for field, wanted, why in _COHORT_ENGINE_NEEDS:
    if field.startswith('dp.') and not config.dp.enabled:
      continue
    node = config
    for part in field.split('.'):
      node = node[part]
    if node != wanted:
      conflicts.append(f'{field} is {node!r}; the cohort engine needs {wanted!r} ({why})')
  return conflicts

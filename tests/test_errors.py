"""Every error fedpipe raises for a user derives from one base, `FedpipeError`."""

import importlib
import inspect
import pkgutil

import fedpipe
from fedpipe.errors import FedpipeError

# Not user-facing: a gRPC status carried through TFF, a signal inside the gate, and
# SIGTERM turned into an exception (like KeyboardInterrupt, it is not an error).
_INTERNAL = {'WorkerCallError', '_LifetimeExceededError', 'Terminated'}


def _library_modules():
  for info in pkgutil.walk_packages(fedpipe.__path__, 'fedpipe.'):
    if not info.name.startswith('fedpipe.cli.'):  # Programs define absl flags at import.
      yield importlib.import_module(info.name)


def test_every_error_class_derives_from_fedpipe_error():
  errors = {
    f'{module.__name__}.{name}': cls
    for module in _library_modules()
    for name, cls in vars(module).items()
    if inspect.isclass(cls)
    and issubclass(cls, BaseException)
    and cls.__module__ == module.__name__
    and name not in _INTERNAL
  }
  assert len(errors) > 30
  assert [name for name, cls in errors.items() if not issubclass(cls, FedpipeError)] == []


def test_the_aggregator_config_error_is_a_user_error():
  # The adaptive-clipping case that ended `train` in a traceback: its error was
  # missing from the program's hand-kept list of user errors.
  from fedpipe.computations import dp_aggregator

  assert issubclass(dp_aggregator.DPAggregatorConfigError, FedpipeError)
  assert issubclass(dp_aggregator.DPAggregatorConfigError, ValueError)

"""`import fedpipe`: the public names, loaded lazily, and no TensorFlow until one needs it."""

import importlib
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest

import fedpipe
from fedpipe.errors import FedpipeError
from tests.conftest import REPO_ROOT

PUBLIC = [
  'FedpipeError',
  'RoundProgress',
  'SiloDataset',
  'SiloFederation',
  'TlsFiles',
  'TrainResult',
  'build_dp_fedavg_process',
  'connect',
  'train',
  'write_client_data',
]
# Names whose modules import no TensorFlow (connect imports it when called).
LIGHT = ['write_client_data', 'connect', 'SiloFederation', 'SiloDataset', 'TlsFiles']


def _fresh(code):
  """Runs `code` in a fresh interpreter; returns what it printed as JSON."""
  prelude = 'import json, sys\nHEAVY = ("tensorflow", "tensorflow_federated")\n'
  result = subprocess.run(
    [sys.executable, '-c', prelude + textwrap.dedent(code)],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_fedpipe_imports_no_tensorflow():
  out = _fresh(
    """
    import fedpipe
    print(json.dumps({
      'heavy': [m for m in HEAVY if m in sys.modules],
      'dir': dir(fedpipe),
      'all': fedpipe.__all__,
      'error_is_base': fedpipe.FedpipeError is __import__('fedpipe.errors').errors.FedpipeError,
      'version': fedpipe.__version__,
      'heavy_after': [m for m in HEAVY if m in sys.modules],
    }))
    """
  )
  assert out['heavy'] == [] and out['heavy_after'] == []
  assert sorted(out['all']) == PUBLIC
  assert set(PUBLIC) | {'__version__'} <= set(out['dir'])
  assert out['error_is_base']
  assert out['version'] == importlib.metadata.version('fedpipe')


def test_light_names_load_without_tensorflow():
  out = _fresh(
    f"""
    import fedpipe
    from fedpipe import write_client_data
    loaded = {{name: getattr(fedpipe, name).__module__ for name in {LIGHT!r}}}
    print(json.dumps({{
      'heavy': [m for m in HEAVY if m in sys.modules],
      'loaded': loaded,
      'same': write_client_data is fedpipe.write_client_data,
    }}))
    """
  )
  assert out['heavy'] == []
  assert out['loaded'] == {
    'write_client_data': 'fedpipe.data.client_data_writer',
    'connect': 'fedpipe.federation.connection',
    'SiloFederation': 'fedpipe.federation.connection',
    'SiloDataset': 'fedpipe.federation.connection',
    'TlsFiles': 'fedpipe.federation.tls',
  }
  assert out['same']


def test_an_unknown_name_raises_attribute_error():
  out = _fresh(
    """
    import fedpipe
    try:
      fedpipe.no_such_name
      raised = None
    except AttributeError as e:
      raised = str(e)
    try:
      from fedpipe import no_such_name
      from_import = None
    except ImportError as e:
      from_import = type(e).__name__
    print(json.dumps({
      'raised': raised,
      'hasattr': hasattr(fedpipe, 'no_such_name'),
      'from_import': from_import,
      'heavy': [m for m in HEAVY if m in sys.modules],
    }))
    """
  )
  assert out['raised'] == "module 'fedpipe' has no attribute 'no_such_name'"
  assert out['hasattr'] is False
  assert out['from_import'] == 'ImportError'
  assert out['heavy'] == []


@pytest.mark.parametrize('name', sorted(fedpipe._LAZY_ATTRIBUTES))
def test_each_public_name_is_its_modules_object(name):
  module_name = fedpipe._LAZY_ATTRIBUTES[name]
  if importlib.util.find_spec(module_name) is None:
    pytest.skip(f'{module_name} is not written yet')
  assert getattr(fedpipe, name) is getattr(importlib.import_module(module_name), name)
  assert name in fedpipe.__dict__  # Cached: __getattr__ runs once per name.


def test_fedpipe_error_is_the_base_of_user_facing_errors():
  assert fedpipe.FedpipeError is FedpipeError
  from fedpipe.data.client_data_writer import ClientDataError

  assert issubclass(ClientDataError, fedpipe.FedpipeError)

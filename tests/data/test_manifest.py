"""Tests of fedpipe.data.manifest: the storage field says which layout a directory has."""

import json

import pytest

from fedpipe.data import manifest as manifest_lib
from fedpipe.data.client_data_writer import write_client_data


def _legacy_json():
  """A manifest as written before the storage field existed."""
  return {
    'schema_version': 1,
    'record_format': {
      'x': {'dtype': 'float32', 'shape': [2]},
      'y': {'dtype': 'int64', 'shape': []},
    },
    'num_features': 2,
    'num_classes': 2,
    'feature_spec': {},
    'splits': {'train': {'clients': {'a': 3}, 'excluded_clients': {}}},
    'dead_letter': {},
    'written_by': 'someone',
  }


def test_a_manifest_without_storage_is_the_per_client_layout_and_round_trips():
  manifest = manifest_lib.Manifest.from_json(_legacy_json())
  assert manifest.storage == manifest_lib.STORAGE_TFRECORD_PER_CLIENT == 'tfrecord_per_client'
  assert 'storage' not in manifest.extra and manifest.extra == {'written_by': 'someone'}
  data = manifest.to_json()
  assert data['storage'] == 'tfrecord_per_client'
  assert manifest_lib.Manifest.from_json(data) == manifest


def test_the_sqlite_storage_round_trips():
  data = {**_legacy_json(), 'storage': 'sqlite'}
  manifest = manifest_lib.Manifest.from_json(data)
  assert manifest.storage == manifest_lib.STORAGE_SQLITE
  assert manifest_lib.Manifest.from_json(manifest.to_json()).storage == 'sqlite'


@pytest.mark.parametrize('value', ['parquet', 3, None, ''])
def test_an_unknown_storage_names_the_field_and_the_fix(value):
  with pytest.raises(manifest_lib.ManifestError) as error:
    manifest_lib.Manifest.from_json({**_legacy_json(), 'storage': value}, source='m.json')
  message = str(error.value)
  assert message.startswith(f"m.json: field 'storage' is {value!r}")
  assert "'sqlite'" in message and "'tfrecord_per_client'" in message
  assert 're-run fedpipe-preprocess' in message
  with pytest.raises(manifest_lib.ManifestError, match="field 'storage'"):
    manifest_lib.Manifest(feature_spec={}, splits={}, num_features=1, num_classes=2, storage=value)


def test_read_manifest_refuses_a_sqlite_directory_without_its_file(tmp_path):
  out = tmp_path / 'd'
  write_client_data(out, {'a': ([[1.0], [2.0]], [0, 1])})
  assert manifest_lib.read_manifest(str(out)).storage == 'sqlite'
  (out / manifest_lib.STORE_FILENAME).unlink()
  with pytest.raises(
    manifest_lib.ManifestError, match='clients.sqlite is missing.*fedpipe-preprocess'
  ):
    manifest_lib.read_manifest(str(out))


def test_read_manifest_of_an_old_directory(tmp_path):
  (tmp_path / 'manifest.json').write_text(json.dumps(_legacy_json()))
  assert manifest_lib.read_manifest(str(tmp_path)).storage == 'tfrecord_per_client'

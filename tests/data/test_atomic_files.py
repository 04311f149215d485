"""Tests of fedpipe.data.atomic_files: a file is replaced whole or not at all."""

import json
import os
import pathlib
import stat

import pytest

from fedpipe.data import atomic_files
from fedpipe.data import manifest as manifest_lib


def _names(directory):
  return sorted(os.listdir(directory))


def test_write_replaces_the_file_and_leaves_no_temporary_file(tmp_path):
  path = str(tmp_path / 'f.txt')
  assert atomic_files.write_text(path, 'old\n') == path
  atomic_files.write_text(path, 'new\n')
  assert (tmp_path / 'f.txt').read_text() == 'new\n'
  atomic_files.write_bytes(path, b'\x00bytes')
  assert (tmp_path / 'f.txt').read_bytes() == b'\x00bytes'
  assert _names(tmp_path) == ['f.txt']


def test_json_is_indented_and_ends_with_a_newline(tmp_path):
  path = str(tmp_path / 'f.json')
  atomic_files.write_json(path, {'b': 1, 'a': [1, 2]})
  assert (tmp_path / 'f.json').read_text() == json.dumps({'b': 1, 'a': [1, 2]}, indent=2) + '\n'
  atomic_files.write_json(path, {'b': 1, 'a': 2}, indent=None, sort_keys=True)
  assert (tmp_path / 'f.json').read_text() == '{"a": 2, "b": 1}\n'


def test_mode_sets_the_new_files_permissions(tmp_path):
  path = str(tmp_path / 'secret')
  atomic_files.write_text(path, 'a secret\n', mode=0o600, durable=True)
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
  assert (tmp_path / 'secret').read_text() == 'a secret\n'


def test_a_failed_write_leaves_the_old_content_and_no_temporary_file(tmp_path):
  path = str(tmp_path / 'model.keras')
  atomic_files.write_text(path, 'old')
  with pytest.raises(RuntimeError, match='disk full'):
    with atomic_files.replacing(path, suffix='.keras') as tmp:
      assert tmp.startswith(path + '.tmp-') and tmp.endswith('.keras')
      with open(tmp, 'w') as f:
        f.write('half')
      raise RuntimeError('disk full')
  assert (tmp_path / 'model.keras').read_text() == 'old'
  assert _names(tmp_path) == ['model.keras']


def test_replacing_renames_what_the_block_wrote(tmp_path):
  path = str(tmp_path / 'out.bin')
  with atomic_files.replacing(path, durable=True) as tmp:
    with open(tmp, 'wb') as f:
      f.write(b'written by a library that takes a path')
  assert (tmp_path / 'out.bin').read_bytes() == b'written by a library that takes a path'
  assert _names(tmp_path) == ['out.bin']


def test_writers_of_one_path_never_share_a_temporary_name(tmp_path):
  path = str(tmp_path / 'f')
  assert len({atomic_files.temp_path(path) for _ in range(100)}) == 100


def test_a_missing_directory_is_an_os_error_and_writes_nothing(tmp_path):
  with pytest.raises(FileNotFoundError):
    atomic_files.write_text(str(tmp_path / 'missing' / 'f'), 'x')
  assert _names(tmp_path) == []


def test_the_manifest_file_is_its_json_indented(tmp_path):
  manifest = manifest_lib.Manifest(
    feature_spec={},
    splits={'train': manifest_lib.SplitManifest({'a': 2})},
    num_features=3,
    num_classes=2,
  )
  path = manifest_lib.write_manifest(str(tmp_path), manifest)
  with open(path, encoding='utf-8') as f:
    text = f.read()
  assert text == manifest.to_text() == json.dumps(manifest.to_json(), indent=2) + '\n'
  assert manifest_lib.read_manifest(str(tmp_path)).to_json() == manifest.to_json()
  assert _names(tmp_path) == [manifest_lib.MANIFEST_FILENAME]


def _tree(directory):
  return {
    os.path.relpath(os.path.join(root, name), directory): pathlib.Path(root, name).read_text()
    for root, _, files in os.walk(directory)
    for name in files
  }


def test_replace_directory_creates_the_target(tmp_path):
  new = tmp_path / 'new'
  (new / 'train').mkdir(parents=True)
  (new / 'train' / 'a.txt').write_text('a')
  atomic_files.replace_directory(str(new), str(tmp_path / 'out'))
  assert _names(tmp_path) == ['out']
  assert _tree(tmp_path / 'out') == {os.path.join('train', 'a.txt'): 'a'}


def test_replace_directory_replaces_the_old_directory_whole(tmp_path):
  old = tmp_path / 'out'
  (old / 'train').mkdir(parents=True)
  (old / 'train' / 'stale.txt').write_text('stale')
  (old / 'manifest.json').write_text('old')
  new = tmp_path / 'new'
  new.mkdir()
  (new / 'manifest.json').write_text('new')
  atomic_files.replace_directory(str(new), str(old) + os.sep)
  assert _names(tmp_path) == ['out']
  assert _tree(old) == {'manifest.json': 'new'}


def test_a_failed_directory_swap_keeps_the_old_directory(tmp_path, monkeypatch):
  old = tmp_path / 'out'
  old.mkdir()
  (old / 'manifest.json').write_text('old')
  new = tmp_path / 'new'
  new.mkdir()
  (new / 'manifest.json').write_text('new')
  rename = os.rename

  def failing_rename(src, dst):
    if os.fspath(src) == str(new):
      raise OSError(28, 'No space left on device')
    rename(src, dst)

  monkeypatch.setattr(os, 'rename', failing_rename)
  with pytest.raises(OSError, match='No space left'):
    atomic_files.replace_directory(str(new), str(old))
  assert _names(tmp_path) == ['new', 'out']
  assert _tree(old) == {'manifest.json': 'old'}
  assert _tree(new) == {'manifest.json': 'new'}


def test_replace_directory_refuses_a_missing_new_directory(tmp_path):
  old = tmp_path / 'out'
  old.mkdir()
  (old / 'kept.txt').write_text('kept')
  with pytest.raises(FileNotFoundError):
    atomic_files.replace_directory(str(tmp_path / 'missing'), str(old))
  assert _names(tmp_path) == ['out']
  assert _tree(old) == {'kept.txt': 'kept'}

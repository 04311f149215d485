"""The worker's temporary directories: which ones a new worker removes as stale.

No worker starts here; tests/runtime/test_isolated_worker.py starts real ones.
"""

import os
import subprocess
import time

from fedpipe.runtime import isolated_worker


def test_stale_dirs_are_those_of_dead_or_reused_pids(private_tmpdir):
  me = os.getpid()
  with open(f'/proc/{me}/stat', 'rb') as f:
    started = int(f.read().rsplit(b')', 1)[1].split()[19])
  dead = subprocess.Popen(['true'])
  dead.wait()
  names = {
    'mine': f'fedpipe-worker-{me}-{started}-abc_123',
    'reused': f'fedpipe-worker-{me}-{started - 1}-abc_123',
    'dead': f'fedpipe-worker-{dead.pid}-{started}-abc_123',
    'legacy_new': 'fedpipe-worker-abcd1234',
    'legacy_old': 'fedpipe-worker-efgh5678',
    'other': 'something-else',
  }
  for name in names.values():
    os.mkdir(os.path.join(private_tmpdir, name))
  old = time.time() - 3600
  os.utime(os.path.join(private_tmpdir, names['legacy_old']), (old, old))
  removed = isolated_worker.remove_stale_tmpdirs()
  assert sorted(os.path.basename(p) for p in removed) == sorted(
    [names['reused'], names['dead'], names['legacy_old']]
  )
  assert sorted(os.listdir(private_tmpdir)) == sorted(
    [names['mine'], names['legacy_new'], names['other']]
  )

"""The demo study's identity is pinned: silos approve by fingerprint.

A data owner approves a study by its id, which hashes the fingerprints of
its computations, the model and the privacy terms. If moving or refactoring
fedpipe's modules changed what the coordinator sends for the same config, every
approval in the field would silently stop matching; this test fails first.
The study is the one `make demo-silos` submits: the demo config across three
silos, trained and evaluated by the cohort engine (runtime.engine=auto) on
client data stored in `clients.sqlite`. The values were last changed when
the demo config was tuned (tanh units on centred inputs, two local epochs of
2-example batches, the PLD accountant): a new model and new local training,
so silos must approve the tuned demo as a new study. If a change is meant to alter the
computations, update them and say so in the change: silos must approve the
new study.

A rerun (a restarted coordinator) builds the study again in another process:
it must find the same study, or every silo would be asked to approve it anew.
"""

import dataclasses
import functools
import importlib.util
import json
import os
import subprocess
import sys

from fedpipe.config import validation
from fedpipe.data import manifest as manifest_lib
from tests.conftest import REPO_ROOT

DEMO_STUDY_ID = '3da405145a2bf929'
DEMO_FINGERPRINTS = [
  ['evaluate', 'sha256:17d2c3abbc31b24bf9eb507346319d804c41f1e709e330ebd16c0e28afef60e4'],
  ['train_round', 'sha256:38ac0e598d8bb310b36b0b657c9e91a3b13aae00fbb553e180a25d5012e25d39'],
]


def _demo_config():
  path = os.path.join(REPO_ROOT, 'configs', 'digits_dp.py')
  spec = importlib.util.spec_from_file_location('digits_dp', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  # As `fedpipe-train --silos=... --tls_*` runs it (make demo-silos).
  config.runtime.mode = 'silos'
  config.runtime.silos = 'silo-a=127.0.0.1:1,silo-b=127.0.0.1:2,silo-c=127.0.0.1:3'
  config.runtime.tls_ca, config.runtime.tls_cert, config.runtime.tls_key = 'ca', 'cert', 'key'
  return validation.validate(config)


def _three_silo_manifest() -> manifest_lib.Manifest:
  """300 clients over three silos with 3-7 examples each, as the demo's split gives."""
  train = {f'silo-{s}/{i:03d}': 3 + (i * 7 + ord(s)) % 5 for s in 'abc' for i in range(100)}
  evaluation = {f'silo-{s}/{i:03d}': 1 + i % 2 for s in 'abc' for i in range(100)}
  return manifest_lib.Manifest(
    feature_spec={},
    splits={
      'train': manifest_lib.SplitManifest(train),
      'eval': manifest_lib.SplitManifest(evaluation),
    },
    num_features=64,
    num_classes=10,
    storage=manifest_lib.STORAGE_SQLITE,
  )


def _demo_study(manifest: manifest_lib.Manifest | None = None) -> dict:
  """The demo study as the coordinator builds it: engine, id, fingerprints, review problems."""
  from fedpipe.federation import cross_silo
  from fedpipe.governance import review
  from fedpipe.training import experiment as experiment_lib
  from fedpipe.training import study

  config = _demo_config()
  experiment = experiment_lib.build_experiment(config, manifest or _three_silo_manifest())
  routing = cross_silo.SiloRoutingContext({}, None)  # Compiles as a run would; no silo needed.
  try:
    request = study.build_study_request(
      experiment,
      routing,
      name=config.name,
      evaluations=study.evaluations_needed(
        rounds=experiment.rounds, eval_every=config.training.eval_every
      ),
    )
  finally:
    routing.close()
  return {
    'engine': experiment.engine,
    'study_id': request.study_id,
    'fingerprints': sorted([c.role, c.fingerprint] for c in request.computations),
    'problems': {c.role: list(review.describe(c.proto).problems) for c in request.computations},
  }


@functools.cache
def _built_here() -> dict:
  return _demo_study()


def test_the_demo_study_keeps_its_id_and_fingerprints():
  built = _built_here()
  assert built['engine'] == 'cohort'
  # A governed silo's review finds nothing to refuse (every op on its allowlist).
  assert built['problems'] == {'train_round': [], 'evaluate': []}
  assert built['fingerprints'] == DEMO_FINGERPRINTS
  assert built['study_id'] == DEMO_STUDY_ID


def test_a_rerun_in_another_process_builds_the_same_study():
  """Two processes (as a coordinator and its restart) give the same fingerprints,
  whatever else either traced before (TF numbers traced functions per process)."""
  script = (
    'import json; from tests.governance import test_demo_study as t; '
    'print(json.dumps(t._demo_study()))'
  )
  with subprocess.Popen(
    [sys.executable, '-c', script],
    cwd=REPO_ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  ) as other:
    here = _built_here()  # Meanwhile, in this process (after other tests' tracing).
    out, err = other.communicate(timeout=600)
  assert other.returncode == 0, err[-3000:]
  there = json.loads(out.strip().splitlines()[-1])
  assert there['engine'] == here['engine'] == 'cohort'
  assert there['fingerprints'] == here['fingerprints']
  assert there['study_id'] == here['study_id']


def test_a_binary_study_is_the_same_when_built_again_in_the_same_process():
  """fedpipe-demo-silos submits the study, then training builds it again: both must match.

  (The binary task's AUC once made the first trace of a process differ from
  the next: its metric object, built during tracing, added variables.)
  """
  manifest = dataclasses.replace(
    _three_silo_manifest(), label_task='binary', num_classes=2, num_features=20
  )
  first, second = _demo_study(manifest), _demo_study(manifest)
  assert first['engine'] == 'cohort'
  assert first['problems'] == {'train_round': [], 'evaluate': []}
  assert second['fingerprints'] == first['fingerprints']

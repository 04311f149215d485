"""The demo study's identity is pinned: silos approve by fingerprint.

A data owner approves a study by its id, which hashes the fingerprints of
its computations, the model and the privacy terms. If moving or refactoring
fedpipe's modules changed what the coordinator sends for the same config, every
approval in the field would silently stop matching; this test fails first.
The values were computed before the code moved into the `fedpipe` package.
If a change is meant to alter the computations, update them and say so in the
change: silos must approve the new study.
"""

import importlib.util
import os

from fedpipe.config import validation
from fedpipe.data import manifest as manifest_lib
from tests.conftest import REPO_ROOT

DEMO_STUDY_ID = '5cb8738366e1da43'
DEMO_FINGERPRINTS = [
  ['evaluate', 'sha256:55cf0d93cfdae063d5a4f8dda839ea911a5b6b1772719fef3e0fb6c42a6ce218'],
  ['train_round', 'sha256:88afe58ab929293b938c1ced02641c37492635944ba4072276a70621b3018697'],
]


def _demo_config():
  path = os.path.join(REPO_ROOT, 'configs', 'digits_dp.py')
  spec = importlib.util.spec_from_file_location('digits_dp', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return validation.validate(module.get_config())


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
  )


def test_the_demo_study_keeps_its_id_and_fingerprints():
  from fedpipe.federation import cross_silo
  from fedpipe.training import experiment as experiment_lib
  from fedpipe.training import study

  config = _demo_config()
  experiment = experiment_lib.build_experiment(config, _three_silo_manifest())
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

  assert sorted([c.role, c.fingerprint] for c in request.computations) == DEMO_FINGERPRINTS
  assert request.study_id == DEMO_STUDY_ID

"""A secure-aggregation round across three real governed silos over mutual TLS.

The coordinator is this test: it sets up the training call on each silo,
relays keys and confirmations, and records every byte the silos send back.
"""

import asyncio

import numpy as np
import pytest

from fedpipe.data import client_data_writer
from fedpipe.federation import cross_silo, local_federation, secure_round, silo_protocol
from fedpipe.governance import secure_terms, study_request
from fedpipe.governance import store as governance_store
from tests.conftest import log_events

pytestmark = pytest.mark.slow

SILOS = ('silo-a', 'silo-b', 'silo-c')
DIM = 100
SCALE = 2.0**16
# These silos refuse unmasked training results, accept rounds among two of
# them (a dropped silo's round reruns among the others), and allow the
# noise-free test mode whose sums can be checked exactly.
LAB_POLICY = local_federation.DEMO_POLICY + (
  '\n[secure_aggregation]\nrequire_secure_aggregation = true\nmin_roster = 2\n'
  'allow_noise_free = true\n'
)
WEIGHTS = 1.0 + np.arange(DIM) / DIM


@pytest.fixture(scope='module')
def federation(tmp_path_factory):
  root = tmp_path_factory.mktemp('secure')
  rng = np.random.default_rng(7)  # The silos' data, not the protocol's randomness.
  data_dirs, counts, features = {}, {}, {}
  for s, silo in enumerate(SILOS):
    clients = {}
    for c in range(12):
      n = int(rng.integers(3, 40))
      clients[f'user_{s}{c}'] = (rng.normal(size=(n, 4)).astype(np.float32), np.arange(n) % 2)
    data_dirs[silo] = str(root / silo)
    held_out = {
      f'eval_{s}{c}': (rng.normal(size=(5, 4)).astype(np.float32), np.arange(5) % 2)
      for c in range(3)
    }
    client_data_writer.write_client_data(
      data_dirs[silo], clients, held_out, num_classes=2, storage='tfrecord_per_client'
    )  # The layout the computations below read.
    counts[silo] = {c: len(x) for c, (x, _) in clients.items()}
    features[silo] = {c: x for c, (x, _) in clients.items()}
  with local_federation.start_local_federation(
    data_dirs, str(root / 'run'), policy=LAB_POLICY
  ) as running:
    running.features = features
    yield running, counts


def _partial(features, divisor):
  """A silo's true update sum under `_feature_round(divisor)`, recomputed from its data."""
  total = sum(x.astype(np.float64).sum(axis=0) for x in features.values())
  return np.tile(total, DIM // 4) * WEIGHTS / divisor


def _train_round(divisor):
  """Shaped like DP-FedAvg's silo half: <metric sum, model-sized update sum>@SERVER.

  Each test's study gets its own `divisor`, hence its own computation: a silo
  charges a computation's call to the oldest approved study that holds it.
  """
  import tensorflow as tf
  import tensorflow_federated as tff

  @tff.tensorflow.computation(np.str_)
  def work(client_id):
    records = tf.data.TFRecordDataset(tf.strings.join(['train/', client_id, '.tfrecord']))
    n = records.reduce(np.int64(0), lambda n, _: n + 1)
    return n, tf.fill([DIM], tf.cast(n, tf.float32) / divisor)

  @tff.federated_computation(tff.FederatedType(np.str_, tff.CLIENTS))
  def train(client_ids):
    return tff.federated_sum(tff.federated_map(work, client_ids))

  return train


def _feature_round(divisor):
  """Like `_train_round`, but each client's update follows its records' features:
  the silo's update sum is `_partial(its features, divisor)`."""
  import tensorflow as tf
  import tensorflow_federated as tff

  @tff.tensorflow.computation(np.str_)
  def work(client_id):
    weights = tf.constant(WEIGHTS, tf.float32)
    records = tf.data.TFRecordDataset(tf.strings.join(['train/', client_id, '.tfrecord']))
    parsed = records.batch(64).apply(
      tf.data.experimental.parse_example_dataset({'x': tf.io.FixedLenFeature([4], tf.float32)})
    )
    x = parsed.unbatch().map(lambda e: e['x'])
    n, total = x.reduce((np.int64(0), tf.zeros([4])), lambda s, v: (s[0] + 1, s[1] + v))
    return n, tf.tile(total, [DIM // 4]) * weights / divisor

  @tff.federated_computation(tff.FederatedType(np.str_, tff.CLIENTS))
  def train(client_ids):
    return tff.federated_sum(tff.federated_map(work, client_ids))

  return train


def _request(proto, noise_multiplier, rounds, *, secure=True, noised_path=(1,)):
  terms = secure_terms.SecureAggregationTerms(
    roster=SILOS,
    max_colluding=1,
    noise_multiplier=noise_multiplier,
    scale=SCALE,
    dim=DIM,
    noised_path=noised_path,
  )
  privacy = {
    'noise_multiplier': noise_multiplier,
    'clipping': 'fixed',
    'clip_norm': 1.0,
    'delta': 1e-5,
    'epsilon': None,
    'accountant': 'rdp',
    'sampling': 'poisson',
    'population_size': 36,
    'clients_per_round': 24,
  }
  if secure:
    privacy['secure_aggregation'] = terms.to_json()
  request = study_request.StudyRequest(
    name=f'secure-{noise_multiplier}' if secure else f'central-{noise_multiplier}',
    rounds=rounds,
    model={'name': 'none', 'parameters': DIM},
    privacy=privacy,
    computations=(study_request.StudyComputation(study_request.ROLE_TRAIN, proto),),
  )
  return request, terms


def _submit(running, request):
  """Each silo's violations of `request`."""
  violations = {}
  for name in SILOS:
    connection = _connect(running, name)
    try:
      violations[name] = connection.submit_study(request, timeout_s=60).violations
    finally:
      connection.close()
  return violations


def _decide(running, study_id, rounds):
  for name in SILOS:
    store = governance_store.GovernanceStore(running.state_dir(name))
    store.decide(study_id, approve=True, rounds=rounds, evaluations=0)
    store.close()


def _approve(running, train_round, noise_multiplier, rounds=4, *, proto=None, noised_path=(1,)):
  from fedpipe.runtime import execution_context

  request, terms = _request(
    proto or execution_context.wire_computation(train_round),
    noise_multiplier,
    rounds,
    noised_path=noised_path,
  )
  violations = _submit(running, request)
  assert not any(violations.values()), violations
  _decide(running, request.study_id, rounds)
  return secure_round.SecureStudy(request.study_id, terms)


def _connect(running, name):
  silo = running.silos[name]
  return cross_silo.SiloConnection(
    cross_silo.SiloAddress(name=name, address=silo.address), running.coordinator_tls()
  )


def _round(running, counts, train_round, study, round_number, *, tamper=None):
  """One attempt across all silos; returns (decoded, released bytes, true partial sums)."""
  connections = {name: _connect(running, name) for name in SILOS}
  try:
    prepared = {
      name: secure_round.prepare_call(
        connections[name].channel, train_round, sorted(counts[name]), timeout_s=60
      )
      for name in SILOS
    }

    async def call(name, send):
      try:
        return await asyncio.to_thread(send)
      except cross_silo.SiloError as e:
        raise secure_round.SecureRoundError(name, str(e)) from e

    silos = {n: _Tampering(c, tamper) if tamper else c for n, c in connections.items()}
    decoded, _, released = asyncio.run(
      secure_round.run_attempt(
        study=study,
        round_number=round_number,
        attempt=0,
        silos=silos,
        prepared=prepared,
        timeout_s=60,
        call=call,
      )
    )
  finally:
    for c in connections.values():
      c.close()
  truth = {name: sum(counts[name].values()) for name in SILOS}
  return decoded, released, truth


class _Tampering:
  """A connection whose coordinator rewrites what it relays (`tamper(method, payload)`)."""

  def __init__(self, connection, tamper):
    self._connection = connection
    self._tamper = tamper
    self.name = connection.name

  def call_silo(self, method, request, timeout_s):
    return self._connection.call_silo(method, self._tamper(method, request), timeout_s)


def test_the_coordinator_gets_only_masked_words_whose_sum_is_exact(federation):
  running, counts = federation
  train_round = _train_round(64.0)
  study = _approve(running, train_round, noise_multiplier=0.0)
  decoded, released, truth = _round(running, counts, train_round, study, 1)
  total = sum(truth.values())
  # Noise-free test mode: the sum is the sum of the rounded partials, exactly
  # (each partial value n/64 is a multiple of 2^-16: rounding is exact).
  assert int(decoded[0]) == total
  assert np.array_equal(decoded[1], np.full(DIM, total / 64.0, np.float32))
  for name, data in released.items():
    words = np.frombuffer(data, dtype='<u8')
    assert words.size == 1 + DIM
    # The words do not follow the silo's partial: its true update sum is the
    # same value in all 100 coordinates; masked, no two words are equal and
    # each bit is set in about half of them (101 words: a position's count has
    # stddev 5; 6 stddevs: false alarm ~1e-9 a position, 64 positions).
    assert len(set(words.tolist())) == words.size
    bits = np.unpackbits(words.view(np.uint8)).reshape(-1, 64).sum(axis=0).astype(np.int64)
    assert np.all(np.abs(bits - words.size / 2) < 6 * np.sqrt(words.size) / 2), (name, bits)
    plain = np.full(DIM, truth[name] / 64.0 * SCALE)
    masked = words[1:].view(np.int64).astype(np.float64)
    assert not np.allclose(masked, plain)


def test_masked_words_are_uncorrelated_with_the_silos_true_partial_sums(federation):
  running, counts = federation
  train_round = _feature_round(8.0)
  study = _approve(running, train_round, noise_multiplier=0.0)
  decoded, released, _ = _round(running, counts, train_round, study, 1)
  partials = {name: _partial(running.features[name], 8.0) for name in SILOS}
  # Noise-free: the decoded sum is the sum of the partials recomputed from the
  # silos' data, up to stochastic rounding (< 1/scale per silo and value).
  np.testing.assert_allclose(decoded[1], sum(partials.values()), rtol=0, atol=3 / SCALE + 1e-4)
  for name, data in released.items():
    masked = np.frombuffer(data, dtype='<u8')[1:].astype(np.float64)
    # Pearson correlation of 100 masked words with the silo's 100 true
    # values: for words independent of them it is about N(0, 1/100); |r| >=
    # 0.5 is a 5-sigma event (false alarm ~6e-7 a silo).
    r = np.corrcoef(masked, partials[name])[0, 1]
    assert abs(r) < 0.5, (name, r)
    assert np.std(partials[name]) > 0.1  # The truth varies: the test could fail.


def test_with_noise_the_sum_is_within_the_stated_bound(federation):
  running, counts = federation
  train_round = _train_round(64.0 + 1)
  study = _approve(running, train_round, noise_multiplier=2.0)
  decoded, _, truth = _round(running, counts, train_round, study, 1)
  total = sum(truth.values())
  # The two honest shares (one colluder assumed) carry stddev noise_multiplier
  # * clip = 2.0 (in value units); all three silos add 3/2 of that variance:
  # stddev 2.45. 7 stddevs: a false alarm ~1e-11 a coordinate.
  error = decoded[1] - total / 65.0
  assert np.all(np.abs(error) < 7 * 2.45)
  assert 1.5 < np.std(error) < 3.5  # 100 coordinates: far from both ends.
  assert int(decoded[0]) == total  # The metric sum gets no noise.


def test_a_replayed_round_and_a_substituted_key_stop_the_round_naming_the_silo(federation):
  running, counts = federation
  train_round = _train_round(32.0)
  study = _approve(running, train_round, noise_multiplier=0.0, rounds=6)
  _round(running, counts, train_round, study, 1)
  with pytest.raises(secure_round.SecureRoundError, match='not newer than round 1'):
    _round(running, counts, train_round, study, 1)

  def substitute(method, payload):
    if method != silo_protocol.SECURE_CONFIRM:
      return payload
    request = silo_protocol.decode(silo_protocol.SecureConfirmRequest, payload, what='relayed')
    a, b, c = request.bundles
    forged = type(b)(**{**b.__dict__, 'public_key': a.public_key})
    return silo_protocol.encode(
      type(request)(request.study_id, request.round, request.attempt, (a, forged, c))
    )

  with pytest.raises(secure_round.SecureRoundError, match='silo silo-b: the signature'):
    _round(running, counts, train_round, study, 2, tamper=substitute)

  def unsign(method, payload):
    if method != silo_protocol.SECURE_CONFIRM:
      return payload
    request = silo_protocol.decode(silo_protocol.SecureConfirmRequest, payload, what='relayed')
    a, b, c = request.bundles
    unsigned = type(c)(**{**c.__dict__, 'signature': b''})
    return silo_protocol.encode(
      type(request)(request.study_id, request.round, request.attempt, (a, b, unsigned))
    )

  with pytest.raises(secure_round.SecureRoundError, match='silo silo-c: the signature'):
    _round(running, counts, train_round, study, 3, tamper=unsign)
  # No silo released anything in the refused rounds: one charge each, round 1's.
  for name in SILOS:
    charges = [
      e for e in log_events(running.log_path(name), 'call_charged') if e['study'] == study.study_id
    ]
    assert len(charges) == 1, (name, charges)


def test_a_silo_that_requires_secure_aggregation_never_releases_an_unmasked_sum(federation):
  from fedpipe.runtime import execution_context

  running, counts = federation
  train_round = _train_round(8.0)
  request, _ = _request(
    execution_context.wire_computation(train_round), 1.0, rounds=2, secure=False
  )
  for name, violations in _submit(running, request).items():
    assert any('requires secure aggregation' in v for v in violations), (name, violations)
  # Approved anyway (as if before the policy changed): the result still
  # cannot leave unmasked, and nothing is charged.
  _decide(running, request.study_id, rounds=2)
  connection = _connect(running, 'silo-a')
  try:
    context = execution_context.create_async_context(connection.channel)
    with pytest.raises(Exception, match='requires secure aggregation'):
      asyncio.run(context.invoke(train_round, sorted(counts['silo-a'])))
  finally:
    connection.close()
  charged = [
    e
    for e in log_events(running.log_path('silo-a'), 'call_charged')
    if e['study'] == request.study_id
  ]
  assert charged == []
  # The same computation in a newer secure study: its rounds are that study's,
  # although the silos reserve a call against the oldest study holding it.
  study = _approve(running, train_round, noise_multiplier=0.0)
  decoded, _, truth = _round(running, counts, train_round, study, 1)
  assert int(decoded[0]) == sum(truth.values())
  for name in SILOS:
    events = log_events(running.log_path(name), 'call_charged')
    assert [e['study'] for e in events].count(study.study_id) == 1
    assert [e['study'] for e in events].count(request.study_id) == 0


def test_plain_compute_of_a_secure_round_is_refused(federation):
  running, counts = federation
  train_round = _train_round(16.0)
  study = _approve(running, train_round, noise_multiplier=0.0, rounds=8)
  del study

  from fedpipe.runtime import execution_context

  connection = _connect(running, 'silo-a')
  try:
    context = execution_context.create_async_context(connection.channel)
    with pytest.raises(Exception, match='leave this silo only masked'):
      asyncio.run(context.invoke(train_round, sorted(counts['silo-a'])))
  finally:
    connection.close()


def test_training_with_secure_placement_runs_masked_rounds_charged_as_such(federation, tmp_path):
  """fedpipe-train --config.dp.placement=secure across the three governed silos, as cohorts."""
  import json
  import re
  import subprocess
  import sys

  from tests.conftest import REPO_ROOT

  running, _ = federation
  tls = running.coordinator_tls()
  command = [
    sys.executable,
    '-m',
    'fedpipe.cli.train',
    '--config=configs/digits_dp.py',
    f'--output_dir={tmp_path / "run"}',
    f'--silos={running.silos_flag}',
    f'--tls_ca={tls.ca}',
    f'--tls_cert={tls.cert}',
    f'--tls_key={tls.key}',
    '--config.dp.placement=secure',
    '--config.dp.accountant=rdp',
    '--config.training.rounds=3',
    '--config.training.clients_per_round=24',
  ]
  first = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert first.returncode == 2 and 'pending approval' in first.stderr, first.stderr[-3000:]
  study_id = re.search(r'study ([0-9a-f]{16})', first.stderr).group(1)
  for name in SILOS:
    store = governance_store.GovernanceStore(running.state_dir(name))
    study = store.get(study_id)
    assert study.violations == [], study.violations
    assert study.request['privacy']['secure_aggregation']['roster'] == list(SILOS)
    store.decide(study_id, approve=True, rounds=3, evaluations=1)
    store.close()
  done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'secure aggregation: 3 silos' in done.stdout + done.stderr
  assert 'engine: cohort' in done.stdout + done.stderr  # runtime.engine=auto's choice.
  report = json.loads((tmp_path / 'run' / 'privacy_report.json').read_text())
  assert report['noise_placement'] == 'secure' and report['silos'] == 3
  assert 0 < report['epsilon'] < 8
  for name in SILOS:
    releases = [
      e for e in log_events(running.log_path(name), 'secure_release') if e['study'] == study_id
    ]
    assert len(releases) == 3
    charges = [
      e for e in log_events(running.log_path(name), 'call_charged') if e['study'] == study_id
    ]
    train = [e for e in charges if e['role'] == 'train_round']
    assert len(train) == 3 and all(e['mechanism'] == 'distributed_discrete_gaussian' for e in train)


def test_a_silo_lost_after_keys_or_killed_after_releasing_gives_the_documented_reruns(
  federation,
):
  """Through the routing context that training uses, under on_silo_failure=drop.

  Round 1: silo-c's release is lost after the others released: the attempt
  is useless, so it reruns between silo-a and silo-b with fresh keys; their
  two releases are both charged, silo-c (never released) is not.
  Round 2: silo-c is killed right after its masked vector arrived: the round
  completes with it. Round 3: silo-c is down: the round runs without it.
  This test kills silo-c: it runs last in this module.
  """
  import threading

  running, _ = federation
  addresses = [cross_silo.SiloAddress(n, running.silos[n].address) for n in SILOS]
  with cross_silo.federation(
    addresses, running.coordinator_tls(), on_failure='drop', round_timeout_s=60
  ) as fed:
    full = _feature_round(4.0)
    # The silos approve the computation they run: the round's silo half.
    study = _approve(
      running, full, 0.0, rounds=6, proto=fed.context.silo_computation(full), noised_path=(0, 1)
    )
    fed.context.enable_secure(study, full)
    released = {'silo-a': threading.Event(), 'silo-b': threading.Event()}
    plan = {'round': 1}

    def wrap(name, call_silo):
      def call(method, request, timeout_s):
        if method != silo_protocol.SECURE_RELEASE:
          return call_silo(method, request, timeout_s)
        if name == 'silo-c' and plan['round'] == 1:
          assert all(e.wait(60) for e in released.values())
          raise cross_silo.SiloUnavailableError(name, 'the release was lost on the network')
        reply = call_silo(method, request, timeout_s)
        if name in released:
          released[name].set()
        if name == 'silo-c' and plan['round'] == 2:
          running.silos['silo-c'].kill()
        return reply

      return call

    for name, connection in fed.silos.items():
      connection.call_silo = wrap(name, connection.call_silo)
    ids = [f'{n}{cross_silo.SEPARATOR}{c}' for n in SILOS for c in sorted(running.features[n])]
    partials = {n: _partial(running.features[n], 4.0) for n in SILOS}
    expected = {
      1: partials['silo-a'] + partials['silo-b'],
      2: sum(partials.values()),
      3: partials['silo-a'] + partials['silo-b'],
    }
    for round_number in (1, 2, 3):
      plan['round'] = round_number
      _, update = full(ids)
      np.testing.assert_allclose(update, expected[round_number], rtol=0, atol=3 / SCALE + 1e-4)
      assert fed.context.pop_round_metrics()['dropped_silos'] == (0.0 if round_number == 2 else 1.0)
  charged = {
    name: [
      e for e in log_events(running.log_path(name), 'call_charged') if e['study'] == study.study_id
    ]
    for name in SILOS
  }
  # silo-a, silo-b: round 1 twice (the aborted attempt and its rerun), 2, 3.
  # silo-c: round 2 only.
  assert {n: len(c) for n, c in charged.items()} == {'silo-a': 4, 'silo-b': 4, 'silo-c': 1}
  assert all(e['mechanism'] == 'distributed_discrete_gaussian' for c in charged.values() for e in c)

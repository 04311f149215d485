"""Key agreement of a secure-aggregation round, attacked as a hostile coordinator would."""

import dataclasses

import numpy as np
import pytest

from fedpipe.federation import certificates, key_agreement

SILOS = ('silo-a', 'silo-b', 'silo-c')
CONTEXT = key_agreement.RoundContext(
  study_id='0123456789abcdef', round=3, attempt=0, fingerprint='sha256:' + '0' * 64
)


@pytest.fixture(scope='module')
def pki(tmp_path_factory):
  root = tmp_path_factory.mktemp('pki')
  ca = certificates.create_ca(str(root))
  other_ca = certificates.create_ca(str(root / 'other'), name='a rogue CA')
  files = {
    name: certificates.issue(ca, str(root), common_name=name, kind='server', hosts=['127.0.0.1'])
    for name in SILOS
  }
  files['coordinator'] = certificates.issue(ca, str(root), common_name='coordinator', kind='client')
  files['rogue-b'] = certificates.issue(
    other_ca,
    str(root / 'other'),
    common_name='silo-b',
    kind='server',
    hosts=['127.0.0.1'],
    file_stem='rogue-b',
  )

  def read(path):
    with open(path, 'rb') as f:
      return f.read()

  return {
    'ca': read(ca.cert),
    **{name: (read(f.cert), read(f.key)) for name, f in files.items()},
  }


def _keys(pki, context=CONTEXT, names=SILOS):
  return {
    name: key_agreement.RoundKeys(
      silo=name, context=context, tls_cert_pem=pki[name][0], tls_key_pem=pki[name][1]
    )
    for name in names
  }


def _verify(pki, bundles, context=CONTEXT):
  return key_agreement.verify_bundles(bundles, context=context, roster=SILOS, ca_cert_pem=pki['ca'])


def test_honest_round_gives_each_pair_one_seed_and_masks_that_cancel(pki):
  keys = _keys(pki)
  relayed = [key_agreement.KeyBundle.from_json(k.bundle.to_json()) for k in keys.values()]
  verified = _verify(pki, relayed)
  seeds = {name: k.pairwise_seeds(verified) for name, k in keys.items()}
  assert seeds['silo-a']['silo-b'] == seeds['silo-b']['silo-a']
  assert seeds['silo-a']['silo-b'] != seeds['silo-a']['silo-c']
  masks = [key_agreement.mask_vector(name, seeds[name], 1000) for name in SILOS]
  assert not np.any(masks[0] == masks[1])
  assert np.array_equal(masks[0] + masks[1] + masks[2], np.zeros(1000, np.uint64))

  digest = key_agreement.roster_digest(verified)
  confirmations = {name: k.sign_roster(digest) for name, k in keys.items()}
  key_agreement.verify_roster_confirmations(
    confirmations, bundles=verified, context=CONTEXT, digest=digest
  )


def test_fresh_keys_every_round_and_attempt(pki):
  first = _keys(pki)['silo-a'].bundle.public_key
  again = _keys(pki)['silo-a'].bundle.public_key
  rerun = _keys(pki, dataclasses.replace(CONTEXT, attempt=1))['silo-a'].bundle.public_key
  assert len({first, again, rerun}) == 3


def _attacked(pki, silo, **changes):
  bundles = [k.bundle for k in _keys(pki).values()]
  return [dataclasses.replace(b, **changes) if b.silo == silo else b for b in bundles]


def test_a_substituted_key_is_named(pki):
  rogue = key_agreement.RoundKeys(
    silo='silo-b', context=CONTEXT, tls_cert_pem=pki['silo-a'][0], tls_key_pem=pki['silo-a'][1]
  )
  bundles = _attacked(pki, 'silo-b', public_key=rogue.bundle.public_key)
  with pytest.raises(key_agreement.PeerVerificationError, match='silo silo-b: the signature') as e:
    _verify(pki, bundles)
  assert e.value.silo == 'silo-b'


def test_a_missing_signature_is_named(pki):
  with pytest.raises(key_agreement.PeerVerificationError, match='silo silo-c: the signature'):
    _verify(pki, _attacked(pki, 'silo-c', signature=b''))


def test_a_bundle_replayed_from_the_previous_round_or_attempt_is_named(pki):
  old = _keys(pki)  # Round 3's bundles, replayed in round 4.
  later = dataclasses.replace(CONTEXT, round=4)
  bundles = [k.bundle for k in _keys(pki, later, ('silo-a', 'silo-c')).values()]
  bundles.append(old['silo-b'].bundle)
  with pytest.raises(key_agreement.PeerVerificationError, match='silo silo-b: .*replayed'):
    _verify(pki, bundles, later)
  aborted = dataclasses.replace(CONTEXT, attempt=1)
  bundles = [k.bundle for k in _keys(pki, aborted, ('silo-a', 'silo-c')).values()]
  with pytest.raises(key_agreement.PeerVerificationError, match='silo silo-b'):
    _verify(pki, bundles + [old['silo-b'].bundle], aborted)


def test_a_replayed_bundle_with_its_round_rewritten_fails_its_signature(pki):
  bundles = _attacked(pki, 'silo-a', round=4)
  with pytest.raises(key_agreement.PeerVerificationError, match='silo silo-a: the signature'):
    _verify(pki, bundles, dataclasses.replace(CONTEXT, round=4))


@pytest.mark.parametrize(
  'signer,reason',
  [
    ('coordinator', 'not a silo'),
    ('rogue-b', 'not issued by the federation CA'),
    ('silo-c', 'belongs to'),
  ],
)
def test_only_the_silo_own_certificate_can_speak_for_it(pki, signer, reason):
  """The coordinator's client certificate, another CA's, or another silo's: refused."""
  forged = key_agreement.RoundKeys(
    silo='silo-b', context=CONTEXT, tls_cert_pem=pki[signer][0], tls_key_pem=pki[signer][1]
  )
  bundles = [k.bundle for k in _keys(pki, names=('silo-a', 'silo-c')).values()] + [forged.bundle]
  with pytest.raises(key_agreement.PeerVerificationError, match=reason) as e:
    _verify(pki, bundles)
  assert e.value.silo == 'silo-b'


def test_missing_duplicate_and_unknown_silos_are_named(pki):
  bundles = [k.bundle for k in _keys(pki).values()]
  with pytest.raises(key_agreement.PeerVerificationError, match='no key bundle from silo silo-c'):
    _verify(pki, bundles[:2])
  with pytest.raises(key_agreement.PeerVerificationError, match='silo silo-a: two key bundles'):
    _verify(pki, bundles + bundles[:1])
  with pytest.raises(key_agreement.PeerVerificationError, match="'silo-c', which is not on"):
    key_agreement.verify_bundles(
      bundles, context=CONTEXT, roster=SILOS[:2] + ('silo-d',), ca_cert_pem=pki['ca']
    )


def test_a_split_view_is_caught_by_the_roster_confirmations(pki):
  """The coordinator shows silo-a a key of its own choosing for silo-c: silo-a's
  signed digest differs, so silo-b refuses to release."""
  keys = _keys(pki)
  honest = [k.bundle for k in keys.values()]
  digest = key_agreement.roster_digest(honest)
  # A bundle silo-c really signed, but for another key (a second RoundKeys):
  # valid on its own, so only the roster comparison can catch it.
  other_c = _keys(pki, names=('silo-c',))['silo-c'].bundle
  seen_by_a = [b for b in honest if b.silo != 'silo-c'] + [other_c]
  _verify(pki, seen_by_a)
  confirmations = {
    'silo-a': keys['silo-a'].sign_roster(key_agreement.roster_digest(seen_by_a)),
    'silo-b': keys['silo-b'].sign_roster(digest),
    'silo-c': keys['silo-c'].sign_roster(digest),
  }
  with pytest.raises(key_agreement.PeerVerificationError, match='silo silo-a: its roster'):
    key_agreement.verify_roster_confirmations(
      confirmations, bundles=honest, context=CONTEXT, digest=digest
    )
  del confirmations['silo-a']
  with pytest.raises(key_agreement.PeerVerificationError, match='silo silo-a: no roster'):
    key_agreement.verify_roster_confirmations(
      confirmations, bundles=honest, context=CONTEXT, digest=digest
    )


def test_malformed_relayed_bundles_name_the_field(pki):
  data = _keys(pki)['silo-a'].bundle.to_json()
  data['round'] = 'three'
  with pytest.raises(key_agreement.PeerVerificationError, match="silo 'silo-a'.*'round'"):
    key_agreement.KeyBundle.from_json(data)


def test_mask_words_are_uniform_and_differ_by_seed():
  words = key_agreement.mask_words(b'\1' * 32, 1 << 16)
  assert not np.array_equal(words, key_agreement.mask_words(b'\2' * 32, 1 << 16))
  # Each of the 64 bit positions is set in half the words: with 65,536 words
  # a position's count has stddev 128; 6 stddevs make a false alarm ~1e-9 a
  # position (the seed is fixed, so the test is deterministic anyway).
  bits = np.unpackbits(words.view(np.uint8)).reshape(-1, 64).sum(axis=0).astype(np.int64)
  assert np.all(np.abs(bits - (1 << 15)) < 6 * 128)
  with pytest.raises(key_agreement.SecureAggregationError, match='32 bytes'):
    key_agreement.mask_words(b'short', 4)

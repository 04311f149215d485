r"""One silo's secure-aggregation work per round, in process, for given silo counts and sizes.

    python -m benchmarks.secure_aggregation_measure_crypto \
      '{"silos": [3, 5, 8], "sizes": ["digits", 1000000], "repetitions": 5}'

`sizes`: values per partial aggregate's update sum; "digits" is the
trainable parameter count of the digits demo's model.

No servers: the silos of a round are objects in this process, with a CA and
one server certificate per silo made as `fedpipe.federation.local_federation`
makes them. For each (silos, size) one silo's round is timed in parts,
exactly as `fedpipe/federation/secure_rounds.py` runs them:

* key agreement: a fresh X25519 key and its signed bundle (`RoundKeys`),
  parsing the relayed bundles and verifying all of them against the CA
  (`verify_bundles`), the roster digest and this silo's signature on it, the
  peers' roster confirmations (`verify_roster_confirmations`) and the
  pairwise seeds (`pairwise_seeds`);
* mask generation: `mask_vector` over the silo's peers, for the whole
  partial aggregate;
* encode + noise + mask: `encode_partial` (scaling, stochastic rounding, the
  silo's discrete Gaussian share on the update sum, from a fresh
  `CryptoRandom`) and `add_mask`;
* coordinator: `modular_sum` of the silos' masked vectors and `decode_sum`.

The other silos' keys, bundles, confirmations and masked vectors are made
untimed. The partial aggregate is the model's update sum (the noised part,
`size` values) plus two unnoised scalars, as DP-FedAvg's silo half releases.
Noise shares follow the digits demo (noise multiplier 1.9, clip 0.3,
dp.secure_scale, one colluder assumed).
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import json
import sys
import tempfile
import time

import numpy as np

from benchmarks import harness, workloads
from configs import digits_dp
from fedpipe.computations import discrete_gaussian
from fedpipe.federation import key_agreement, local_federation, secure_sum
from fedpipe.governance import secure_terms

PARTS = ('key_agreement', 'mask', 'encode', 'coordinator')
_FINGERPRINT = 'sha256:' + '0' * 64


def digits_model_size() -> int:
  """Trainable values of the model of configs/digits_dp.py on scikit-learn's digits."""
  import tensorflow as tf

  from fedpipe.computations import keras_model
  from fedpipe.training import experiment as experiment_lib

  digits = workloads.load('digits')
  builder = experiment_lib.keras_builder(
    digits_dp.get_config(), num_features=digits.num_features, num_classes=digits.num_classes
  )
  with tf.Graph().as_default(), keras_model.reproducible_keras_build():
    return int(sum(np.prod(w.shape) for w in builder().trainable_weights))


def _read(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


def _partial(size: int, rng: np.random.Generator) -> list[np.ndarray]:
  """A partial aggregate: the update sum of about 20 clipped updates, a weight sum, a count."""
  return [
    rng.normal(scale=0.05, size=size).astype(np.float32),
    np.float32(412.0),
    np.int64(20),
  ]


def one_round(*, pki: dict, names: list[str], size: int, round_number: int, rng) -> dict:
  """Seconds of each part of silo `names[0]`'s round, and whether the masks cancelled."""
  config = digits_dp.get_config()
  dp = config.dp
  terms = secure_terms.SecureAggregationTerms(
    roster=tuple(names),
    max_colluding=int(dp.max_colluding),
    noise_multiplier=float(dp.noise_multiplier),
    scale=float(dp.secure_scale),
    dim=size,
    noised_path=(0,),
  )
  context = key_agreement.RoundContext(
    study_id='0123456789abcdef', round=round_number, attempt=0, fingerprint=_FINGERPRINT
  )
  me, peers = names[0], names[1:]

  def keys_of(name):
    return key_agreement.RoundKeys(
      silo=name, context=context, tls_cert_pem=pki[name][0], tls_key_pem=pki[name][1]
    )

  peer_keys = {name: keys_of(name) for name in peers}  # Untimed: the peers' work.
  seconds = {}

  started = time.perf_counter()
  mine = keys_of(me)
  relayed = [
    key_agreement.KeyBundle.from_json(json.loads(json.dumps(k.bundle.to_json())))
    for k in [mine, *peer_keys.values()]
  ]
  verified = key_agreement.verify_bundles(
    relayed, context=context, roster=names, ca_cert_pem=pki['ca']
  )
  digest = key_agreement.roster_digest(verified)
  confirmations = {me: mine.sign_roster(digest)}
  seconds['key_agreement'] = time.perf_counter() - started

  # Untimed: the peers confirm the same roster.
  confirmations.update({name: k.sign_roster(digest) for name, k in peer_keys.items()})

  started = time.perf_counter()
  key_agreement.verify_roster_confirmations(
    confirmations, bundles=verified, context=context, digest=digest
  )
  seeds = mine.pairwise_seeds(verified)
  seconds['key_agreement'] += time.perf_counter() - started

  tensors = _partial(size, rng)
  spec = secure_sum.EncodingSpec(
    scale=terms.scale,
    local_stddev=terms.local_stddev(float(dp.clip_norm), len(names)),
    noised=(True, False, False),
    num_silos=len(names),
  )
  started = time.perf_counter()
  mask = key_agreement.mask_vector(me, seeds, size + 2)
  seconds['mask'] = time.perf_counter() - started

  started = time.perf_counter()
  encoded, layout = secure_sum.encode_partial(tensors, spec, discrete_gaussian.CryptoRandom())
  masked = secure_sum.add_mask(encoded, mask)
  seconds['encode'] = time.perf_counter() - started

  # Untimed: the peers' masked vectors (this silo's encoding, each peer's own masks).
  vectors = [masked]
  for name, k in peer_keys.items():
    peer_mask = key_agreement.mask_vector(name, k.pairwise_seeds(verified), layout.size)
    vectors.append(secure_sum.add_mask(encoded, peer_mask))

  started = time.perf_counter()
  total = secure_sum.modular_sum(vectors)
  secure_sum.decode_sum(total, layout, terms.scale)
  seconds['coordinator'] = time.perf_counter() - started

  # The masks cancel: the sum is len(names) times the one encoding, modulo 2^64.
  cancelled = bool(np.array_equal(total, encoded * np.uint64(len(names))))
  return {'seconds': seconds, 'masks_cancel': cancelled}


def main(args: dict) -> None:
  silo_counts = args.get('silos', [3, 5, 8])
  sizes = [digits_model_size() if s == 'digits' else int(s) for s in args.get('sizes', ['digits'])]
  repetitions = args.get('repetitions', 5)
  rng = np.random.default_rng(0)
  results = []
  with tempfile.TemporaryDirectory() as work_dir:
    names = [f'silo-{i:02d}' for i in range(max(silo_counts))]
    certs = local_federation.make_certs(work_dir, names)
    pki = {'ca': _read(certs.ca.cert)}
    pki.update({n: (_read(certs.silos[n].cert), _read(certs.silos[n].key)) for n in names})
    round_number = 0
    for size in sizes:
      for n in silo_counts:
        times = {part: [] for part in PARTS}
        cancelled = True
        for r in range(repetitions + 1):  # The first is a warm-up.
          round_number += 1
          one = one_round(pki=pki, names=names[:n], size=size, round_number=round_number, rng=rng)
          cancelled = cancelled and one['masks_cancel']
          if r:
            for part in PARTS:
              times[part].append(one['seconds'][part])
        silo_total = [sum(times[p][i] for p in PARTS[:3]) for i in range(repetitions)]
        results.append(
          {
            'silos': n,
            'size': size,
            'median_s': {part: harness.median(t) for part, t in times.items()},
            'silo_total_s': harness.median(silo_total),
            'masks_cancel': cancelled,
          }
        )
  harness.emit({'results': results, 'repetitions': repetitions})


if __name__ == '__main__':
  main(json.loads(sys.argv[1]))

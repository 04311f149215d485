r"""Makes the certificates of a federation (`fedpipe-certs`), with `cryptography`.

    fedpipe-certs ca     --out_dir=certs
    fedpipe-certs server --out_dir=certs --name=silo-a --hosts=silo-a.example.org,10.0.0.5
    fedpipe-certs client --out_dir=certs --name=coordinator

`ca` writes certs/ca.pem and certs/ca.key (keep the key offline). `server`
issues a silo's certificate for the names/addresses coordinators dial;
`client` issues a coordinator's certificate, whose name silo policies refer
to. Keys are written with mode 0600.
"""

import sys

from absl import app, flags

from fedpipe.errors import FedpipeError
from fedpipe.federation import certificates

_OUT_DIR = flags.DEFINE_string('out_dir', 'certs', 'Directory for the files.')
_CA_DIR = flags.DEFINE_string(
  'ca_dir', None, 'Directory holding ca.pem and ca.key; default --out_dir.'
)
_NAME = flags.DEFINE_string('name', None, 'Common name: the silo or coordinator identity.')
_HOSTS = flags.DEFINE_list('hosts', [], 'server: DNS names / IP addresses of the silo.')
_ORG = flags.DEFINE_string('organization', 'fedpipe', 'Organization in the subject.')


def main(argv: list[str]) -> int:
  if len(argv) != 2 or argv[1] not in ('ca', 'server', 'client'):
    print('usage: fedpipe-certs {ca|server|client} [flags]; see --help', file=sys.stderr)
    return 2
  kind = argv[1]
  try:
    if kind == 'ca':
      files = certificates.create_ca(_OUT_DIR.value, organization=_ORG.value)
    else:
      if not _NAME.value:
        print(f'error: fedpipe-certs {kind} needs --name', file=sys.stderr)
        return 2
      ca_dir = _CA_DIR.value or _OUT_DIR.value
      ca = certificates.IssuedFiles(f'{ca_dir}/ca.pem', f'{ca_dir}/ca.key')
      files = certificates.issue(
        ca,
        _OUT_DIR.value,
        common_name=_NAME.value,
        kind=kind,
        hosts=_HOSTS.value,
        organization=_ORG.value,
      )
  except FedpipeError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'wrote {files.cert} and {files.key}')
  return 0


def run() -> None:
  """Console-script entrypoint."""
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == '__main__':
  run()

"""Runs a measurement module inside the private network namespace it was started in.

The harness starts every measurement as `unshare --net python -m
benchmarks.private_network <module> <args>`: baselines such as plain TFF start
TFF's own worker, which listens unauthenticated on every interface; here the
only interface is a loopback nobody else shares.
"""

import runpy
import sys

from fedpipe.runtime import netns_relay


def main() -> None:
  netns_relay.bring_loopback_up()
  module = sys.argv[1]
  sys.argv = [module] + sys.argv[2:]
  runpy.run_module(module, run_name='__main__', alter_sys=True)


if __name__ == '__main__':
  main()

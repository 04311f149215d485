"""The coordinator's statistics study across silos: submit, wait for approval, release.

Each silo gets the same `StatisticsQuery` (its id is a hash of its content,
so rerunning the same command finds the same study). Nothing is released
until every silo's owner has approved it: a silo that releases while
another has not approved would spend its budget on an incomplete study.
Each silo then computes, noises and charges its release itself
(`governance.gate.GovernanceGate.release_statistics`); the coordinator only
receives noised values.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Sequence

from fedpipe.errors import FedpipeError
from fedpipe.federation import cross_silo, silo_protocol
from fedpipe.federation import tls as tls_lib
from fedpipe.governance import store as governance_store
from fedpipe.statistics import query as statistics_query

Progress = Callable[[str], None]


class StatisticsStudyNotReadyError(FedpipeError, RuntimeError):
  """Some silo has not approved the study (or has no release left); the message says which and why."""


def _status_line(
  name: str, status: silo_protocol.StudyStatusReply, study_id: str
) -> tuple[bool, str]:
  """(ready to release, one line on where the study stands at this silo)."""
  if status.status == governance_store.PENDING:
    fits = (
      'it fits the silo policy'
      if not status.violations
      else 'it does NOT fit the silo policy: ' + '; '.join(status.violations)
    )
    return False, (
      f'{name}: pending approval ({fits}); its data owner reviews it with '
      f'`fedpipe-governance show {study_id}`'
    )
  if status.status == governance_store.REJECTED:
    return False, f'{name}: rejected ({status.reason or "no reason given"})'
  if status.rounds_remaining < 1:
    return False, (
      f'{name}: approved, but all {status.rounds_approved} approved releases are used; ask its '
      f'data owner to run `fedpipe-governance extend {study_id} --rounds=1`'
    )
  return (
    True,
    f'{name}: approved, {status.rounds_remaining} of {status.rounds_approved} releases left',
  )


def run_statistics_study(
  silos: Sequence[cross_silo.SiloAddress],
  tls: tls_lib.TlsFiles,
  query: statistics_query.StatisticsQuery,
  *,
  wait_s: float = 0.0,
  poll_s: float = 5.0,
  timeout_s: float = 600.0,
  submit_only: bool = False,
  progress: Progress = lambda line: None,
) -> dict[str, silo_protocol.ReleaseStatisticsReply]:
  """Submits `query` to every silo, waits up to `wait_s` for approval, then releases.

  Args:
    silos: The silos.
    tls: The coordinator's certificate, key and the federation's CA.
    query: The statistics query.
    wait_s: How long to wait for every silo's approval (0: ask once).
    poll_s: How often to ask while waiting.
    timeout_s: The most one call may take (a release runs the silo's pipeline).
    submit_only: Submit, report, and release nothing.
    progress: Called with one line per step.

  Returns:
    Silo name -> its release; empty with `submit_only`.

  Raises:
    StatisticsStudyNotReadyError: If a silo has not approved the study in
      time, rejected it, or has no release left; nothing was released.
    cross_silo.SiloError: If a silo cannot be reached or refuses.
  """
  study_id = query.study_id
  connections = {}
  try:
    for address in silos:
      connection = cross_silo.SiloConnection(address, tls)
      connections[connection.name] = connection
    progress(f'statistics study {study_id} ({query.name}) on {len(connections)} silo(s)')
    statuses = {}
    for name, connection in connections.items():
      statuses[name] = connection.submit_statistics_study(query, timeout_s=timeout_s)
      progress(_status_line(name, statuses[name], study_id)[1])
    if submit_only:
      progress(f'study_id={study_id}')
      return {}
    deadline = time.monotonic() + wait_s
    while True:
      lines = {name: _status_line(name, s, study_id) for name, s in statuses.items()}
      waiting = [name for name, (ready, _) in lines.items() if not ready]
      final = [n for n in waiting if statuses[n].status != governance_store.PENDING]
      if not waiting:
        break
      if final or time.monotonic() >= deadline:
        raise StatisticsStudyNotReadyError(
          f'statistics study {study_id} ({query.name}) cannot be released yet:\n  '
          + '\n  '.join(lines[n][1] for n in waiting)
          + '\nRerun the same command once every silo has approved it. Nothing was released '
          'by any silo.'
        )
      progress(f'waiting for approval by {", ".join(waiting)} ...')
      time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))
      for name in waiting:
        statuses[name] = connections[name].study_status(study_id, timeout_s=timeout_s)
    progress('every silo approved; each runs the statistics pipeline on its raw data and noises it')

    def release(name: str) -> silo_protocol.ReleaseStatisticsReply:
      started = time.monotonic()
      reply = connections[name].release_statistics(study_id, query, timeout_s=timeout_s)
      epsilon = 'noise-free test mode' if reply.epsilon is None else f'epsilon {reply.epsilon:.3f}'
      progress(
        f'{name}: release {reply.release_number} received in '
        f'{time.monotonic() - started:.1f} s ({epsilon} at delta {reply.delta:g})'
      )
      return reply

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(connections)) as pool:
      futures = {name: pool.submit(release, name) for name in connections}
    return {name: future.result() for name, future in futures.items()}
  finally:
    for connection in connections.values():
      connection.close()

"""Shared benchmark plumbing: isolated measurements, medians, ratios, tables.

Every measurement runs in a subprocess of its own (`python -m <module>
<json args>` printing one JSON line), so its timings and peak memory are its
own and a crashed baseline cannot take the others down.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_PREFIX = 'BENCH_RESULT '
# Plots go to the `results/` folder beside the results file (`run_all --results`).
_plots_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')


class MeasurementError(RuntimeError):
  """A measurement subprocess failed; the message holds the end of its output."""


def emit(result: dict[str, Any]) -> None:
  """Called by a measurement subprocess to hand its result back."""
  print(RESULT_PREFIX + json.dumps(result), flush=True)


def _isolation_prefix() -> list[str]:
  unshare = shutil.which('unshare')
  if unshare is None:
    raise MeasurementError('benchmarks run in a private network namespace; install util-linux')
  return [unshare, '--net'] if os.geteuid() == 0 else [unshare, '--map-root-user', '--net']


def measure(
  module: str,
  args: dict[str, Any],
  *,
  timeout_s: float = 1200,
  python: str | None = None,
  env: dict[str, str] | None = None,
) -> dict[str, Any]:
  """Runs `module` with JSON `args` in a private network namespace; returns its result.

  The subprocess gets its own session; everything left in it afterwards
  (e.g. TFF's own worker, which outlives its parent) is killed. The result
  gains `wall_s` and `peak_rss_mb` (the peak, sampled every 0.25 s, of the
  summed resident memory of the measurement process and its descendants).
  """
  started = time.monotonic()
  command = _isolation_prefix() + [
    python or sys.executable,
    '-m',
    'benchmarks.private_network',
    module,
    json.dumps(args),
  ]
  # Files, not pipes: a leftover grandchild holding a pipe would block reads.
  with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
    process = subprocess.Popen(
      command,
      cwd=REPO_ROOT,
      stdout=out,
      stderr=err,
      text=True,
      start_new_session=True,
      env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2', 'PYTHONPATH': REPO_ROOT, **(env or {})},
    )
    peak_tree_mb = 0.0
    deadline = time.monotonic() + timeout_s
    try:
      while process.poll() is None:
        if time.monotonic() > deadline:
          raise subprocess.TimeoutExpired(command, timeout_s)
        peak_tree_mb = max(peak_tree_mb, tree_rss_mb(process.pid))
        time.sleep(0.25)
    finally:
      try:
        os.killpg(process.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      process.wait()
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read(), err.read()
  wall = time.monotonic() - started
  lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
  if process.returncode != 0 or not lines:
    tail = (stdout + stderr)[-3000:]
    raise MeasurementError(f'{module} {args} failed (exit {process.returncode}):\n{tail}')
  result = json.loads(lines[-1][len(RESULT_PREFIX) :])
  print(f'  {module} {json.dumps(args)}: {wall:.0f} s', flush=True)  # Progress of long runs.
  result.setdefault('wall_s', wall)
  # Sampled every 0.25 s: the peak of the whole process tree's resident memory.
  result.setdefault('peak_rss_mb', peak_tree_mb)
  return result


def set_plots_dir(path: str) -> None:
  """Makes `plot_path` put plots in `path` (run_all: beside its results file)."""
  global _plots_dir
  _plots_dir = os.path.abspath(path)


def plot_path(filename: str) -> str:
  """Where to save the plot `filename` (the folder is made if needed)."""
  os.makedirs(_plots_dir, exist_ok=True)
  return os.path.join(_plots_dir, filename)


def shown_path(path: str) -> str:
  """`path` as a table note names it: relative to the repository if inside it."""
  relative = os.path.relpath(path, REPO_ROOT)
  return path if relative.startswith('..') else relative


def median(values: Sequence[float]) -> float:
  return float(statistics.median(values))


def timed_repetitions(fn, *, warmup: int = 1, repetitions: int = 3) -> list[float]:
  """Seconds of each of `repetitions` calls of `fn` after `warmup` calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repetitions):
    started = time.perf_counter()
    fn()
    times.append(time.perf_counter() - started)
  return times


def take_turns(
  rounds: dict[str, Callable[[int], None]],
  repetitions: int,
  *,
  after_each: Callable[[int], None] | None = None,
) -> dict[str, list[float]]:
  """Seconds of each system's round, the systems taking turns.

  Repetition r runs every system once, the order rotated by r, so a slow
  spell of the machine hits every system alike. `rounds[name](r)` runs one
  round; `after_each(r)`, if given, runs untimed after each repetition.
  """
  times: dict[str, list[float]] = {name: [] for name in rounds}
  order = list(rounds)
  for r in range(repetitions):
    for name in order[r % len(order) :] + order[: r % len(order)]:
      started = time.perf_counter()
      rounds[name](r)
      times[name].append(time.perf_counter() - started)
    if after_each is not None:
      after_each(r)
  return times


def tree_rss_mb(pid: int) -> float:
  """Summed current resident memory of `pid` and its descendants, in MiB."""
  total = 0.0
  for p in [pid, *descendants(pid)]:
    try:
      total += rss_mb(p)
    except (FileNotFoundError, ProcessLookupError):
      pass
  return total


def peak_rss_mb(pid: int | None = None) -> float:
  """Peak resident memory (VmHWM) of a live process, in MiB."""
  with open(f'/proc/{pid or "self"}/status') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) / 1024
  return float('nan')


def rss_mb(pid: int | None = None) -> float:
  """Current resident memory (VmRSS) of a live process, in MiB."""
  with open(f'/proc/{pid or "self"}/status') as f:
    for line in f:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) / 1024
  return float('nan')


def descendants(pid: int) -> list[int]:
  """All live descendant pids of `pid`."""
  out = subprocess.run(['ps', '-eo', 'pid=,ppid='], capture_output=True, text=True).stdout
  children: dict[int, list[int]] = {}
  for line in out.splitlines():
    if line.strip():
      child, parent = map(int, line.split())
      children.setdefault(parent, []).append(child)
  found, todo = [], [pid]
  while todo:
    for child in children.get(todo.pop(), []):
      found.append(child)
      todo.append(child)
  return found


def worker_pids_of(pid: int) -> list[int]:
  """The TFF worker_binary processes below `pid`."""
  pids = []
  for child in descendants(pid):
    try:
      with open(f'/proc/{child}/cmdline', 'rb') as f:
        if b'worker_binary' in f.read():
          pids.append(child)
    except FileNotFoundError:
      pass
  return pids


@dataclasses.dataclass
class Table:
  """A markdown table with a title and notes."""

  title: str
  columns: list[str]
  rows: list[list[Any]]
  notes: list[str] = dataclasses.field(default_factory=list)

  def markdown(self) -> str:
    def cell(v):
      if isinstance(v, float):
        return f'{v:.3g}' if abs(v) < 1000 else f'{v:,.0f}'
      return str(v)

    lines = [
      f'### {self.title}',
      '',
      '| ' + ' | '.join(self.columns) + ' |',
      '|' + '|'.join('---' for _ in self.columns) + '|',
    ]
    lines += ['| ' + ' | '.join(cell(v) for v in row) + ' |' for row in self.rows]
    if self.notes:
      lines.append('')
      lines += [f'- {n}' for n in self.notes]
    return '\n'.join(lines) + '\n'


def machine_description() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      model = next((ln.split(':', 1)[1].strip() for ln in f if ln.startswith('model name')), '?')
  except OSError:
    model = platform.processor() or '?'
  mem_gb = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30
  return (
    f'{os.cpu_count()} CPU cores ({model}), {mem_gb:.0f} GiB RAM, '
    f'{platform.system()} {platform.release()}, Python {platform.python_version()}'
  )


def verdict(value: float, target: float, *, lower_is_better: bool = True) -> str:
  ok = value <= target if lower_is_better else value >= target
  return 'met' if ok else 'MISSED'

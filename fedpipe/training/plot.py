"""A PNG of a run's training curves, drawn from its `metrics.csv`.

Draws on its own `Figure` with the Agg canvas, never through pyplot, so it
neither switches matplotlib's backend nor touches a notebook's figures.
"""

from __future__ import annotations

import csv
import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

FILENAME = 'training_curves.png'


def read_metrics(csv_path: str) -> dict[str, list[float]]:
  """Columns of `metrics.csv` as float lists (missing cells are NaN)."""
  with open(csv_path, newline='', encoding='utf-8') as f:
    rows = list(csv.DictReader(f))
  columns: dict[str, list[float]] = {}
  for row in rows:
    for name in row:
      columns.setdefault(name, [])
  for row in rows:
    for name, values in columns.items():
      cell = row.get(name)
      values.append(float(cell) if cell not in (None, '') else float('nan'))
  return columns


def plot_training_curves(csv_path: str, output_dir: str, *, title: str) -> str:
  """Draws loss, the model's metrics (accuracy, ...) and ε against rounds; returns the PNG's path."""
  m = read_metrics(csv_path)
  rounds = m.get('key', [])
  panels = [('loss', ['train_loss', 'eval_loss'])]
  # One panel per model metric: accuracy (auc for binary; mae, rmse for regression).
  for name in m:
    metric = name[len('train_') :]
    if name.startswith('train_') and metric not in ('loss', 'examples'):
      panels.append((metric, [name, f'eval_{metric}']))
  if len(panels) == 1:
    panels.append(('accuracy', ['train_accuracy', 'eval_accuracy']))
  if 'epsilon' in m:
    panels.append(('epsilon', ['epsilon']))
  fig = Figure(figsize=(5 * len(panels), 3.8))
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  for ax, (label, names) in zip(axes, panels):
    for name in names:
      if name in m:
        points = [(r, v) for r, v in zip(rounds, m[name]) if v == v]
        if points:
          xs, ys = zip(*points)
          ax.plot(
            xs,
            ys,
            marker='o' if name.startswith('eval') else None,
            markersize=3,
            label=name.replace('_', ' '),
          )
    ax.set_xlabel('round')
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  path = os.path.join(output_dir, FILENAME)
  fig.savefig(path, dpi=110)
  return path

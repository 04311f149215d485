"""The training-curves plot draws on its own figure: no backend switch, no pyplot state."""

import subprocess
import sys

from tests.conftest import REPO_ROOT

_SCRIPT = """
import sys
import matplotlib
matplotlib.use('svg')  # As a notebook's inline backend would be set.
from fedpipe.training import plot
csv_path, out = sys.argv[1], sys.argv[2]
path = plot.plot_training_curves(csv_path, out, title='t')
import matplotlib.pyplot as plt
print(matplotlib.get_backend(), len(plt.get_fignums()), open(path, 'rb').read(4) == b'\\x89PNG')
"""


def test_plotting_keeps_the_backend_and_leaves_no_pyplot_figure(tmp_path):
  csv_path = tmp_path / 'metrics.csv'
  csv_path.write_text(
    'key,train_loss,train_accuracy,epsilon,eval_loss,eval_accuracy\n'
    '1,2.0,0.1,0.5,,\n2,1.5,0.3,0.7,1.4,0.4\n'
  )
  result = subprocess.run(
    [sys.executable, '-c', _SCRIPT, str(csv_path), str(tmp_path)],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    check=True,
  )
  assert result.stdout.split() == ['svg', '0', 'True']

r"""One measurement of the Beam preprocessing pipeline's throughput.

    python -m benchmarks.preprocess_throughput_measure \
        '{"rows": 100000, "mode": "multi_processing"}'

Synthetic raw CSV (16 numeric features, labels 0..9, 1,000 client keys, in 4
files) through `run_preprocessing` on the local runner in the given
`direct_running_mode`; rows per second over the whole run (reading,
validation, grouping, writing per-client TFRecords and the manifest).
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import json
import shutil
import sys
import tempfile
import time

import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from benchmarks import harness, workloads
from fedpipe.pipelines import feature_spec as feature_spec_lib
from fedpipe.pipelines import pipeline as preprocess_pipeline

NUM_FEATURES = 16
NUM_CLIENTS = 1000
NUM_FILES = 4


def raw_csv(rows: int) -> tuple[str, feature_spec_lib.FeatureSpec]:
  """Writes (once) the synthetic raw files; returns their pattern and spec."""
  out = os.path.join(workloads.CACHE_DIR, f'raw-{rows}')
  spec = feature_spec_lib.FeatureSpec.from_json(
    {
      'schema_version': 1,
      'client_key': 'client_id',
      'label': {'name': 'label', 'num_classes': 10},
      'features': [{'name': f'f{i}', 'mean': 0.0, 'std': 1.0} for i in range(NUM_FEATURES)],
    },
    source='benchmark',
  )
  if not os.path.exists(os.path.join(out, 'done')):
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(0)
    for part, chunk in enumerate(np.array_split(np.arange(rows), NUM_FILES)):
      x = rng.normal(size=(len(chunk), NUM_FEATURES))
      labels = rng.integers(0, 10, len(chunk))
      clients = rng.integers(0, NUM_CLIENTS, len(chunk))
      with open(os.path.join(out, f'part-{part}.csv'), 'w') as f:
        f.write('client_id,label,' + ','.join(f'f{i}' for i in range(NUM_FEATURES)) + '\n')
        for c, label, row in zip(clients, labels, x):
          f.write(f'user_{c:04d},{label},' + ','.join(f'{v:.5f}' for v in row) + '\n')
    open(os.path.join(out, 'done'), 'w').close()
  return os.path.join(out, 'part-*.csv'), spec


def main(args: dict) -> None:
  pattern, spec = raw_csv(args['rows'])
  options = ['--direct_running_mode=' + args['mode']]
  if args['mode'] == 'multi_processing':
    options.append(f'--direct_num_workers={args.get("workers", 2)}')
  out = tempfile.mkdtemp(prefix='fedpipe-bench-')
  try:
    started = time.perf_counter()
    summary = preprocess_pipeline.run_preprocessing(
      train_files=pattern,
      eval_files=None,
      feature_spec=spec,
      output_dir=os.path.join(out, 'clients'),
      min_examples_per_client=1,
      max_malformed_fraction=0.0,
      pipeline_options=PipelineOptions(options),
    )
    seconds = time.perf_counter() - started
  finally:
    shutil.rmtree(out, ignore_errors=True)
  harness.emit(
    {
      'seconds': seconds,
      'rows': summary.total_rows_read,
      'rows_per_s': summary.total_rows_read / seconds,
      'clients': sum(summary.clients_written.values()),
    }
  )


if __name__ == '__main__':
  main(json.loads(sys.argv[1]))

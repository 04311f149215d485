"""The bundled tabular case: federated with DP across three silos vs the same model central.

    python -m benchmarks.tabular_case_measure '{"rounds": 200, "epochs": 20}'

Generates the synthetic credit data (configs/credit_binary.py) under
benchmarks/.cache, then:

* federated: `fedpipe-demo-silos --config=configs/credit_binary.py`, the
  real program: a federated statistics study across three governed silos
  completes the draft spec, each silo preprocesses with the shared spec,
  and user-level DP-FedAvg trains across them; its privacy report gives
  held-out accuracy, AUC and ε;
* central: the same model (the config's MLP) trained by Keras on the pooled
  training rows, preprocessed with the spec completed from the pooled rows
  (`feature_spec_central.json`), without DP, evaluated on the same test rows;
* the true model's (Bayes-optimal) accuracy on the test rows.

`"sampling_seed": N` fixes the training's client sampling (default: a fresh
seed each run, recorded in the run directory).
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('GRPC_ENABLE_FORK_SUPPORT', 'false')

import functools
import json
import subprocess
import sys
import tempfile
import time

from apache_beam.options.pipeline_options import PipelineOptions

from benchmarks import harness
from configs import credit_binary
from fedpipe.computations import keras_model
from fedpipe.datasets import bundled_data, synthetic_credit
from fedpipe.pipelines import feature_spec as feature_spec_lib
from fedpipe.pipelines import federated_statistics
from fedpipe.pipelines import pipeline as preprocess_pipeline
from fedpipe.training import central_baseline

CACHE = os.path.join(harness.REPO_ROOT, 'benchmarks', '.cache', 'credit')


def main(args: dict) -> None:
  config = credit_binary.get_config()
  raw_dir = os.path.join(CACHE, 'raw')
  written = bundled_data.write_bundled_dataset(
    source=config.data.source,
    raw_dir=raw_dir,
    raw_format='csv',
    num_clients=config.data.num_clients,
    test_fraction=config.data.test_fraction,
    seed=config.seed,
  )
  train_csv, test_csv = os.path.join(raw_dir, 'train.csv'), os.path.join(raw_dir, 'test.csv')
  truth = synthetic_credit.ground_truth_accuracy(test_csv)
  with tempfile.TemporaryDirectory() as work:
    started = time.perf_counter()
    preprocess_pipeline.run_preprocessing(
      train_files=train_csv,
      eval_files=test_csv,
      feature_spec=feature_spec_lib.FeatureSpec.load(written.central_feature_spec_file),
      output_dir=os.path.join(work, 'central'),
      min_examples_per_client=1,
      max_malformed_fraction=0.0,
      pipeline_options=PipelineOptions([]),
    )
    central_spec = feature_spec_lib.FeatureSpec.load(written.central_feature_spec_file)
    builder = functools.partial(
      keras_model.build_mlp,
      num_features=central_spec.num_features,
      num_classes=2,
      hidden_units=tuple(config.model.hidden_units),
      num_outputs=1,
      seed=config.seed,
    )
    central = central_baseline.train_central(
      [os.path.join(work, 'central')], builder, epochs=args['epochs'], seed=config.seed
    )
    central_s = time.perf_counter() - started
    started = time.perf_counter()
    run = subprocess.run(
      [
        sys.executable,
        '-m',
        'fedpipe.cli.demo_silos',
        '--config=configs/credit_binary.py',
        f'--config.data.raw_dir={raw_dir}',
        f'--config.data.train_files={train_csv}',
        f'--config.data.eval_files={test_csv}',
        f'--config.data.feature_spec={written.feature_spec_file}',
        f'--config.training.rounds={args["rounds"]}',
        *(
          [f'--config.training.sampling_seed={args["sampling_seed"]}']
          if 'sampling_seed' in args
          else []
        ),
        f'--work_dir={os.path.join(work, "silos")}',
      ],
      capture_output=True,
      text=True,
      check=False,
    )
    federated_s = time.perf_counter() - started
    if run.returncode != 0:
      raise SystemExit(f'fedpipe-demo-silos failed:\n{(run.stdout + run.stderr)[-3000:]}')
    with open(os.path.join(work, 'silos', 'run', 'privacy_report.json')) as f:
      report = json.load(f)
    with open(os.path.join(work, 'silos', 'statistics', 'statistics_report.json')) as f:
      statistics = json.load(f)
    shared_spec = feature_spec_lib.FeatureSpec.load(
      os.path.join(work, 'silos', 'statistics', federated_statistics.SHARED_SPEC_FILENAME)
    )
    engine = next(
      (
        ln.split('engine: ', 1)[1]
        for ln in (run.stdout + run.stderr).splitlines()
        if 'engine: ' in ln
      ),
      '',
    )
  harness.emit(
    {
      'central': central.metrics,
      'central_s': central_s,
      'federated': {k: report.get(f'test_{k}') for k in ('accuracy', 'auc', 'loss')},
      'epsilon': report.get('epsilon'),
      'statistics_epsilon': max(s['epsilon'] for s in statistics['silos'].values()),
      # Numeric features the shared spec left without a std: min-max scaled instead.
      'scaled_by_bounds': sorted(
        f.name for f in shared_spec.features if f.kind == feature_spec_lib.NUMERIC and f.std is None
      ),
      'vocabularies': {
        k: v['vocabulary'] for k, v in statistics['combined']['categorical'].items()
      },
      'federated_s': federated_s,
      'engine': engine,
      'bayes_accuracy': truth.bayes_accuracy,
    }
  )


if __name__ == '__main__':
  main(json.loads(sys.argv[1]))

"""Start-up cost of the DirectRunner's multi-process mode, with and without TensorFlow.

    python -m benchmarks.preprocess_throughput_measure_startup '{"import_tensorflow": true}'

A pipeline with no real work (100 elements through a shuffle into a DoFn) on
2 worker processes. With `import_tensorflow` the DoFn imports TensorFlow in
its `setup`, as every worker of fedpipe's preprocessing did when its DoFns
built `tf.train.Example`s and wrote with `tf.io` (they now use
`fedpipe.data.example_records`): the difference is what TF would cost each run
before the first row.
"""

import json
import sys
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from benchmarks import harness


class _PassThrough(beam.DoFn):
  def __init__(self, import_tensorflow: bool):
    self._import_tensorflow = import_tensorflow

  def setup(self):
    if self._import_tensorflow:
      pass

  def process(self, element):
    yield element


def main(args: dict) -> None:
  options = PipelineOptions(['--direct_running_mode=multi_processing', '--direct_num_workers=2'])
  started = time.perf_counter()
  with beam.Pipeline(options=options) as p:
    _ = (
      p
      | beam.Create(list(range(100)))
      | beam.Reshuffle()
      | beam.ParDo(_PassThrough(args['import_tensorflow']))
    )
  harness.emit({'seconds': time.perf_counter() - started})


if __name__ == '__main__':
  main(json.loads(sys.argv[1]))

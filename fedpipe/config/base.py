"""The fields every fedpipe experiment config has, with safe defaults.

An experiment config (`configs/<name>.py`) starts from `get_base_config()` and
changes what differs. Programs take it with `--config=configs/<name>.py` and
single fields with `--config.training.rounds=5`; `fedpipe.config.validation.validate`
checks the whole config once, at the program's edge. In Python (a notebook),
`fedpipe.training.federated_training.train` starts from `get_default_config()`
unless given a config, and takes single fields as keyword arguments with `__`
for the dots: `train(model_fn, data, training__rounds=5)`.
"""

from __future__ import annotations

from ml_collections import config_dict


def get_base_config() -> config_dict.ConfigDict:
  """Returns the base config; see the comments for each field's meaning."""
  config = config_dict.ConfigDict()
  config.name = 'experiment'
  config.seed = 0  # Model initialization and bundled-data generation.

  config.data = config_dict.ConfigDict()
  data = config.data
  # Bundled raw data to generate (`fedpipe-make-data`):
  # 'sklearn:digits', 'sklearn:breast_cancer', 'sklearn:wine', 'synthetic_credit'
  # (users with numeric and categorical columns, a binary label of known law;
  # num_clients is its number of users), or 'none' for data you bring yourself.
  data.source = 'sklearn:digits'
  data.raw_dir = 'data/digits/raw'
  data.raw_format = 'csv'  # csv | jsonl
  data.num_clients = 300
  data.partition = 'iid'  # iid | dirichlet (label skew)
  data.dirichlet_alpha = 0.5  # Smaller is more skewed.
  data.test_fraction = 0.2
  # Inputs of the preprocessing pipeline (file patterns) and its feature spec.
  data.train_files = 'data/digits/raw/train.csv'
  data.eval_files = 'data/digits/raw/test.csv'
  data.feature_spec = 'data/digits/raw/feature_spec.json'
  # Output of the preprocessing pipeline: per-client TFRecords + manifest.
  data.processed_dir = 'data/digits/clients'
  data.min_examples_per_client = 1
  # Preprocessing fails, writing nothing, above this fraction of bad rows.
  data.max_malformed_fraction = 0.05
  # A draft feature spec (a categorical feature without its vocabulary) is
  # completed by a federated statistics study across the silos
  # (`fedpipe-demo-silos`; `fedpipe-stats` takes the same settings as flags):
  # each silo releases DP-noised statistics of its raw rows, charged to its
  # budget (docs/federated_statistics.md).
  data.statistics = config_dict.ConfigDict()
  data.statistics.max_rows_per_user = 10  # Rows one user contributes at most.
  data.statistics.histogram_bins = 20  # Per numeric feature.
  # Noise std over the release's L2 sensitivity (one Gaussian mechanism).
  data.statistics.noise_multiplier = 2.0

  config.model = config_dict.ConfigDict()
  # The Keras model, as 'module:function' (importable from where the program
  # runs). The function is called with the keyword arguments num_features and
  # num_classes (from the client data), plus hidden_units (below) and seed
  # (config.seed) if it takes them, and returns a new, uncompiled
  # tf.keras.Model mapping num_features floats to num_classes logits (or
  # probabilities from a final softmax). '' is the bundled MLP,
  # fedpipe.computations.keras_model:build_mlp. In a notebook, pass a model
  # function to fedpipe.training.federated_training.train instead.
  config.model.builder = ''
  config.model.hidden_units = (64, 64)  # Of the bundled MLP; a builder may take them.
  # The bundled MLP's hidden activation: relu | tanh | elu | sigmoid.
  config.model.activation = 'relu'
  # Map the [0, 1]-scaled features to [-1, 1] before the first layer (x -> 2x - 1).
  config.model.center_inputs = False

  config.training = config_dict.ConfigDict()
  training = config.training
  training.rounds = 100
  training.clients_per_round = 60  # Expected number under Poisson sampling.
  training.sampling = 'poisson'  # poisson | fixed_size
  # None: a secret random seed, kept in the output directory for resuming.
  training.sampling_seed = config_dict.placeholder(int)
  training.local_epochs = 1
  training.batch_size = 16
  training.client_learning_rate = 0.1
  training.server_optimizer = 'sgdm'  # sgdm | adam
  training.server_learning_rate = 1.0
  training.server_momentum = 0.9
  # 'cosine' decays the server learning rate to server_lr_final_fraction of
  # its value by the last round: later (noisier, under DP) updates move the
  # model less. Post-processing: it costs no privacy.
  training.server_lr_schedule = 'constant'  # constant | cosine
  training.server_lr_final_fraction = 0.1
  training.adam_beta1 = 0.9
  training.adam_beta2 = 0.99
  training.adam_epsilon = 1e-3
  training.proximal_strength = 0.0  # > 0 turns FedAvg into FedProx.
  training.checkpoint_every = 1
  training.keep_checkpoints = 3
  training.eval_every = 0  # Federated evaluation every N rounds; 0: at the end only.

  config.dp = config_dict.ConfigDict()
  dp = config.dp
  dp.enabled = True
  # Either the noise multiplier, or a target epsilon to calibrate it for.
  dp.noise_multiplier = config_dict.placeholder(float)
  dp.target_epsilon = config_dict.placeholder(float)
  dp.delta = 1e-5
  dp.clipping = 'fixed'  # fixed | adaptive
  dp.clip_norm = 1.0  # Fixed clipping norm of a client's model update.
  dp.initial_clip_norm = 0.1  # Adaptive clipping (Andrew et al. 2021).
  dp.target_unclipped_quantile = 0.5
  dp.clip_learning_rate = 0.2
  dp.clipped_count_stddev = config_dict.placeholder(float)
  # Client weight (examples processed in a round) at which the weight is
  # capped; None: the median client's weight.
  dp.weight_cap = config_dict.placeholder(float)
  dp.accountant = 'rdp'  # rdp | pld
  # Where the noise is added. central: by the coordinator after merging the
  # silos' un-noised partial sums (the silos trust it with them). secure:
  # each silo adds its share of distributed discrete Gaussian noise and masks
  # its partial sum (secure aggregation; runtime.mode=silos, governed silos):
  # the coordinator learns only the noised sum.
  dp.placement = 'central'  # central | secure
  dp.secure_scale = 65536.0  # Integer units per unit of an update (before rounding).
  dp.max_colluding = 1  # Silos assumed able to collude with the coordinator.

  config.runtime = config_dict.ConfigDict()
  runtime = config.runtime
  runtime.mode = 'local'  # local | silos
  # mode=silos: the silos to train across, '[name=]host:port,...', and this
  # coordinator's mutual-TLS files (see docs/deploy-silo.md).
  runtime.silos = ''
  runtime.tls_ca = ''
  runtime.tls_cert = ''
  runtime.tls_key = ''
  # A silo that is down or fails: 'fail' stops with an error naming it;
  # 'drop' continues without it (logged and counted per round).
  runtime.on_silo_failure = 'fail'
  runtime.silo_round_timeout_s = 600.0
  runtime.silo_connect_timeout_s = 30.0
  runtime.min_silos_per_round = 1
  # Run the TFF worker on a host port if no private network namespace can be
  # made. It is then reachable, unauthenticated, from any network.
  runtime.allow_exposed_worker = False
  # Run the TFF worker with the host's filesystem if the kernel cannot confine
  # it to the client data (mount namespace, unprivileged user).
  runtime.allow_unconfined_worker = False
  # Clients the TFF worker trains at once: < 0 = no limit (TFF's default; best
  # for many small clients), 0 = two per CPU core (faster for large clients,
  # see fedpipe/runtime/isolated_worker.py), else the limit.
  runtime.max_concurrent_computation_calls = -1
  # How a round's users are trained. per_client: each user is a TFF client
  # (TFF's executor pays a fixed cost per client). cohort: the sampled users
  # are grouped into cohorts, each trained in one vectorized TensorFlow call
  # (fedpipe/computations/cohort_fedavg.py; DP-FedAvg, locally or across
  # silos, where a cohort holds one silo's users).
  # auto: the cohort engine (a round's users trained as cohorts, one
  # vectorized call each) where it runs (DP-FedAvg with central noise, local
  # or across silos, and a model it can vectorize), else per_client (one TFF
  # client per user).
  runtime.engine = 'auto'  # auto | cohort | per_client
  # cohort: memory for one cohort's copies of the model (weights, gradients,
  # update) per user; bounds the users in a cohort.
  runtime.cohort_memory_mb = 256
  return config


def get_default_config() -> config_dict.ConfigDict:
  """User-level DP-FedAvg that works on small populations: the settings of the digits demo.

  What `fedpipe.training.federated_training.train` uses when given no
  config (and what `configs/digits_dp.py` names `digits_dp`): fixed clipping
  at 0.3 with noise multiplier 1.76 (ε from the PLD accountant, which is
  tighter than RDP: the same ε for less noise), two local epochs at client
  learning rate 0.15 on batches of 2 examples, server momentum 0.5, one
  hidden layer of 64 tanh units for the bundled MLP on inputs centred to
  [-1, 1], 100 rounds of about 60 Poisson-sampled clients. Lower
  `training.clients_per_round` for data with fewer clients; ε follows from
  the population, the rounds and the noise (see the privacy report).

  Returns:
    A new config; change any field before training.
  """
  config = get_base_config()
  config.name = 'dp_fedavg'
  config.model.hidden_units = (64,)
  config.model.activation = 'tanh'
  config.model.center_inputs = True
  config.training.batch_size = 2
  config.training.local_epochs = 2
  config.training.client_learning_rate = 0.15
  config.training.server_momentum = 0.5
  config.dp.noise_multiplier = 1.76
  config.dp.clip_norm = 0.3
  config.dp.accountant = 'pld'
  return config

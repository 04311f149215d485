"""Synthetic credit data: a bank's users, mixed-type rows and a binary label of known law.

The bundled source `data.source='synthetic_credit'`: tabular data shaped like
what a bank holds, generated from the seed with numpy alone (nothing is
downloaded), with a label drawn from a known logistic model, so the
Bayes-optimal accuracy of any split is known (`ground_truth_accuracy`).

Population (per user, `num_users` users, keys `user_0000`, ...):

    age       integer, 18 + Gamma(shape 2.6, scale 10) rounded, clipped to [18, 90]
    region    one of REGIONS with REGION_SHARES; 'islands' is rare (0.5% of users)
    income    yearly, log-normal: ln income ~ N(10.8 + REGION_LOG_INCOME[region]
              + 0.25 a - 0.15 a^2, 0.55^2) with a = (age - 45) / 15, rounded to
              a whole amount, clipped to [5,000, 500,000]

Rows (each row is one of the user's credit lines): a user holds 3 + Binomial(12, p)
lines with p ~ Beta(0.9, 1.5) per user: 3 to 15, 3 the most common, about
7.5 on average (about 45,000 rows for 6,000 users). Per row:

    product        one of PRODUCTS with PRODUCT_SHARES
    balance        income x BALANCE_TO_INCOME[product] x LogNormal(0, 0.8^2),
                   rounded to cents, clipped to [0, 1,000,000]
    tenure_months  months the line has been open: floor(Exponential(mean 40)),
                   at most 12 (age - 18) and 600
    label          1 (the line went 90+ days past due within a year) with
                   probability sigmoid(logit), else 0

The true model (TRUE_COEFFICIENTS, TRUE_REGION_EFFECTS, TRUE_PRODUCT_EFFECTS),
on the written (rounded) values, with fixed standardization constants (not
computed from the data):

    z_age     = (age - 45) / 15
    z_income  = (ln income - 10.65) / 0.6
    z_balance = (ln(1 + balance) - 9.0) / 1.5
    z_tenure  = (tenure_months - 40) / 40

    logit = -1.3 - 1.1 z_age + 0.7 (z_age^2 - 1) - 1.8 z_income + 2.0 z_balance
            - 1.25 z_tenure + region effect + product effect

    region:  north 0, east -0.35, south +0.55, capital -0.7, west +0.2, islands +2.7
    product: card +0.9, personal_loan +0.55, auto_loan -0.35, mortgage -2.5

The young, the low earners, large balances relative to income and new lines
are riskier; the rare region is much riskier (a model that never sees its
value, e.g. because a private vocabulary dropped it, cannot learn that). For
6,000 users and seed 0: 45,012 rows, about 36% positive labels, a
Bayes-optimal accuracy of about 0.83 on the test split (the majority class:
about 0.64; a one-hidden-layer MLP of 32 units trained centrally on the
standardized columns and one-hot categories reaches about 0.83, a logistic
regression on them about 0.78).

The raw files carry `age`, `income`, `balance`, `tenure_months` (numbers) and
`region`, `product` (strings). `draft_feature_spec` is the schema-version-2
spec a data scientist declares before seeing the data: numeric columns with
their a-priori ranges (DECLARED_RANGES), no mean/std; categorical columns
with the most values one user holds, no vocabulary (a federated statistics
study computes those). `central_feature_spec` completes it from the pooled
training rows: the centralized reference for a non-private central baseline,
never used by federated runs.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedpipe.errors import FedpipeError

SOURCE = 'synthetic_credit'
# Bump when the rows or specs written for the same parameters change.
GENERATOR_VERSION = 1
CENTRAL_FEATURE_SPEC_FILENAME = 'feature_spec_central.json'
SCHEMA_VERSION = 2
CLIENT_KEY_COLUMN = 'client_id'
LABEL_COLUMN = 'label'
MAX_USERS = 200_000

NUMERIC_FEATURES = ('age', 'income', 'balance', 'tenure_months')
CATEGORICAL_FEATURES = ('region', 'product')
FEATURES = NUMERIC_FEATURES + CATEGORICAL_FEATURES
# The public, a-priori ranges of the numeric columns (what a data scientist
# declares; the generator clips to them).
DECLARED_RANGES: Mapping[str, tuple[int, int]] = {
  'age': (18, 90),
  'income': (5_000, 500_000),
  'balance': (0, 1_000_000),
  'tenure_months': (0, 600),
}
# The most distinct values of a categorical column one user holds.
MAX_VALUES_PER_USER: Mapping[str, int] = {'region': 1, 'product': 4}

REGIONS = ('north', 'east', 'south', 'capital', 'west', 'islands')
REGION_SHARES = (0.26, 0.22, 0.20, 0.18, 0.135, 0.005)
RARE_REGION = 'islands'
REGION_LOG_INCOME = (0.05, 0.0, -0.15, 0.25, -0.05, -0.3)
PRODUCTS = ('card', 'personal_loan', 'auto_loan', 'mortgage')
PRODUCT_SHARES = (0.45, 0.25, 0.18, 0.12)
BALANCE_TO_INCOME = (0.06, 0.2, 0.35, 2.5)

# (center, scale) of each standardized term of the true model.
STANDARDIZATION: Mapping[str, tuple[float, float]] = {
  'age': (45.0, 15.0),
  'log_income': (10.65, 0.6),
  'log1p_balance': (9.0, 1.5),
  'tenure_months': (40.0, 40.0),
}
TRUE_COEFFICIENTS: Mapping[str, float] = {
  'intercept': -1.3,
  'z_age': -1.1,
  'z_age_squared_minus_1': 0.7,
  'z_income': -1.8,
  'z_balance': 2.0,
  'z_tenure': -1.25,
}
TRUE_REGION_EFFECTS: Mapping[str, float] = {
  'north': 0.0,
  'east': -0.35,
  'south': 0.55,
  'capital': -0.7,
  'west': 0.2,
  'islands': 2.7,
}
TRUE_PRODUCT_EFFECTS: Mapping[str, float] = {
  'card': 0.9,
  'personal_loan': 0.55,
  'auto_loan': -0.35,
  'mortgage': -2.5,
}


class SyntheticCreditError(FedpipeError, ValueError):
  """The synthetic credit data cannot be generated or scored as asked."""


@dataclasses.dataclass(frozen=True)
class CreditRows:
  """Rows of synthetic credit data, one array entry per row.

  Attributes:
    user: Index of the row's user, in [0, num_users).
    age: Age of the user (integer-valued).
    income: Yearly income of the user (integer-valued).
    balance: Balance of the line (cents).
    tenure_months: Months the line has been open (integer-valued).
    region: Region of the user (strings).
    product: Product of the line (strings).
    label: 0 or 1.
    probability: The true P(label = 1 | features).
  """

  user: np.ndarray
  age: np.ndarray
  income: np.ndarray
  balance: np.ndarray
  tenure_months: np.ndarray
  region: np.ndarray
  product: np.ndarray
  label: np.ndarray
  probability: np.ndarray

  def __len__(self) -> int:
    return len(self.label)

  def take(self, rows: np.ndarray) -> CreditRows:
    """The rows at the indices `rows`, in that order."""
    return CreditRows(**{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)})


@dataclasses.dataclass(frozen=True)
class GroundTruth:
  """How the true model does on a set of rows.

  Attributes:
    num_rows: Rows scored.
    positive_rate: Share of rows with label 1.
    bayes_accuracy: Accuracy of the Bayes-optimal rule (label 1 iff the true
      probability > 0.5) against the drawn labels.
    expected_bayes_accuracy: Its expectation over the label draws, the mean
      of max(p, 1 - p): the same, without the labels' sampling noise.
    bayes_log_loss: Mean negative log-likelihood of the labels under the
      true model (the best log loss a model can expect).
  """

  num_rows: int
  positive_rate: float
  bayes_accuracy: float
  expected_bayes_accuracy: float
  bayes_log_loss: float


def random_generators(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
  """Independent generators of the population and of the split/row order, from `seed`."""
  population, split = np.random.SeedSequence(int(seed)).spawn(2)
  return np.random.default_rng(population), np.random.default_rng(split)


def true_logit(
  *,
  age: np.ndarray,
  income: np.ndarray,
  balance: np.ndarray,
  tenure_months: np.ndarray,
  region: Sequence[str] | np.ndarray,
  product: Sequence[str] | np.ndarray,
) -> np.ndarray:
  """The true model's logit of P(label = 1) (see the module docstring).

  Args:
    age: Ages.
    income: Incomes (> 0).
    balance: Balances (>= 0).
    tenure_months: Tenures in months.
    region: Region names, each one of REGIONS.
    product: Product names, each one of PRODUCTS.

  Returns:
    A float array, one logit per row.

  Raises:
    SyntheticCreditError: If a region or product is not one of the known values.
  """
  c = TRUE_COEFFICIENTS
  z_age = _standardize(np.asarray(age, dtype=np.float64), 'age')
  z_income = _standardize(np.log(np.asarray(income, dtype=np.float64)), 'log_income')
  z_balance = _standardize(np.log1p(np.asarray(balance, dtype=np.float64)), 'log1p_balance')
  z_tenure = _standardize(np.asarray(tenure_months, dtype=np.float64), 'tenure_months')
  return (
    c['intercept']
    + c['z_age'] * z_age
    + c['z_age_squared_minus_1'] * (z_age**2 - 1.0)
    + c['z_income'] * z_income
    + c['z_balance'] * z_balance
    + c['z_tenure'] * z_tenure
    + _effects(region, TRUE_REGION_EFFECTS, 'region')
    + _effects(product, TRUE_PRODUCT_EFFECTS, 'product')
  )


def generate(num_users: int, rng: np.random.Generator) -> CreditRows:
  """Draws the population and its rows (see the module docstring).

  Args:
    num_users: Number of users, in [1, MAX_USERS].
    rng: The population's generator (`random_generators(seed)[0]`).

  Returns:
    All rows, grouped by user in user order.

  Raises:
    SyntheticCreditError: If `num_users` is out of range.
  """
  if (
    isinstance(num_users, bool) or not isinstance(num_users, int) or not 1 <= num_users <= MAX_USERS
  ):
    raise SyntheticCreditError(
      f'data.num_clients={num_users!r} is the number of synthetic_credit users; it must be an '
      f'integer in [1, {MAX_USERS}].'
    )
  n = num_users
  low, high = DECLARED_RANGES['age']
  age = np.clip(np.rint(low + rng.gamma(2.6, 10.0, n)), low, high)
  region_index = rng.choice(len(REGIONS), size=n, p=np.asarray(REGION_SHARES))
  a = (age - 45.0) / 15.0
  log_income = (
    10.8
    + np.asarray(REGION_LOG_INCOME)[region_index]
    + 0.25 * a
    - 0.15 * a**2
    + rng.normal(0.0, 0.55, n)
  )
  income = np.clip(np.rint(np.exp(log_income)), *DECLARED_RANGES['income'])

  rows_per_user = 3 + rng.binomial(12, rng.beta(0.9, 1.5, n))
  user = np.repeat(np.arange(n), rows_per_user)
  m = len(user)
  product_index = rng.choice(len(PRODUCTS), size=m, p=np.asarray(PRODUCT_SHARES))
  ratio = np.asarray(BALANCE_TO_INCOME)[product_index] * np.exp(rng.normal(0.0, 0.8, m))
  balance = np.clip(np.round(income[user] * ratio, 2), *DECLARED_RANGES['balance'])
  tenure_cap = np.minimum(12.0 * (age[user] - low), DECLARED_RANGES['tenure_months'][1])
  tenure_months = np.minimum(np.floor(rng.exponential(40.0, m)), tenure_cap)

  region = np.asarray(REGIONS, dtype=object)[region_index][user]
  product = np.asarray(PRODUCTS, dtype=object)[product_index]
  logit = true_logit(
    age=age[user],
    income=income[user],
    balance=balance,
    tenure_months=tenure_months,
    region=region,
    product=product,
  )
  probability = 1.0 / (1.0 + np.exp(-logit))
  label = (rng.random(m) < probability).astype(np.int64)
  return CreditRows(
    user=user,
    age=age[user],
    income=income[user],
    balance=balance,
    tenure_months=tenure_months,
    region=region,
    product=product,
    label=label,
    probability=probability,
  )


def keep_a_training_row(is_test: np.ndarray, user: np.ndarray) -> np.ndarray:
  """Moves back to training the first test row of each user left with no training row.

  Args:
    is_test: Boolean test mask of the rows.
    user: Each row's user.

  Returns:
    A new mask under which every user holds at least one training row.
  """
  is_test = np.array(is_test, dtype=bool)
  if not len(user):
    return is_test
  users, first_row = np.unique(user, return_index=True)
  train_counts = np.bincount(user[~is_test], minlength=int(users.max()) + 1)
  is_test[first_row[train_counts[users] == 0]] = False
  return is_test


def draft_feature_spec() -> dict[str, Any]:
  """The schema-version-2 draft spec: declared ranges and per-user bounds, no statistics."""
  features: list[dict[str, Any]] = []
  for name in NUMERIC_FEATURES:
    low, high = DECLARED_RANGES[name]
    features.append({'name': name, 'type': 'numeric', 'min': low, 'max': high})
  for name in CATEGORICAL_FEATURES:
    features.append(
      {'name': name, 'type': 'categorical', 'max_values_per_user': MAX_VALUES_PER_USER[name]}
    )
  return {
    'schema_version': SCHEMA_VERSION,
    'client_key': CLIENT_KEY_COLUMN,
    'label': {'name': LABEL_COLUMN, 'task': 'binary'},
    'features': features,
  }


def central_feature_spec(train: CreditRows) -> dict[str, Any]:
  """The draft completed from the pooled training rows (the centralized reference).

  Each numeric feature gets the mean and (population) standard deviation of
  its training values, each categorical one the sorted set of its training
  values. For the non-private central baseline only: a federated run never
  pools rows.

  Args:
    train: The training rows.

  Returns:
    The spec as a JSON-ready dict.

  Raises:
    SyntheticCreditError: If there are no training rows.
  """
  if not len(train):
    raise SyntheticCreditError('no training rows to compute the central feature spec from.')
  spec = draft_feature_spec()
  for feature in spec['features']:
    values = getattr(train, feature['name'])
    if feature['type'] == 'numeric':
      std = float(np.std(values))
      feature['mean'] = float(np.mean(values))
      feature['std'] = std if std > 0 else 1.0
    else:
      feature['vocabulary'] = sorted({str(v) for v in values})
  return spec


def write_json(path: str, data: Mapping[str, Any]) -> None:
  """Writes `data` as indented JSON with a final newline."""
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(data, f, indent=2)
    f.write('\n')


def write_rows(path: str, raw_format: str, rows: CreditRows, keys: Sequence[str]) -> None:
  """Writes rows as CSV (with a header) or JSONL, in the given order.

  Args:
    path: The output file.
    raw_format: 'csv' or 'jsonl'.
    rows: The rows.
    keys: Client key of each user index.
  """
  columns = [CLIENT_KEY_COLUMN, LABEL_COLUMN, *FEATURES]
  with open(path, 'w', encoding='utf-8', newline='') as f:
    writer = csv.writer(f, lineterminator='\n') if raw_format == 'csv' else None
    if writer is not None:
      writer.writerow(columns)
    for i in range(len(rows)):
      values = [
        keys[rows.user[i]],
        int(rows.label[i]),
        int(rows.age[i]),
        int(rows.income[i]),
        _number(rows.balance[i]),
        int(rows.tenure_months[i]),
        str(rows.region[i]),
        str(rows.product[i]),
      ]
      if writer is not None:
        writer.writerow(values)
      else:
        f.write(json.dumps(dict(zip(columns, values))) + '\n')


def read_rows(path: str) -> tuple[list[str], CreditRows]:
  """Reads rows written by `write_rows` (CSV or JSONL, by the file's extension).

  Args:
    path: A `.csv` or `.jsonl` file with the columns of this source.

  Returns:
    The client key of each row, and the rows (`user` is the row's index in
    the file's distinct keys, in order of first appearance; `probability`
    is the true model's).

  Raises:
    SyntheticCreditError: If the file cannot be read or lacks a column.
  """
  columns = [CLIENT_KEY_COLUMN, LABEL_COLUMN, *FEATURES]
  try:
    with open(path, encoding='utf-8', newline='') as f:
      if path.endswith('.jsonl'):
        records = [json.loads(line) for line in f if line.strip()]
      else:
        records = list(csv.DictReader(f))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise SyntheticCreditError(
      f'cannot read {path!r} ({type(e).__name__}: {e}); give the test file fedpipe-make-data '
      'wrote for data.source=synthetic_credit.'
    ) from e
  for i, record in enumerate(records):
    missing = [c for c in columns if not isinstance(record, Mapping) or c not in record]
    if missing:
      raise SyntheticCreditError(
        f'{path}: row {i + 1} lacks column(s) {missing}; this is not a synthetic_credit file.'
      )
  keys = [str(r[CLIENT_KEY_COLUMN]) for r in records]
  index: dict[str, int] = {}
  user = np.array([index.setdefault(k, len(index)) for k in keys], dtype=np.int64)
  try:
    numbers = {
      name: np.array([float(r[name]) for r in records], dtype=np.float64)
      for name in (LABEL_COLUMN, *NUMERIC_FEATURES)
    }
  except (TypeError, ValueError) as e:
    raise SyntheticCreditError(f'{path}: a label or numeric value is not a number ({e}).') from e
  region = np.array([str(r['region']) for r in records], dtype=object)
  product = np.array([str(r['product']) for r in records], dtype=object)
  logit = true_logit(
    age=numbers['age'],
    income=numbers['income'],
    balance=numbers['balance'],
    tenure_months=numbers['tenure_months'],
    region=region,
    product=product,
  )
  return keys, CreditRows(
    user=user,
    age=numbers['age'],
    income=numbers['income'],
    balance=numbers['balance'],
    tenure_months=numbers['tenure_months'],
    region=region,
    product=product,
    label=numbers[LABEL_COLUMN].astype(np.int64),
    probability=1.0 / (1.0 + np.exp(-logit)),
  )


def score(rows: CreditRows) -> GroundTruth:
  """How the true model does on `rows` (see `GroundTruth`).

  Raises:
    SyntheticCreditError: If there are no rows.
  """
  if not len(rows):
    raise SyntheticCreditError('no rows to score the true model on.')
  p, y = rows.probability, rows.label
  likelihood = np.where(y == 1, p, 1.0 - p)
  return GroundTruth(
    num_rows=len(rows),
    positive_rate=float(np.mean(y)),
    bayes_accuracy=float(np.mean((p > 0.5) == (y == 1))),
    expected_bayes_accuracy=float(np.mean(np.maximum(p, 1.0 - p))),
    bayes_log_loss=float(-np.mean(np.log(np.maximum(likelihood, 1e-300)))),
  )


def ground_truth_accuracy(test_file: str) -> GroundTruth:
  """The Bayes-optimal accuracy (and more) on a written split, from the known model.

  Args:
    test_file: A file written for data.source=synthetic_credit (its
      `test.csv` or `test.jsonl`, or the training file).

  Returns:
    The true model's scores on the file's rows: a model trained on this data
    cannot beat `bayes_accuracy` but by chance.

  Raises:
    SyntheticCreditError: If the file cannot be read, is not of this source,
      or is empty.
  """
  if not os.path.isfile(test_file):
    raise SyntheticCreditError(
      f'{test_file!r} does not exist; run fedpipe-make-data with data.source=synthetic_credit '
      'and give its test file (data.eval_files).'
    )
  return score(read_rows(test_file)[1])


def _standardize(values: np.ndarray, name: str) -> np.ndarray:
  center, scale = STANDARDIZATION[name]
  return (values - center) / scale


def _effects(
  values: Sequence[str] | np.ndarray, table: Mapping[str, float], field: str
) -> np.ndarray:
  try:
    return np.array([table[str(v)] for v in values], dtype=np.float64)
  except KeyError as e:
    raise SyntheticCreditError(
      f'{field}={e.args[0]!r} is not a synthetic_credit {field}; expected one of {sorted(table)}.'
    ) from None


def _number(value: float) -> int | float:
  value = float(value)
  return int(value) if value.is_integer() else value

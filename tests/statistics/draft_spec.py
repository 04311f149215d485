"""The draft feature spec the statistics tests share: two bounded numerics, two categoricals."""

SPEC = {
  'schema_version': 2,
  'client_key': 'user',
  'label': {'name': 'y', 'task': 'binary'},
  'features': [
    {'name': 'age', 'type': 'numeric', 'min': 18.0, 'max': 100.0},
    {'name': 'income', 'type': 'numeric', 'min': 0.0, 'max': 200.0},
    {'name': 'region', 'type': 'categorical', 'max_values_per_user': 1},
    {'name': 'device', 'type': 'categorical', 'max_values_per_user': 2},
  ],
}
COLUMNS = ['user', 'age', 'income', 'region', 'device', 'y']

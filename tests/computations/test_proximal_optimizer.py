"""FedProx as a client optimizer: the proximal term pulls towards the round's model."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from fedpipe.computations import proximal_optimizer
from fedpipe.errors import FedpipeError


def _train(optimizer, steps, gradient):
  """`steps` steps from w0 = [1, 1] with a constant loss gradient; the final weights."""
  weights = (tf.constant([1.0, 1.0]),)
  state = optimizer.initialize((tf.TensorSpec([2], tf.float32),))
  for _ in range(steps):
    state, weights = optimizer.next(state, weights, (tf.constant(gradient),))
  return weights[0].numpy()


def test_the_proximal_term_pulls_the_local_model_back_to_where_the_round_started():
  sgd = tff.learning.optimizers.build_sgdm(learning_rate=0.1)
  plain = _train(sgd, 50, [1.0, -2.0])
  prox = _train(proximal_optimizer.ProximalOptimizer(sgd, 1.0), 100, [1.0, -2.0])
  # Gradient g and pull mu (w - w0): the local optimum is w0 - g / mu = [0, 3],
  # approached as 0.9^steps.
  np.testing.assert_allclose(plain, [1 - 5.0, 1 + 10.0], rtol=1e-5)
  np.testing.assert_allclose(prox, [0.0, 3.0], atol=1e-2)
  assert np.linalg.norm(prox - 1) < np.linalg.norm(plain - 1)


def test_the_first_step_is_the_wrapped_optimizers_and_hparams_pass_through():
  sgdm = tff.learning.optimizers.build_sgdm(learning_rate=0.5, momentum=0.9)
  prox = proximal_optimizer.ProximalOptimizer(sgdm, 3.0)
  state = prox.initialize((tf.TensorSpec([2], tf.float32),))
  assert prox.get_hparams(state) == sgdm.get_hparams(sgdm.initialize((tf.TensorSpec([2]),)))
  state = prox.set_hparams(state, {'learning_rate': 0.25, 'momentum': 0.9})
  _, weights = prox.next(state, (tf.constant([1.0, 1.0]),), (tf.constant([1.0, 1.0]),))
  np.testing.assert_allclose(weights[0].numpy(), [0.75, 0.75])  # At w0 the pull is 0.


@pytest.mark.parametrize('mu', [0, 0.0, -1.0, True, 'strong'])
def test_a_bad_proximal_strength_is_named(mu):
  with pytest.raises(FedpipeError, match='proximal_strength'):
    proximal_optimizer.ProximalOptimizer(tff.learning.optimizers.build_sgdm(), mu)

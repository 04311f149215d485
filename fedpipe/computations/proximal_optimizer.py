"""FedProx's local objective as a client optimizer: a pull towards the round's starting model.

FedProx (Li et al., MLSys 2020) trains each client on its loss plus
`mu / 2 * ||w - w0||^2`, where w0 is the global model the round started
from; the term's gradient, `mu * (w - w0)`, pulls the local model back
towards w0. TFF 0.87's proximal client work
(`tff.learning.templates.proximal_client_work`) adds `mu * (w0 - w)`
instead, which pushes the local model away from w0 (the stronger `mu`, the
larger the update): fedpipe does not use it.

`ProximalOptimizer` wraps any TFF optimizer: the weights of its first step
are w0 (TFF's local training loop starts every client at the global model),
and every step's gradient gets `mu * (w - w0)` added before the wrapped
optimizer applies it. It runs inside TFF's ordinary model-delta client work,
so FedProx and FedAvg share one training loop.

Reference: Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith. Federated
Optimization in Heterogeneous Networks. MLSys 2020.
https://arxiv.org/abs/1812.06127
"""

from __future__ import annotations

import collections
from typing import Any

import tensorflow as tf
import tensorflow_federated as tff

from fedpipe.errors import FedpipeError

_INNER = 'inner'
_ANCHOR = 'anchor'
_ANCHORED = 'anchored'


class ProximalOptimizerError(FedpipeError, ValueError):
  """A FedProx parameter is out of range; the message names it."""


class ProximalOptimizer(tff.learning.optimizers.Optimizer):
  """`optimizer` on FedProx's objective: each gradient gets `mu * (w - w0)` added."""

  def __init__(self, optimizer: tff.learning.optimizers.Optimizer, proximal_strength: float):
    """Wraps `optimizer`.

    Args:
      optimizer: The client optimizer that applies the gradients.
      proximal_strength: FedProx's mu (> 0).

    Raises:
      ProximalOptimizerError: If `proximal_strength` is not a number > 0.
    """
    if (
      isinstance(proximal_strength, bool)
      or not isinstance(proximal_strength, int | float)
      or not proximal_strength > 0
    ):
      raise ProximalOptimizerError(
        f'proximal_strength must be a number > 0 (use the optimizer itself for 0), '
        f'got {proximal_strength!r}'
      )
    self._inner = optimizer
    self._mu = float(proximal_strength)

  def initialize(self, specs: Any) -> collections.OrderedDict:
    return collections.OrderedDict(
      [
        (_INNER, self._inner.initialize(specs)),
        (_ANCHOR, tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), specs)),
        (_ANCHORED, tf.constant(False)),
      ]
    )

  def next(self, state, weights, gradients):
    anchor = tf.nest.map_structure(
      lambda a, w: tf.where(state[_ANCHORED], a, w), state[_ANCHOR], weights
    )
    gradients = tf.nest.map_structure(
      lambda g, w, a: g + tf.cast(self._mu, g.dtype) * (w - a), gradients, weights, anchor
    )
    inner_state, weights = self._inner.next(state[_INNER], weights, gradients)
    return (
      collections.OrderedDict(
        [(_INNER, inner_state), (_ANCHOR, anchor), (_ANCHORED, tf.constant(True))]
      ),
      weights,
    )

  def get_hparams(self, state) -> collections.OrderedDict:
    return self._inner.get_hparams(state[_INNER])

  def set_hparams(self, state, hparams) -> collections.OrderedDict:
    updated = collections.OrderedDict(state)
    updated[_INNER] = self._inner.set_hparams(state[_INNER], hparams)
    return updated

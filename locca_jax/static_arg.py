"""A Flax module (and the mesh it runs on) as one static `jax.jit` argument. No TensorFlow.

A linen module holds dicts (its config), so it is not hashable itself; wrapped, it hashes and
compares by its repr, so modules with the same attributes share compiled code and repeated
calls (the trainer evaluates every log_steps) reuse it instead of tracing anew.
"""
from typing import Any


class StaticModel:
  """`model` (any object whose repr describes it fully) and an optional hashable `mesh`."""

  def __init__(self, model: Any, mesh: Any = None):
    self.model, self.mesh = model, mesh
    self._key = (repr(model), mesh)

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, StaticModel) and other._key == self._key  # pylint: disable=protected-access

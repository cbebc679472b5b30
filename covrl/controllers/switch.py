"""One controller that runs one of several, chosen by a (possibly traced) index.

A comparison of several controllers (and, with traced gains, of a grid of gains) is then one
compiled program, vmapped over the index: `switch(index, branches)` carries a tuple of the
branches' own states and `lax.switch` updates the chosen one.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from covrl import _checks
from covrl.controllers.base import REPORT_FIELDS, Controller


class SwitchState(NamedTuple):
  """State of `switch`: the chosen branch and every branch's own state.

  The report fields (count, coef, target, error, predicted, saturated, nonfinite) read those of
  the chosen branch.
  """

  index: jax.Array
  states: tuple

  def _chosen(self, name: str) -> jax.Array:
    values = jnp.stack([jnp.asarray(getattr(s, name)) for s in self.states])
    return values[self.index]


# The report fields read those of the chosen branch.
for _name in REPORT_FIELDS:
  setattr(SwitchState, _name, property(lambda self, name=_name: self._chosen(name)))


def switch(index: Any, branches: list[Controller] | tuple[Controller, ...]) -> Controller:
  """One controller that runs `branches[index]`, `index` a (possibly traced) int.

  Under vmap every branch runs and its result is selected, so a predictive branch evaluates
  `predict` in every lane.

  Args:
    index: which branch, in [0, len(branches)).
    branches: controllers with the same coef_range.

  Returns:
    A Controller (needs_prediction if any branch needs it) whose state is a SwitchState.
  """
  branches = tuple(branches)
  if not branches or not all(isinstance(b, Controller) for b in branches):
    raise TypeError("branches must be a non-empty sequence of Controllers.")
  ranges = {b.coef_range for b in branches}
  if len(ranges) != 1:
    raise ValueError(f"the branches must share one coef_range, got {sorted(ranges)}.")
  sizes = {b.vocab_size for b in branches} - {None}
  if len(sizes) > 1:
    raise ValueError(f"the branches were built for different vocab sizes {sorted(sizes)}.")
  i = jnp.asarray(index, jnp.int32)
  if _checks.is_concrete(i) and not 0 <= int(i) < len(branches):
    raise ValueError(f"index must lie in [0, {len(branches)}), got {int(i)}.")

  def init() -> SwitchState:
    return SwitchState(i, tuple(b.init() for b in branches))

  def update(state: SwitchState, entropy, predict=None):
    def run(k):
      def branch(states, h):
        coef, new = branches[k].update(states[k], h, predict)
        return coef, (*states[:k], new, *states[k + 1:])

      return branch

    coef, states = jax.lax.switch(state.index, [run(k) for k in range(len(branches))],
                                  state.states, entropy)
    return coef, SwitchState(state.index, states)

  return Controller(init, update, "switch", branches[0].coef_range,
                    next(iter(sizes), None), any(b.needs_prediction for b in branches))

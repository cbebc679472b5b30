"""The base of every control value: `Control`, its hooks, the registry and shared checks."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from covrl import _checks
from covrl import schedules as sch
from covrl import selection as sel
from covrl._pytree import value_class
from covrl.tokens import PolicyTokens, Surrogate, clipped_surrogate, log_ratio, ratio

#: The registered control methods, name -> class (`covrl.method(name, **fields)` builds one).
METHODS: dict[str, type[Control]] = {}


def register(name: str, static: tuple[str, ...] = ()):
  """Class decorator: a frozen dataclass registered as a pytree and as method `name`."""

  def wrap(cls):
    cls = dataclasses.dataclass(frozen=True)(cls)
    cls.name = name
    own_check = getattr(cls, "__post_init__", None)  # its own, or the one it inherits

    def post_init(self):
      if type(self) is cls:  # once, by the registration of the value's own class (a subclass's
        check_field_types(self)  # own check may call this one through super())
      if own_check is not None:
        own_check(self)

    cls.__post_init__ = post_init
    value_class(cls, static=static)
    METHODS[name] = cls
    return cls

  return wrap


def check_field_types(value: Control) -> None:
  """The type check every control value runs first, on each of its numeric fields.

  A numeric field (one whose default is a number or None, or that has no default) holds a
  number or a scalar array (`covrl._checks.number`: a string, a bool or an array with a shape
  raises TypeError / ValueError naming the field), a schedule (a callable, which the class
  checks), or None where None means "off" (a default of None, or a field in `nullable`). The
  fields whose default is a string (`selection`, `mapping`, `band`) are checked by the class.
  """
  nullable = {n for c in type(value).__mro__ for n in vars(c).get("nullable", ())}
  for f in dataclasses.fields(value):
    default, v = f.default, getattr(value, f.name)
    if isinstance(default, str) or callable(v):
      continue
    if v is None and (default is None or f.name in nullable):
      continue
    _checks.number(f.name, v)


def check_coefficient(name: str, value: Any) -> None:
  if isinstance(value, sch.PowerDecay) or callable(value):
    return  # a PowerDecay checks itself; other schedules are checked where evaluated
  _checks.check_nonnegative(name, value)


def check_ratio(name: str, value: Any, max_ratio: Any) -> None:
  if callable(value):
    if max_ratio is None and sch.upper_bound(value) is None:
      raise ValueError(f"a scheduled {name} needs max_ratio (a static bound on its values), "
                       "unless it is a covrl.schedules.PowerDecay (its first value bounds it).")
  else:
    _checks.check_fraction(name, value)


def check_count_options(value) -> None:
  if isinstance(value.min_count, bool) or not isinstance(value.min_count, int) or (
      value.min_count < 0):
    raise ValueError(f"min_count must be an int >= 0, got {value.min_count!r}.")
  if value.max_ratio is not None:
    _checks.check_fraction("max_ratio", value.max_ratio)
  if value.selection not in ("global", "local"):
    raise ValueError(f"selection must be 'global' or 'local', got {value.selection!r}.")
  mbs = value.micro_batch_size
  if mbs is not None:
    if value.selection != "local":
      raise ValueError("micro_batch_size only applies to selection='local'.")
    _checks.check_int("micro_batch_size", mbs, 1)


class Control:
  """Base of the control values (see the module docstring).

  Attributes:
    name: the registry name ("kl_cov").
    strength: the field a controller or a sweep sets (None: the method has none).
    needs_key: its selection is random (Clip-Cov): the loss takes `key=`.
    selects_tokens: it acts on a selection of the sampled tokens (its `select` and
      `loss_change`), which `covrl.transform` applies to samples.
    reweights_tokens: it changes the loss of the sampled tokens through `loss_change` without a
      selection (advantage shaping, token weights), which `covrl.transform` applies to samples.
    needs_logits: its loss needs the full-vocabulary logits (`logits=`).
    needs_entropy: it reads each token's entropy (`PolicyTokens.entropy`): the loss needs
      `logits=` or `entropy=`.
    coefficient_field: its loss coefficient (a number >= 0 or a schedule), if it has one.
    ratio_field: its fraction of tokens (which sets the selection count), if it has one.
  """

  name: ClassVar[str] = "control"
  strength: ClassVar[str | None] = None
  needs_key: ClassVar[bool] = False
  selects_tokens: ClassVar[bool] = False
  reweights_tokens: ClassVar[bool] = False
  needs_logits: ClassVar[bool] = False
  needs_entropy: ClassVar[bool] = False
  coefficient_field: ClassVar[str | None] = None
  ratio_field: ClassVar[str | None] = None
  #: The range of each schedulable field whose range is not "finite and >= 0" (a fraction's
  #: [0, 1], STEER's (0, 1]): `value_of` checks a schedule's value against it at each step.
  ranges: ClassVar[dict[str, sch.Range]] = {}

  # ------------------------------------------------------------------ strength and schedules
  def replace(self, **fields: Any) -> Control:
    """This value with `fields` replaced, not validated (for traced or per-step values)."""
    names = {f.name for f in dataclasses.fields(self)}
    unknown = set(fields) - names
    if unknown:
      raise ValueError(f"{type(self).__name__} has no fields {sorted(unknown)}.")
    out = object.__new__(type(self))
    for name in names:
      object.__setattr__(out, name, fields.get(name, getattr(self, name)))
    return out

  def with_strength(self, value: Any) -> Control:
    """This value with its strength field set to `value` (a number, traced scalar or schedule).

    Not validated (a controller passes traced values); the strength's range is the caller's.
    """
    if self.strength is None:
      raise ValueError(f"{type(self).__name__} has no strength to set.")
    return self.replace(**{self.strength: value})

  def range_of(self, name: str) -> sch.Range:
    """The values field `name` accepts: its entry in `ranges`; for the ratio field [0, b] with b
    the static bound on the selected share (`max_ratio`, else the schedule's own bound, else 1);
    else finite and >= 0."""
    if name == self.ratio_field:
      bound = getattr(self, "max_ratio", None)
      bound = sch.upper_bound(getattr(self, name)) if bound is None else bound
      return sch.Range(0.0, 1.0 if bound is None else min(1.0, float(bound)))
    return self.ranges.get(name, sch.NONNEGATIVE)

  def value_of(self, name: str, step: jax.Array | int | None) -> Any:
    """Field `name`'s value at `step`: a number as it is, a schedule evaluated and checked
    against the field's range (`range_of`; see `covrl.schedules.value_at`: a concrete value
    outside raises, a traced one is clamped into it)."""
    return sch.value_at(getattr(self, name), step, name, self.range_of(name))

  def strength_at(self, step: jax.Array | int | None) -> Any:
    """The strength's value at `step` (its schedule evaluated and checked; a number as it is)."""
    if self.strength is None:
      raise ValueError(f"{type(self).__name__} has no strength.")
    return self.value_of(self.strength, step)

  @property
  def annealed(self) -> bool:
    """True when the strength follows a (non-constant) schedule."""
    return self.strength is not None and sch.is_annealed(getattr(self, self.strength))

  @property
  def label(self) -> str:
    """Short name for tables: the method name, with "_annealed" for a scheduled strength."""
    return self.name + ("_annealed" if self.annealed else "")

  # ------------------------------------------------------------------ the token-loss hooks
  def surrogate(self, tokens: PolicyTokens) -> Surrogate:
    """The per-token policy loss before any selection, and where PPO's clips bind."""
    raise NotImplementedError

  def select(self, tokens: PolicyTokens, cov: jax.Array, surrogate: Surrogate, *,
             key: jax.Array | None = None, step: Any = None, axis_name: str | None = None,
             row_offset: Any = 0) -> sel.Selection:
    """The tokens this method acts on (default: none).

    Called on the whole batch (or, under shard_map, this device's shard with `axis_name`), or
    by verl's local mode on one group of rows; `cov` is the pooled c_i of what it is given and
    `row_offset` the index of its first row in the global batch.
    """
    del cov, surrogate, key, step, axis_name, row_offset
    return sel.empty_selection(tokens.valid.shape)

  def loss_change(self, tokens: PolicyTokens, surrogate: Surrogate, selection: sel.Selection,
                  *, step: Any = None, axis_name: str | None = None) -> jax.Array | None:
    """The [B, T] change the method makes to the surrogate's token loss (None: no change).

    The token loss is `surrogate.loss + loss_change`; `covrl.transform` applies the gradient of
    the change's token mean to logit parameters. `axis_name` (under shard_map) lets a change
    that depends on a batch statistic (STEER's largest predicted entropy change) make it global.
    """
    del tokens, surrogate, selection, step, axis_name
    return None

  def token_loss(self, tokens: PolicyTokens, surrogate: Surrogate, selection: sel.Selection,
                 *, step: Any = None, axis_name: str | None = None) -> jax.Array:
    """The [B, T] token loss: the surrogate plus the method's change."""
    change = self.loss_change(tokens, surrogate, selection, step=step, axis_name=axis_name)
    return surrogate.loss if change is None else surrogate.loss + change

  def bonus_coefficient(self, step: Any = None) -> Any:
    """The entropy-bonus coefficient at `step`, or None when the method adds no bonus."""
    del step
    return None

  def touched(self, tokens: PolicyTokens, surrogate: Surrogate,
              selection: sel.Selection) -> jax.Array:
    """[B, T] bool: the valid tokens whose loss this method changes (none by default)."""
    del surrogate, selection
    return jnp.zeros(tokens.valid.shape, bool)

  def check_call(self, *, key: Any, step: Any, has_logits: bool, has_selected: bool,
                 has_weights: bool = False) -> None:
    """Raise before tracing when a loss call lacks what this method needs (`has_weights`: the
    call is over a weighted population, whose selections take no draw)."""
    del key, step, has_logits, has_selected, has_weights

  def ppo_kl_terms(self, tokens: PolicyTokens) -> jax.Array:
    """[B, T] per-token terms whose mean over valid tokens is verl's `ppo_kl` metric for this
    loss (0 at unused tokens). Default, verl's vanilla loss: log pi_old - log pi with the
    log-ratio clamped to [-20, 20]."""
    return -log_ratio(tokens)


class PPOClip:
  """The clip range of PPO's surrogate, verl's names: clip_ratio, overridden per side."""

  #: Numeric fields that may be None (it switches that part of the loss off) although their
  #: default is a number (`check_field_types`).
  nullable: ClassVar[tuple[str, ...]] = ("clip_ratio", "clip_ratio_c")

  def clip_range(self) -> tuple[Any, Any]:
    low = self.clip_ratio if self.clip_ratio_low is None else self.clip_ratio_low
    high = self.clip_ratio if self.clip_ratio_high is None else self.clip_ratio_high
    return low, high

  def _check_clip(self) -> None:
    if self.clip_ratio is None:
      return
    low, high = self.clip_range()
    _checks.check_fraction("clip_ratio_low", low)
    _checks.check_nonnegative("clip_ratio_high", high)
    lo, hi = _checks.concrete_float(low), _checks.concrete_float(high)
    if lo is not None and hi is not None and hi < lo:
      raise ValueError(f"clip_ratio_high must be >= clip_ratio_low (the clip-higher direction), "
                       f"got {hi!r} < {lo!r}.")
    c = getattr(self, "clip_ratio_c", None)
    if c is not None:
      v = _checks.concrete_float(c)
      if v is not None and not v > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 for the dual clip, got {v!r}.")

  def _ppo_surrogate(self, tokens: PolicyTokens, dual: bool) -> Surrogate:
    if self.clip_ratio is None:  # unclipped importance-weighted policy gradient
      return Surrogate(-tokens.advantages * ratio(tokens), None, None)
    low, high = self.clip_range()
    loss, clipped = clipped_surrogate(tokens.advantages, ratio(tokens), low, high)
    c = getattr(self, "clip_ratio_c", None) if dual else None
    if c is None:
      return Surrogate(loss, clipped, None)
    adv = tokens.advantages
    floor = -adv * c
    lower = (loss > floor) & (adv < 0)
    return Surrogate(jnp.where(adv < 0, jnp.minimum(loss, floor), loss), clipped, lower)


def check_control(control: Any) -> Control:
  """Raise TypeError unless `control` is a covrl control value."""
  if not isinstance(control, Control):
    raise TypeError(f"control must be a covrl control value ({', '.join(sorted(METHODS))}: "
                    f"covrl.NoControl(), covrl.KLCov(), ...), got {type(control).__name__}.")
  return control


def method(name: str, **fields: Any) -> Control:
  """The control value of the method registered as `name`, built from `fields`."""
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; registered: {sorted(METHODS)}.")
  return METHODS[name](**fields)

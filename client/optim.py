"""Optimizers that apply gradients to a dict of numpy parameters, in place.

The gradient service returns exact summed gradients as plain numpy arrays, so
the client needs a way to turn them into parameter updates without pulling in
a deep-learning framework.  The update rules follow PyTorch's
``torch.optim.SGD``, ``Adam`` and ``AdamW`` so hyperparameters and results
carry over from code people already know.

Conventions:

* Parameters are a ``dict[str, np.ndarray]`` of floating arrays.  ``step``
  modifies those very arrays, so anything else holding them (a model, a graph
  feed) sees the new values without copying.
* Arithmetic stays in each parameter's dtype: float32 parameters and their
  slot arrays stay float32, and gradients are cast to the parameter's dtype.
* ``state_dict`` is plain Python and numpy (plain numbers and arrays that ``np.savez`` stores).  It
  holds the step count, hyperparameters, learning rate schedule and copies of
  the slot arrays, but not the parameters themselves, which are saved with the
  model as in PyTorch.
* A learning rate is a :class:`Schedule`; the rate used by a step is
  ``schedule(t)`` where ``t`` is the number of steps already taken.
* Parameter groups (``groups=[{"params": ["b1", "b2"], "weight_decay": 0.0}]``)
  give some parameters their own hyperparameters and learning rate, as
  PyTorch's param groups do; parameters in no group use the constructor's.
  A group's float ``lr`` follows the optimizer's schedule, scaled by
  ``lr / schedule.base_lr``; a group may also have a Schedule of its own.
* ``clip_grad_norm=c`` rescales all gradients together by
  ``c / (norm + 1e-6)`` when their global L2 norm exceeds ``c``, as
  ``torch.nn.utils.clip_grad_norm_`` does; ``last_grad_norm`` is the norm
  before clipping.  Clipping lives on the optimizer so that its setting is
  part of the state dict (and of checkpoints), like the groups.

Wrong kinds of objects raise ``TypeError``; bad values (hyperparameters,
gradient names or shapes, foreign state dicts) raise ``ValueError`` with a
one-line message that names the offending parameter.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "Schedule",
    "ConstantLR",
    "StepLR",
    "CosineLR",
    "Optimizer",
    "SGD",
    "Adam",
    "AdamW",
    "global_norm",
]


# --------------------------------------------------------------------------
# Validation helpers


def _interval(low: float | None, low_open: bool, high: float | None, high_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"{'<' if high_open else '<='} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def _real(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    low_open: bool = False,
    high: float | None = None,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a finite float within the given bounds."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v!r}")
    bad_low = low is not None and (v < low or (low_open and v == low))
    bad_high = high is not None and (v > high or (high_open and v == high))
    if bad_low or bad_high:
        raise ValueError(f"{name} must be {_interval(low, low_open, high, high_open)}, got {v!r}")
    return v


def _int(name: str, value: Any, *, low: int) -> int:
    """Return ``value`` as an int ``>= low`` (bools are rejected: almost always a slip)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    v = int(value)
    if v < low:
        raise ValueError(f"{name} must be >= {low}, got {v}")
    return v


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


# --------------------------------------------------------------------------
# Learning rate schedules


class Schedule:
    """A learning rate as a function of the number of steps already taken.

    Subclasses implement ``__call__`` and ``config``; ``config()`` must return
    the constructor keyword arguments plus ``"type"`` (the class name) so an
    optimizer's state dict can rebuild the schedule with :meth:`from_config`.
    Subclasses register themselves by class name when they are defined.
    """

    _registry: ClassVar[dict[str, type[Schedule]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Schedule._registry[cls.__name__] = cls

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The schedule as plain data: ``{"type": <class name>, **constructor kwargs}``."""
        raise NotImplementedError

    @staticmethod
    def from_config(config: Mapping[str, Any]) -> Schedule:
        """Rebuild a schedule from :meth:`config` output (ValueError if it is not one)."""
        if not isinstance(config, Mapping) or "type" not in config:
            raise ValueError(f"schedule config must be a mapping with a 'type' key, got {config!r}")
        kind = config["type"]
        cls = Schedule._registry.get(kind) if isinstance(kind, str) else None
        if cls is None:
            raise ValueError(f"unknown schedule type {kind!r}; known: {sorted(Schedule._registry)}")
        kwargs = {k: v for k, v in config.items() if k != "type"}
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"bad {kind} schedule config {dict(config)!r}: {e}") from None

    @staticmethod
    def _check_step(step: Any) -> int:
        return _int("step", step, low=0)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Schedule):
            return NotImplemented
        return type(self) is type(other) and self.config() == other.config()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.config().items())))

    def __repr__(self) -> str:
        cfg = self.config()
        args = ", ".join(f"{k}={v!r}" for k, v in cfg.items() if k != "type")
        return f"{type(self).__name__}({args})"


class ConstantLR(Schedule):
    """The same learning rate at every step; what a plain float ``lr`` becomes."""

    def __init__(self, lr: float) -> None:
        self.base_lr = _real("lr", lr, low=0.0, low_open=True)

    def __call__(self, step: int) -> float:
        self._check_step(step)
        return self.base_lr

    def config(self) -> dict[str, Any]:
        return {"type": "ConstantLR", "lr": self.base_lr}


class StepLR(Schedule):
    """``lr * gamma ** (step // step_size)``: decay by ``gamma`` every ``step_size`` steps."""

    def __init__(self, lr: float, step_size: int, gamma: float = 0.1) -> None:
        self.base_lr = _real("lr", lr, low=0.0, low_open=True)
        self.step_size = _int("step_size", step_size, low=1)
        self.gamma = _real("gamma", gamma, low=0.0, low_open=True)

    def __call__(self, step: int) -> float:
        step = self._check_step(step)
        return self.base_lr * self.gamma ** (step // self.step_size)

    def config(self) -> dict[str, Any]:
        return {"type": "StepLR", "lr": self.base_lr, "step_size": self.step_size, "gamma": self.gamma}


class CosineLR(Schedule):
    """Linear warmup to ``lr``, cosine decay to ``min_lr`` at ``total_steps``, then ``min_lr``.

    Warmup step ``t`` (``t < warmup_steps``) uses ``lr * (t + 1) / warmup_steps``,
    so the first step already moves the parameters (a rate of 0 would waste it)
    and the last warmup step reaches ``lr``.  From ``warmup_steps`` to
    ``total_steps`` the rate follows half a cosine from ``lr`` down to ``min_lr``.
    """

    def __init__(self, lr: float, total_steps: int, min_lr: float = 0.0, warmup_steps: int = 0) -> None:
        self.base_lr = _real("lr", lr, low=0.0, low_open=True)
        self.total_steps = _int("total_steps", total_steps, low=1)
        self.min_lr = _real("min_lr", min_lr, low=0.0, high=self.base_lr)
        self.warmup_steps = _int("warmup_steps", warmup_steps, low=0)
        if self.warmup_steps > self.total_steps:
            raise ValueError(
                f"warmup_steps must be <= total_steps, got warmup_steps={self.warmup_steps} "
                f"and total_steps={self.total_steps}"
            )

    def __call__(self, step: int) -> float:
        step = self._check_step(step)
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if step >= self.total_steps:
            return self.min_lr
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def config(self) -> dict[str, Any]:
        return {
            "type": "CosineLR",
            "lr": self.base_lr,
            "total_steps": self.total_steps,
            "min_lr": self.min_lr,
            "warmup_steps": self.warmup_steps,
        }


def _as_schedule(lr: float | Schedule) -> Schedule:
    if isinstance(lr, Schedule):
        return lr
    return ConstantLR(lr)


# --------------------------------------------------------------------------
# Optimizers


def _check_params(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check the parameters can be updated in place; keep references, not copies."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict of name -> numpy array, got {type(params).__name__}")
    if not params:
        raise ValueError("params is empty: nothing to optimize")
    seen: dict[int, str] = {}
    checked: dict[str, np.ndarray] = {}
    for name, p in params.items():
        if not isinstance(name, str):
            raise TypeError(f"parameter names must be str, got {type(name).__name__} {name!r}")
        if not isinstance(p, np.ndarray):
            raise TypeError(f"parameter {name!r} must be a numpy array, got {type(p).__name__}")
        if not np.issubdtype(p.dtype, np.floating):
            raise ValueError(f"parameter {name!r} must have a floating dtype to be updated in place, got {p.dtype}")
        if not p.flags.writeable:
            raise ValueError(f"parameter {name!r} is a read-only array and cannot be updated in place")
        if id(p) in seen:
            # The same array under two names would be updated twice per step.
            raise ValueError(f"parameters {seen[id(p)]!r} and {name!r} are the same array")
        seen[id(p)] = name
        checked[name] = p
    return checked


def _names(names: Any) -> str:
    return ", ".join(repr(n) for n in sorted(names, key=str))


def global_norm(grads: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of all gradients taken as one vector, accumulated in float64.

    One dot product per array, in the mapping's order: the same gradients
    give the same bits, which a resumed run relies on.
    """
    total = 0.0
    for g in grads.values():
        flat = np.asarray(g, dtype=np.float64).reshape(-1)
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


_CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s guard against dividing by a zero norm


def _clip_setting(value: Any) -> float | None:
    return None if value is None else _real("clip_grad_norm", value, low=0.0, low_open=True)


class Optimizer:
    """Base class: validation, step counting, schedules and state dicts.

    Subclasses set ``self._hp`` (via :meth:`_validate_hyperparams`) before
    calling ``super().__init__`` and implement :meth:`_slot_names` and
    :meth:`_update`.  Slot arrays (momentum and the like) are allocated up
    front with each parameter's shape and dtype.
    """

    _hp: dict[str, Any]

    def __init__(
        self,
        params: Mapping[str, np.ndarray],
        lr: float | Schedule,
        *,
        groups: Any = None,
        clip_grad_norm: float | None = None,
    ) -> None:
        if not hasattr(self, "_hp"):
            self._hp = {}
        self._params = _check_params(params)
        self._schedule = _as_schedule(lr)
        self._groups = self._check_groups(groups if groups is not None else [], self._hp, self._schedule)
        self._clip = _clip_setting(clip_grad_norm)
        self._check_hp_for_params(self._hp)
        for group in self._groups:
            self._check_hp_for_params(group["hp"], group["params"])
        self._step_count = 0
        self.last_grad_norm: float | None = None
        self._slots: dict[str, dict[str, np.ndarray]] = {
            name: {slot: np.zeros_like(p) for slot in self._slot_names(self._hp_of(name))}
            for name, p in self._params.items()
        }

    # -- parameter groups -------------------------------------------------

    def _check_groups(self, groups: Any, defaults: dict[str, Any], schedule: Schedule) -> list[dict[str, Any]]:
        """Normalise groups to ``{"params", "lr", "overrides", "hp"}``; ValueError/TypeError if bad.

        ``hp`` is the group's full hyperparameters (the defaults with the
        group's settings over them), validated as the constructor's are.
        """
        if isinstance(groups, (Mapping, str, bytes)) or not hasattr(groups, "__iter__"):
            raise TypeError(f"groups must be a list of dicts like {{'params': [names], 'lr': ...}}, got {groups!r}")
        checked: list[dict[str, Any]] = []
        owner: dict[str, int] = {}
        for i, group in enumerate(groups):
            where = f"groups[{i}]"
            if not isinstance(group, Mapping):
                raise TypeError(f"{where} must be a dict with a 'params' list, got {type(group).__name__}")
            names = group.get("params")
            if isinstance(names, (str, bytes)) or not hasattr(names, "__iter__"):
                raise TypeError(f"{where}['params'] must be a list of parameter names, got {names!r}")
            names = list(names)
            if not names:
                raise ValueError(f"{where} has no params")
            for name in names:
                if not isinstance(name, str):
                    raise TypeError(f"{where}['params'] must hold parameter names (str), got {name!r}")
                if name not in self._params:
                    raise ValueError(f"{where} names {name!r}, which is not a parameter of this optimizer")
                if name in owner:
                    raise ValueError(f"parameter {name!r} is in groups[{owner[name]}] and {where}")
                owner[name] = i
            lr = group.get("lr")
            if lr is not None and not isinstance(lr, Schedule):
                lr = _real(f"{where}['lr']", lr, low=0.0, low_open=True)
                if not isinstance(getattr(schedule, "base_lr", None), numbers.Real) or schedule.base_lr <= 0:
                    raise ValueError(
                        f"{where} has lr={lr:g}, scaled with the schedule {schedule!r}, which has no base_lr; "
                        f"give the group a Schedule of its own"
                    )
            overrides = {k: v for k, v in group.items() if k not in ("params", "lr")}
            unknown = overrides.keys() - defaults.keys()
            if unknown:
                raise TypeError(
                    f"{where} has unknown setting(s) {_names(unknown)}; a group sets 'params', 'lr' "
                    f"and any of {_names(defaults) or 'nothing else'}"
                )
            try:
                hp = self._validate_hyperparams(**{**defaults, **overrides})
            except (TypeError, ValueError) as e:
                raise type(e)(f"{where}: {e}") from None
            checked.append({"params": names, "lr": lr, "overrides": {k: hp[k] for k in overrides}, "hp": hp})
        return checked

    def _group_index(self, groups: list[dict[str, Any]]) -> dict[str, int]:
        return {name: i for i, group in enumerate(groups) for name in group["params"]}

    def _hp_of(
        self, name: str, groups: list[dict[str, Any]] | None = None, defaults: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Hyperparameters that apply to parameter ``name`` (its group's, or the defaults)."""
        for group in self._groups if groups is None else groups:
            if name in group["params"]:
                return group["hp"]
        return self._hp if defaults is None else defaults

    @staticmethod
    def _checked_lr(lr: Any, schedule: Any, step: int) -> float:
        # Custom schedules are user code: a negative or NaN rate must not reach the parameters.
        ok = isinstance(lr, numbers.Real) and not isinstance(lr, (bool, np.bool_))
        if not ok or not (0.0 <= float(lr) < math.inf):
            raise ValueError(f"schedule {schedule!r} gave invalid lr {lr!r} at step {step}")
        return float(lr)

    def _group_lr(self, group: dict[str, Any], base: float) -> float:
        lr = group["lr"]
        if lr is None:
            return base
        if isinstance(lr, Schedule):
            return self._checked_lr(lr(self._step_count), lr, self._step_count)
        return base * (lr / self._schedule.base_lr)  # type: ignore[attr-defined]

    # -- subclass hooks ---------------------------------------------------

    @classmethod
    def _validate_hyperparams(cls, **hp: Any) -> dict[str, Any]:
        """Return the normalised hyperparameters or raise; shared by __init__ and load."""
        if hp:
            raise TypeError(f"unexpected hyperparameters {_names(hp)}")
        return {}

    def _check_hp_for_params(self, hp: dict[str, Any], names: Any = None) -> None:
        """Checks that need both hyperparameters and parameter dtypes (of ``names``, default all)."""

    @classmethod
    def _slot_names(cls, hp: dict[str, Any]) -> tuple[str, ...]:
        return ()

    def _update(
        self, p: np.ndarray, g: np.ndarray, slots: dict[str, np.ndarray], lr: float, t: int, hp: dict[str, Any]
    ) -> None:
        """Apply one update to ``p`` in place; ``t`` is the 1-based number of this step, ``hp`` its group's."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _update")

    # -- public API -------------------------------------------------------

    @property
    def step_count(self) -> int:
        """Number of steps taken so far."""
        return self._step_count

    @property
    def lr(self) -> float:
        """Learning rate the next :meth:`step` will use for parameters in no group: ``schedule(step_count)``."""
        return self._checked_lr(self._schedule(self._step_count), self._schedule, self._step_count)

    @property
    def group_lrs(self) -> list[float]:
        """Learning rates the next step uses for each of ``groups``, in order."""
        base = self.lr
        return [self._group_lr(group, base) for group in self._groups]

    @property
    def groups(self) -> list[dict[str, Any]]:
        """The parameter groups as given (normalised): ``params``, ``lr`` and the group's settings."""
        return [{"params": list(g["params"]), **({"lr": g["lr"]} if g["lr"] is not None else {}), **g["overrides"]}
                for g in self._groups]

    @property
    def clip_grad_norm(self) -> float | None:
        """The global gradient norm steps clip to, or None."""
        return self._clip

    @property
    def schedule(self) -> Schedule:
        return self._schedule

    @property
    def hyperparams(self) -> dict[str, Any]:
        """A copy of the hyperparameters other than the learning rate."""
        return dict(self._hp)

    @property
    def params(self) -> Mapping[str, np.ndarray]:
        """Read-only view of the parameter dict (the arrays themselves are live)."""
        return MappingProxyType(self._params)

    def step(self, grads: Mapping[str, np.ndarray]) -> None:
        """Update every parameter in place from ``grads`` (same names and shapes).

        All gradients are checked before any parameter changes, so a bad
        ``grads`` (or, with clipping, a non-finite gradient norm) leaves the
        parameters and optimizer state untouched.  ``last_grad_norm`` is
        set to the global norm before clipping.
        """
        checked = self._check_grads(grads)
        norm = global_norm(checked)
        if self._clip is not None:
            if not math.isfinite(norm):
                raise ValueError(f"the gradient norm is {norm} at step {self._step_count + 1}; cannot clip it")
            scale = self._clip / (norm + _CLIP_EPS)
            if scale < 1.0:
                # New arrays: `checked` may hold the caller's gradients, which are never written to.
                checked = {name: np.multiply(g, scale, out=np.empty_like(g)) for name, g in checked.items()}
        lr = self.lr
        group_lrs = self.group_lrs
        owner = self._group_index(self._groups)
        t = self._step_count + 1
        for name, p in self._params.items():
            i = owner.get(name)
            if i is None:
                self._update(p, checked[name], self._slots[name], lr, t, self._hp)
            else:
                self._update(p, checked[name], self._slots[name], group_lrs[i], t, self._groups[i]["hp"])
        self._step_count = t
        self.last_grad_norm = norm

    def _check_grads(self, grads: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not isinstance(grads, Mapping):
            raise TypeError(f"grads must be a dict of name -> numpy array, got {type(grads).__name__}")
        missing = self._params.keys() - grads.keys()
        if missing:
            raise ValueError(f"grads is missing parameter(s) {_names(missing)}")
        extra = grads.keys() - self._params.keys()
        if extra:
            raise ValueError(f"grads has name(s) {_names(extra)} that are not parameters of this optimizer")
        checked: dict[str, np.ndarray] = {}
        for name, p in self._params.items():
            g = np.asarray(grads[name])
            if g.dtype.kind not in "fiu":
                raise ValueError(f"grad for {name!r} must be a real numeric array, got dtype {g.dtype}")
            if g.shape != p.shape:
                raise ValueError(f"grad for {name!r} has shape {g.shape}, expected {p.shape} like the parameter")
            # Cast (copying only if needed) so arithmetic stays in the parameter's dtype.
            checked[name] = g.astype(p.dtype, copy=False)
        return checked

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training bit-for-bit, as plain Python/numpy.

        Slot arrays are copied, so later steps do not change a saved state.
        """
        return {
            "optimizer": type(self).__name__,
            "step_count": self._step_count,
            "hyperparams": dict(self._hp),
            "schedule": self._schedule.config(),
            "param_shapes": {name: tuple(p.shape) for name, p in self._params.items()},
            "slots": {name: {k: a.copy() for k, a in slots.items()} for name, slots in self._slots.items()},
            "groups": [self._group_state(g) for g in self._groups],
            "clip_grad_norm": self._clip,
        }

    @staticmethod
    def _group_state(group: dict[str, Any]) -> dict[str, Any]:
        lr = group["lr"]
        return {"params": list(group["params"]), "lr": lr.config() if isinstance(lr, Schedule) else lr,
                **group["overrides"]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore step count, hyperparameters, schedule and slots from :meth:`state_dict`.

        The state dict is authoritative (as in PyTorch): its hyperparameters,
        schedule, groups and clipping replace the ones given to the
        constructor (a state dict from before groups and clipping existed
        keeps the constructor's).  Everything is checked before anything
        changes; a state dict from another kind of optimizer or for other
        parameter names/shapes raises ``ValueError``.  Slot arrays are copied
        and cast to each parameter's dtype.
        """
        kind = type(self).__name__
        if not isinstance(state, Mapping):
            raise ValueError(f"state dict must be a mapping, got {type(state).__name__}")
        expected_keys = {"optimizer", "step_count", "hyperparams", "schedule", "param_shapes", "slots"}
        optional_keys = {"groups", "clip_grad_norm"}  # absent from state dicts older than them
        if not expected_keys <= set(state.keys()) <= expected_keys | optional_keys:
            raise ValueError(
                f"not a {kind} state dict: keys are {_names(state.keys())}, expected {_names(expected_keys)} "
                f"and optionally {_names(optional_keys)}"
            )
        if state["optimizer"] != kind:
            raise ValueError(f"state dict is from a {state['optimizer']!r} optimizer, cannot load it into {kind}")
        try:
            step_count = _int("step_count", state["step_count"], low=0)
            hp_in = state["hyperparams"]
            if not isinstance(hp_in, Mapping):
                raise TypeError(f"hyperparams must be a mapping, got {type(hp_in).__name__}")
            hp = self._validate_hyperparams(**hp_in)
        except (TypeError, ValueError) as e:
            raise ValueError(f"bad {kind} state dict: {e}") from None
        schedule = Schedule.from_config(state["schedule"])
        self._check_hp_for_params(hp)
        try:
            clip = _clip_setting(state["clip_grad_norm"]) if "clip_grad_norm" in state else self._clip
            if "groups" in state:
                groups_in = state["groups"]
                if isinstance(groups_in, (str, bytes)) or not hasattr(groups_in, "__iter__"):
                    raise TypeError(f"groups must be a list, got {type(groups_in).__name__}")
                groups_in = [
                    {**g, "lr": Schedule.from_config(g["lr"])} if isinstance(g, Mapping) and isinstance(g.get("lr"), Mapping)
                    else g for g in groups_in
                ]
            else:
                groups_in = [self._group_state(g) for g in self._groups]
            groups = self._check_groups(groups_in, hp, schedule)
        except (TypeError, ValueError) as e:
            raise ValueError(f"bad {kind} state dict: {e}") from None
        for group in groups:
            self._check_hp_for_params(group["hp"], group["params"])

        shapes = state["param_shapes"]
        slots_in = state["slots"]
        if not isinstance(shapes, Mapping) or not isinstance(slots_in, Mapping):
            raise ValueError(f"bad {kind} state dict: param_shapes and slots must be mappings")
        for what, names in (("param_shapes", shapes.keys()), ("slots", slots_in.keys())):
            missing = self._params.keys() - names
            extra = names - self._params.keys()
            if missing or extra:
                parts = [f"no entry for parameter(s) {_names(missing)}"] if missing else []
                parts += [f"unknown parameter(s) {_names(extra)}"] if extra else []
                raise ValueError(f"state dict {what} do not match this optimizer: {'; '.join(parts)}")
        new_slots: dict[str, dict[str, np.ndarray]] = {}
        for name, p in self._params.items():
            slot_names = set(self._slot_names(self._hp_of(name, groups, hp)))
            try:
                saved_shape = tuple(shapes[name])
            except TypeError:
                saved_shape = shapes[name]
            if saved_shape != p.shape:
                raise ValueError(f"state dict has shape {saved_shape} for {name!r}, parameter has {p.shape}")
            slots = slots_in[name]
            if not isinstance(slots, Mapping) or set(slots.keys()) != slot_names:
                got = _names(slots.keys()) if isinstance(slots, Mapping) else type(slots).__name__
                raise ValueError(f"state dict slots for {name!r} are {got or 'none'}, expected {_names(slot_names) or 'none'}")
            new_slots[name] = {}
            for slot, a in slots.items():
                if not isinstance(a, np.ndarray) or a.dtype.kind not in "fiu":
                    raise ValueError(f"state dict slot {slot!r} for {name!r} must be a real numeric numpy array")
                if a.shape != p.shape:
                    raise ValueError(f"state dict slot {slot!r} for {name!r} has shape {a.shape}, parameter has {p.shape}")
                new_slots[name][slot] = np.array(a, dtype=p.dtype, copy=True)

        self._hp = hp
        self._schedule = schedule
        self._groups = groups
        self._clip = clip
        self._step_count = step_count
        self._slots = new_slots

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self._hp.items())
        extra = f", {len(self._groups)} groups" if self._groups else ""
        extra += f", clip_grad_norm={self._clip!r}" if self._clip is not None else ""
        return f"{type(self).__name__}({len(self._params)} params, lr={self._schedule!r}{', ' if hp else ''}{hp}{extra})"


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum, as ``torch.optim.SGD``.

    Per step: ``g = grad + weight_decay * p``; with momentum,
    ``buf = momentum * buf + g`` (``buf = g`` on the first step) and
    ``g = g + momentum * buf`` if ``nesterov`` else ``g = buf``; then
    ``p -= lr * g``.
    """

    def __init__(
        self,
        params: Mapping[str, np.ndarray],
        lr: float | Schedule,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        *,
        groups: Any = None,
        clip_grad_norm: float | None = None,
    ) -> None:
        self._hp = self._validate_hyperparams(momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        super().__init__(params, lr, groups=groups, clip_grad_norm=clip_grad_norm)

    @classmethod
    def _validate_hyperparams(cls, *, momentum: Any, nesterov: Any, weight_decay: Any) -> dict[str, Any]:
        hp = {
            "momentum": _real("momentum", momentum, low=0.0, high=1.0, high_open=True),
            "nesterov": _bool("nesterov", nesterov),
            "weight_decay": _real("weight_decay", weight_decay, low=0.0),
        }
        if hp["nesterov"] and hp["momentum"] == 0.0:
            raise ValueError("nesterov=True requires momentum > 0")
        return hp

    @classmethod
    def _slot_names(cls, hp: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",) if hp["momentum"] else ()

    def _update(
        self, p: np.ndarray, g: np.ndarray, slots: dict[str, np.ndarray], lr: float, t: int, hp: dict[str, Any]
    ) -> None:
        momentum, wd = hp["momentum"], hp["weight_decay"]
        # One scratch array per step; `out=` keeps it (and the maths) in p's dtype and
        # works for 0-d parameters, where numpy would otherwise return scalars.
        tmp = np.empty_like(p)
        d = g  # the caller's array: never written to
        if wd:
            np.multiply(p, wd, out=tmp)
            tmp += g
            d = tmp
        if momentum:
            buf = slots["momentum_buffer"]
            if t == 1:
                np.copyto(buf, d)  # torch starts the buffer at the first gradient
            else:
                buf *= momentum
                buf += d
            if hp["nesterov"]:
                if d is tmp:
                    tmp += momentum * buf
                else:
                    np.multiply(buf, momentum, out=tmp)
                    tmp += d
                d = tmp
            else:
                d = buf
        if d is tmp:
            tmp *= lr
        else:
            np.multiply(d, lr, out=tmp)
        p -= tmp


class Adam(Optimizer):
    """Adam, as ``torch.optim.Adam`` (L2 penalty) or ``torch.optim.AdamW`` (decoupled decay).

    Per step ``t`` (1-based): with L2 decay ``g = grad + weight_decay * p``;
    with decoupled decay ``p *= 1 - lr * weight_decay`` first.  Then
    ``m = b1*m + (1-b1)*g``, ``v = b2*v + (1-b2)*g*g`` and
    ``p -= lr / (1 - b1**t) * m / (sqrt(v) / sqrt(1 - b2**t) + eps)``.
    """

    def __init__(
        self,
        params: Mapping[str, np.ndarray],
        lr: float | Schedule = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        *,
        groups: Any = None,
        clip_grad_norm: float | None = None,
    ) -> None:
        self._hp = self._validate_hyperparams(
            betas=betas, eps=eps, weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay
        )
        super().__init__(params, lr, groups=groups, clip_grad_norm=clip_grad_norm)

    @classmethod
    def _validate_hyperparams(
        cls, *, betas: Any, eps: Any, weight_decay: Any, decoupled_weight_decay: Any
    ) -> dict[str, Any]:
        if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        b1 = _real("betas[0]", betas[0], low=0.0, high=1.0, high_open=True)
        b2 = _real("betas[1]", betas[1], low=0.0, high=1.0, high_open=True)
        return {
            "betas": (b1, b2),
            "eps": _real("eps", eps, low=0.0, low_open=True),
            "weight_decay": _real("weight_decay", weight_decay, low=0.0),
            "decoupled_weight_decay": _bool("decoupled_weight_decay", decoupled_weight_decay),
        }

    def _check_hp_for_params(self, hp: dict[str, Any], names: Any = None) -> None:
        # An eps that rounds to 0 (1e-8 in float16) turns zero gradients into 0/0 = NaN.
        for name, p in self._params.items():
            if names is not None and name not in names:
                continue
            if p.dtype.type(hp["eps"]) == 0:
                raise ValueError(f"eps={hp['eps']:g} rounds to 0 in {p.dtype} for parameter {name!r}; use a larger eps")

    @classmethod
    def _slot_names(cls, hp: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def _update(
        self, p: np.ndarray, g: np.ndarray, slots: dict[str, np.ndarray], lr: float, t: int, hp: dict[str, Any]
    ) -> None:
        (b1, b2), eps = hp["betas"], hp["eps"]
        wd, decoupled = hp["weight_decay"], hp["decoupled_weight_decay"]
        m, v = slots["exp_avg"], slots["exp_avg_sq"]
        if wd and decoupled:
            p *= 1.0 - lr * wd
        elif wd:
            g_l2 = np.empty_like(p)
            np.multiply(p, wd, out=g_l2)
            g_l2 += g
            g = g_l2
        # One scratch array reused via `out=` (stays in p's dtype, works for 0-d p).
        tmp = np.empty_like(p)
        np.multiply(g, 1.0 - b1, out=tmp)
        m *= b1
        m += tmp
        np.multiply(g, g, out=tmp)
        tmp *= 1.0 - b2
        v *= b2
        v += tmp
        step_size = lr / (1.0 - b1**t)
        np.sqrt(v, out=tmp)
        tmp /= math.sqrt(1.0 - b2**t)
        tmp += eps
        np.divide(m, tmp, out=tmp)
        tmp *= step_size
        p -= tmp


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as ``torch.optim.AdamW``.

    Decay shrinks the weights directly instead of being added to the
    gradient, so it is not rescaled by Adam's per-coordinate step sizes.
    """

    def __init__(
        self,
        params: Mapping[str, np.ndarray],
        lr: float | Schedule = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        groups: Any = None,
        clip_grad_norm: float | None = None,
    ) -> None:
        super().__init__(
            params, lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled_weight_decay=True,
            groups=groups, clip_grad_norm=clip_grad_norm,
        )

    @classmethod
    def _validate_hyperparams(cls, **hp: Any) -> dict[str, Any]:
        out = super()._validate_hyperparams(**hp)
        if not out["decoupled_weight_decay"]:
            raise ValueError("AdamW always uses decoupled weight decay (decoupled_weight_decay must be True)")
        return out

"""The op's knobs: enums with ggml's codes, ``GGML_SAGE_*`` overrides and the smooth_v contract.

`resolve_params` is the one place that turns what a caller passed into what a call really uses
(the analogue of ggml's ``op_params``); every backend reads its knobs from the record it returns.
It is `check_knobs` (pure, traced by ``torch.compile``) then `apply_overrides` (the environment,
read at run time by the registered op).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import numbers
import os
import threading

import torch

logger = logging.getLogger("sageflash")

_once_lock = threading.Lock()
_said_once: set[tuple] = set()


def warn_once(key: tuple, message: str, *args) -> None:
    """Log ``message`` at WARNING on the ``sageflash`` logger the first time ``key`` is seen."""
    with _once_lock:
        if key in _said_once:
            return
        _said_once.add(key)
    logger.warning(message, *args)


class _KnobEnum(str, enum.Enum):
    """A knob value that compares, hashes and prints as its string and carries ggml's code."""

    def __new__(cls, value: str, code: int):
        member = str.__new__(cls, value)
        member._value_ = value
        member.code = code
        return member

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __repr__(self) -> str:
        return repr(self.value)

    @classmethod
    def parse(cls, value, argument: str):
        """Accept a member, its string (any case) or its integer code, also as text ("2", as a
        dump's meta or a command line gives it); else ValueError/TypeError."""
        if isinstance(value, cls):
            return value
        if isinstance(value, bool) or not isinstance(value, (str, numbers.Integral)):  # Integral: numpy's ints
            raise TypeError(f"{argument} must be a string or an integer code, got {type(value).__name__}")
        key = value.strip().lower() if isinstance(value, str) else int(value)
        member = _KNOB_LOOKUP[cls].get(int(key) if isinstance(key, str) and key.isdecimal() else key)
        if member is not None:
            return member
        raise ValueError(f"{argument} must be one of {cls.choices()}, got {value!r}")

    @classmethod
    def choices(cls) -> str:
        return ", ".join(f"{m.value!r} ({m.code})" for m in cls)


class PVAccum(_KnobEnum):
    """How P·V is accumulated (SPEC §6); the code is ggml's."""

    FP32 = ("fp32", 0)
    FP32_FP32 = ("fp32+fp32", 1)
    FP32_FP16 = ("fp32+fp16", 2)

    @property
    def v_scale_max(self) -> float:
        """Largest fp8 V magnitude: 2.25 keeps a 64-key block of fp16 partial sums finite."""
        return 2.25 if self is PVAccum.FP32_FP16 else 448.0


class QKGranularity(_KnobEnum):
    """Q/K int8 scale groups (SPEC §3); the code is ggml's."""

    PER_WARP = ("per_warp", 2)
    PER_THREAD = ("per_thread", 3)


# Each knob enum's members by string and by ggml code: a plain dict, so `_KnobEnum.parse` never
# iterates an Enum class (torch.compile's tracer cannot, in torch 2.11).
_KNOB_LOOKUP = {cls: {**{m.value: m for m in cls}, **{m.code: m for m in cls}}
                for cls in (PVAccum, QKGranularity)}

ENV_SMOOTH_K = "GGML_SAGE_SMOOTH_K"
ENV_SMOOTH_V = "GGML_SAGE_SMOOTH_V"
ENV_PV_ACCUM = "GGML_SAGE_PV_ACCUM"
ENV_GRANULARITY = "GGML_SAGE_GRANULARITY"

_ENV_KEYS: dict[str, object] = {}  # variable name -> its key in os.environ's own mapping


def getenv(name: str) -> str | None:
    """``os.environ.get(name)``, read now, at a fraction of its cost.

    `os.environ` answers a missing name by raising and catching a KeyError (≈0.7 µs on a CI CPU),
    and every call of the op reads twelve names (the overrides and the debug toggles, all usually
    unset): ≈9 µs of host time per call. This looks the name up in the mapping `os.environ`
    keeps and updates on every change made through it (CPython's ``_data``), ≈0.1 µs; where
    there is none, through ``os.environ.get``.
    """
    environ = os.environ
    data = getattr(environ, "_data", None)
    if type(data) is not dict:
        return environ.get(name)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = environ.encodekey(name)
    raw = data.get(key)
    return None if raw is None else environ.decodevalue(raw)


_TRUE = ("1", "true", "yes")
_FALSE = ("0", "false", "no")


def _env_bool(name: str) -> bool | None:
    raw = getenv(name)
    if raw is None:
        return None
    word = raw.strip().lower()
    if word in _TRUE or word in _FALSE:
        value = word in _TRUE
        warn_once(("override", name, value), "%s=%s overrides the caller: %s=%d", name, raw,
                  name.removeprefix("GGML_SAGE_").lower(), value)
        return value
    warn_once(("bad-override", name, raw), "ignoring %s=%r: expected one of 0, 1, true, false, yes, no",
              name, raw)
    return None


def _env_enum(name: str, enum_cls: type[_KnobEnum]):
    raw = getenv(name)
    if raw is None:
        return None
    word = raw.strip().lower()
    for member in enum_cls:
        if word == member.value:
            warn_once(("override", name, member.value), "%s=%s overrides the caller: %s=%s", name, raw,
                      name.removeprefix("GGML_SAGE_").lower(), member.value)
            return member
    allowed = ", ".join(m.value for m in enum_cls)
    raise ValueError(f"environment variable {name}={raw!r} is not valid; allowed values: {allowed}")


def check_bool(value, argument: str) -> bool:
    """A flag: a bool, 0 or 1 (Python's or numpy's), or numpy's bool scalar; else a TypeError naming
    ``argument``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and value in (0, 1):  # Integral: numpy's ints too
        return bool(value)
    if getattr(getattr(value, "dtype", None), "kind", None) == "b" and getattr(value, "shape", None) == ():
        return bool(value)  # numpy's bool scalar
    raise TypeError(f"{argument} must be a bool, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SageParams:
    """The knobs of a call: checked (`check_knobs`), then what it really uses (`apply_overrides`)."""

    softmax_scale: float | None
    is_causal: bool
    smooth_k: bool
    smooth_v: bool
    pv_accum: PVAccum
    granularity: QKGranularity

    def as_dict(self) -> dict:
        """Plain values (strings for the enums), for logs, dumps and JSON."""
        return {f.name: (str(v) if isinstance(v, enum.Enum) else v)
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}


def check_softmax_scale(value, argument: str = "softmax_scale") -> float | None:
    """None, or a finite positive float; else TypeError/ValueError naming ``argument``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, numbers.Real)):  # Real: numpy's floats
        raise TypeError(f"{argument} must be a float or None, got {type(value).__name__}")
    value = float(value)
    if not 0 < value < math.inf:  # also NaN; comparisons, which torch.compile traces on a symbolic float
        raise ValueError(f"{argument} must be a finite positive float, got {value}")
    return value


def check_knobs(softmax_scale=None, is_causal=False, smooth_k=True, smooth_v=False,
                pv_accum="fp32+fp16", granularity="per_thread", head_dim=None) -> SageParams:
    """Validate and normalise what the caller passed, before any override.

    Pure (no environment, no logging), so ``torch.compile`` traces it. ``softmax_scale`` defaults
    to ``head_dim ** -0.5`` (the caller's head dim, before padding) when ``head_dim`` is given, and
    stays None otherwise.
    """
    is_causal = check_bool(is_causal, "is_causal")
    smooth_k = check_bool(smooth_k, "smooth_k")
    smooth_v = check_bool(smooth_v, "smooth_v")
    pv_accum = PVAccum.parse(pv_accum, "pv_accum")
    granularity = QKGranularity.parse(granularity, "granularity")
    softmax_scale = check_softmax_scale(softmax_scale)
    if head_dim is not None:
        if isinstance(head_dim, bool) or not isinstance(head_dim, (int, torch.SymInt)):  # SymInt: traced shapes
            raise TypeError(f"head_dim must be an int or None, got {type(head_dim).__name__}")
        if head_dim < 1:
            raise ValueError(f"head_dim must be positive, got {head_dim}")
    if softmax_scale is None and head_dim is not None:
        softmax_scale = float(head_dim) ** -0.5
    return SageParams(softmax_scale, is_causal, smooth_k, smooth_v, pv_accum, granularity)


def resolve_params(softmax_scale=None, is_causal=False, smooth_k=True, smooth_v=False,
                   pv_accum="fp32+fp16", granularity="per_thread", head_dim=None) -> SageParams:
    """Validate the knobs (`check_knobs`), apply ``GGML_SAGE_*`` overrides and the smooth_v contract."""
    return apply_overrides(check_knobs(softmax_scale, is_causal, smooth_k, smooth_v, pv_accum,
                                       granularity, head_dim))


def smooth_v_contract(smooth_v: bool, pv_accum: PVAccum) -> bool:
    """smooth_v as a call uses it: only with pv_accum fp32, else forced off with one warning."""
    if smooth_v and pv_accum is not PVAccum.FP32:
        warn_once(("smooth_v-forced-off",),
                  "smooth_v needs pv_accum='fp32'; forcing smooth_v off with pv_accum=%r", pv_accum.value)
        return False
    return smooth_v


def apply_overrides(params: SageParams) -> SageParams:
    """``params`` with the ``GGML_SAGE_*`` overrides read now, then the smooth_v contract."""
    smooth_k, smooth_v = params.smooth_k, params.smooth_v
    pv_accum, granularity = params.pv_accum, params.granularity
    env_smooth_k = _env_bool(ENV_SMOOTH_K)
    env_smooth_v = _env_bool(ENV_SMOOTH_V)
    env_pv = _env_enum(ENV_PV_ACCUM, PVAccum)
    env_gran = _env_enum(ENV_GRANULARITY, QKGranularity)
    smooth_k = smooth_k if env_smooth_k is None else env_smooth_k
    smooth_v = smooth_v if env_smooth_v is None else env_smooth_v
    pv_accum = pv_accum if env_pv is None else env_pv
    granularity = granularity if env_gran is None else env_gran

    smooth_v = smooth_v_contract(smooth_v, pv_accum)
    if (smooth_k, smooth_v, pv_accum, granularity) == (params.smooth_k, params.smooth_v, params.pv_accum,
                                                       params.granularity):
        return params  # the usual case: no override (a copy costs host time on every call)
    return dataclasses.replace(params, smooth_k=smooth_k, smooth_v=smooth_v, pv_accum=pv_accum,
                               granularity=granularity)

"""Loss registry: `LossSpec`s by name, hparam resolution, and the batch-mask helpers.

A loss is a pure function `fn(student, teacher, batch, *, hparam=default, ...)`
returning a float32 scalar. Its hparams are its keyword-only arguments; their
defaults are read from the signature, so the function is the one source of
truth. `register` records the default feature taps, the connector the student
tap needs when shapes differ, and whether the loss takes lists of taps.

Every registered loss computes its matrix products in full float32
(`float32_matmuls`): XLA's default for float32 operands is TF32 on recent NVIDIA
GPUs and single-pass bfloat16 on TPUs, which leaves ~3 significant digits in the
Gram matrices, pairwise distances and memory-bank scores of SP, RKD, PKT, CRD,
TRG and ND (RKD's `|a|² + |b|² − 2a·b` cancels catastrophically at that precision).
PyTorch computes float32 matmuls in float32 on GPUs by default, so the peers'
values are float32 ones. On CPU nothing changes. The products are small
([B, B] or [B, N] with N the memory size): the cost is negligible.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import numbers
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from transferlab import errors


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """What the KD task needs to know about a registered loss."""

    name: str
    fn: Callable[..., Any]
    defaults: Mapping[str, Any]
    default_taps: tuple  # (student_tap, teacher_tap); each a tuple of names when multi_tap
    connector: str | None
    multi_tap: bool
    choices: Mapping[str, tuple]  # hparam -> allowed values, for string-valued hparams
    reads_label: bool = False  # uses batch['label'] (the hard class id)


_REGISTRY: dict[str, LossSpec] = {}


def float32_matmuls(fn):
    """`fn` with every matrix product it traces computed at float32 precision ('highest')."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.default_matmul_precision("float32"):
            return fn(*args, **kwargs)

    return wrapped


def register(name: str, *, taps, connector: str | None = None, multi_tap: bool = False,
             choices: Mapping[str, tuple] | None = None, reads_label: bool = False):
    """Decorator registering `fn(student, teacher, batch, *, hparam=default, ...) -> scalar` as loss `name`;
    its keyword-only args are its hparams (a term's values are checked against their defaults' types).

    `taps`: the default (student_tap, teacher_tap); `connector`: the default connector from the student's
    tap to the teacher's shape ('linear', 'conv1x1_bn', ... or None); `multi_tap`: the taps are lists;
    `choices`: {hparam: allowed values}; `reads_label`: reads `batch['label']` (refused under mixup).
    A config file may register its own loss this way (`from transferlab.losses import register`); a name
    already taken by another function is a ValueError. Returns `fn` wrapped by `float32_matmuls`: the
    registered and the module-level function are the same.
    """

    def deco(fn):
        if name in _REGISTRY and not _same_source(_REGISTRY[name].fn, fn):
            old = _REGISTRY[name].fn
            raise ValueError(f"loss {name!r} is already registered ({old.__module__}.{old.__qualname__}); "
                             "choose another name")
        params = inspect.signature(fn).parameters.values()
        defaults = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
        fn = float32_matmuls(fn)
        _REGISTRY[name] = LossSpec(name=name, fn=fn, defaults=defaults, default_taps=tuple(taps),
                                   connector=connector, multi_tap=multi_tap, choices=dict(choices or {}),
                                   reads_label=reads_label)
        return fn

    return deco


def _same_source(registered, fn) -> bool:
    """The same function defined again: a config file that registers its own loss, executed a second time
    in one process (a notebook, a test) replaces its entry instead of failing."""
    return (registered.__module__, registered.__qualname__) == (fn.__module__, fn.__qualname__)


def names() -> list[str]:
    """Registered loss names, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> LossSpec:
    """The `LossSpec` of `name`; an unknown name raises `ConfigError`."""
    if name not in _REGISTRY:
        raise errors.unknown_name("loss", name, _REGISTRY)
    return _REGISTRY[name]


# Real hparams that divide or scale logits/similarities: only > 0 makes sense (also any '*temperature').
_POSITIVE = frozenset({"tau", "p", "eps"})
# Real hparams that weight a part of a built-in loss (also any 'w_*'): a negative one would ascend that part.
# (A loss of one's own may mean something else by them: alpha-divergence KD takes a negative alpha.)
_NON_NEGATIVE = frozenset({"alpha", "beta", "gamma"})


def _check_value(name: str, key: str, value, default, choices, builtin: bool = True):
    where = f"loss {name!r} hparam {key!r}"
    if key in choices:
        if value not in choices[key]:
            raise errors.ConfigError(f"{where}: got {value!r}; expected one of: "
                                     f"{', '.join(map(str, choices[key]))}")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise errors.ConfigError(f"{where}: got {value!r}; expected a bool")
        return value
    if isinstance(default, numbers.Integral):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise errors.ConfigError(f"{where}: got {value!r}; expected an int")
        return int(value)
    if isinstance(default, numbers.Real):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise errors.ConfigError(f"{where}: got {value!r}; expected a finite number")
        if (key in _POSITIVE or key.endswith("temperature")) and value <= 0:
            raise errors.ConfigError(f"{where}: got {value!r}; expected a number > 0")
        if builtin and (key in _NON_NEGATIVE or key.startswith("w_")) and value < 0:
            raise errors.ConfigError(f"{where}: got {value!r}; expected a number >= 0 (it weights a part of the "
                                     "loss)")
        return float(value)
    if isinstance(default, tuple):
        positive_ints = default and all(isinstance(d, int) and d > 0 for d in default)
        if not isinstance(value, (tuple, list)) or (positive_ints and not (
                value and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in value))):
            kind = "a non-empty list of ints > 0" if positive_ints else "a list"
            raise errors.ConfigError(f"{where}: got {value!r}; expected {kind} like {list(default)}")
        return tuple(int(v) for v in value) if positive_ints else tuple(value)
    return value


def resolve_hparams(name: str, given: Mapping[str, Any] | None = None) -> dict:
    """Defaults of loss `name` updated by `given`; an unknown or ill-typed hparam raises `ConfigError`."""
    spec = get(name)
    given = dict(given or {})
    for key in given:
        if key not in spec.defaults:
            allowed = ", ".join(sorted(spec.defaults)) or "(none)"
            raise errors.ConfigError(f"loss {name!r}: unknown hparam {key!r}; allowed: {allowed}")
    out = dict(spec.defaults)
    for key, value in given.items():
        out[key] = _check_value(name, key, value, spec.defaults[key], spec.choices,
                                builtin=spec.fn.__module__.startswith("transferlab."))
    return out


# ---------------------------------------------------------------------------- batch helpers


def sample_weights(batch: Mapping[str, Any], n: int):
    """float32 [n]: `batch['mask']` as 0/1 weights, or ones when the batch has no mask."""
    mask = batch.get("mask") if batch is not None else None
    if mask is None:
        return jnp.ones((n,), jnp.float32)
    return jnp.asarray(mask).astype(jnp.float32).reshape(n)


def batch_mean(per_sample, batch: Mapping[str, Any]):
    """Mean of float [B] `per_sample` over the valid (unmasked) samples of `batch`."""
    w = sample_weights(batch, per_sample.shape[0])
    return jnp.sum(per_sample * w) / jnp.maximum(jnp.sum(w), 1.0)


def labels_of(batch: Mapping[str, Any], loss: str):
    """int32 [B] `batch['label']`; a loss that needs labels names itself when they are missing."""
    if batch is None or "label" not in batch:
        raise errors.ConfigError(f"loss {loss!r} needs batch['label'] (int class ids); the batch has none")
    return jnp.asarray(batch["label"]).astype(jnp.int32)


def check_same_shape(loss: str, student, teacher):
    """`ConfigError` when a loss comparing elementwise gets differently shaped taps."""
    if tuple(student.shape) != tuple(teacher.shape):
        raise errors.ConfigError(f"loss {loss!r}: student tap shape {tuple(student.shape)} differs from the teacher's "
                                 f"{tuple(teacher.shape)}; map the student with a connector")


def check_pairs(loss: str, student, teacher):
    """`ConfigError` unless a multi-tap loss got two lists of the same length."""
    if not isinstance(student, (list, tuple)) or not isinstance(teacher, (list, tuple)):
        raise errors.ConfigError(f"loss {loss!r} takes lists of taps (multi_tap); got "
                                 f"{type(student).__name__} and {type(teacher).__name__}")
    if len(student) != len(teacher):
        raise errors.ConfigError(f"loss {loss!r}: {len(student)} student taps but {len(teacher)} teacher taps; "
                                 "expected as many of each")


def f32(x):
    """`x` as a float32 array (models may sow bfloat16 features)."""
    return jnp.asarray(x).astype(jnp.float32)


def norm_or_zero(x, axis=-1, keepdims=False):
    """|x|_2 along `axis`, with torch's zero subgradient at x = 0.

    `jnp.sqrt`'s derivative at 0 is infinite, and the zero cotangent it meets there
    (a masked or zero-padded row, a constant softmax row) makes 0 * inf = NaN, which a
    later matmul or sum spreads over the whole gradient.
    """
    sq = jnp.sum(x * x, axis=axis, keepdims=keepdims)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def nonzero_divisor(x):
    """`x` where it is nonzero, else 1: for a sum that is 0 exactly when what it divides is 0
    (a masked row's total, a mean over no pairs); a clamp like max(x, 1e-30) keeps the
    value but its gradient 1/x^2 overflows to inf."""
    return jnp.where(x != 0, x, 1.0)

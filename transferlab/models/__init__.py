"""Model zoo: flax linen classifiers registered by name, with feature taps.

    from transferlab import models
    model = models.create("resnet8x4", num_classes=100, dtype=jnp.bfloat16)
    variables = model.init({"params": key}, x_BxHxWxC, train=False)
    logits, updates = model.apply(variables, x, train=True,
                                  mutable=["batch_stats", "intermediates"])
    updates["intermediates"]["stage2"]  # a 1-tuple holding the tapped array

CIFAR architectures equal RepDistiller's (github.com/HobbitLong/RepDistiller,
`models/`); parameter counts are checked against it in tests/test_models.py.
Every model sows `features` and `logits`; convnets also `stage1`, `stage2`, ...
and `preact_stage1`, ... (and `stem` where there is a stem); the MLP sows
`hidden1`, .... `tap_names(name)` lists them.
"""

import functools
import numbers

import jax
import jax.numpy as jnp

from transferlab import errors
from transferlab.models import lenet, mlp, mobilenetv2, resnet_cifar, shufflenet, vgg, wrn

__all__ = ["names", "create", "register", "tap_names"]


def _is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_bool(v):
    return None if isinstance(v, bool) else "a bool"


def _check_pos_int(v):
    return None if _is_int(v) and v > 0 else "a positive int"


def _check_pos_number(v):
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and v > 0
    return None if ok else "a positive number"


def _check_hidden(v):
    ok = isinstance(v, (list, tuple)) and all(_is_int(h) and h > 0 for h in v)
    return None if ok else "a list of positive ints"


def _check_wrn_depth(v):
    return None if _is_int(v) and v >= 10 and (v - 4) % 6 == 0 else "an int 6n+4 >= 10"


def _check_net_size(v):
    return None if v in shufflenet.V2_CONFIGS else f"one of {sorted(shufflenet.V2_CONFIGS)}"


# kwarg -> (default, checker); a model accepts only the kwargs listed for it.
_BARRIER = {"fusion_barrier": (True, _check_bool)}

_REGISTRY = {}  # name -> (build(num_classes, dtype, **kwargs) -> Module, kwarg spec)


def _register(name, build, kwargs=None):
    _REGISTRY[name] = (build, dict(kwargs or {}))


def _resnet(depth, widths):
    def build(nc, dt, fusion_barrier):
        return resnet_cifar.ResNetCifar(depth, widths, nc, dt, fusion_barrier)
    return build


def _wrn(nc, dt, depth, widen_factor, fusion_barrier):
    return wrn.WideResNet(int(depth), int(widen_factor), nc, dt, fusion_barrier)


def _vgg(cfg):
    return lambda nc, dt: vgg.VGG(cfg, nc, dt)


def _mobilenetv2(nc, dt, width_mult, expand_ratio):
    return mobilenetv2.MobileNetV2(nc, float(width_mult), int(expand_ratio), dt)


_register("mlp", lambda nc, dt, hidden_sizes: mlp.MLP(tuple(hidden_sizes), nc, dt),
          {"hidden_sizes": ((256, 256), _check_hidden)})
_register("lenet5", lambda nc, dt: lenet.LeNet5(nc, dt))
for _name, (_depth, _widths) in resnet_cifar.CONFIGS.items():
    _register(_name, _resnet(_depth, _widths), _BARRIER)
for _name, (_depth, _k) in wrn.CONFIGS.items():
    _register(_name, functools.partial(_wrn, depth=_depth, widen_factor=_k), _BARRIER)
_register("wrn", _wrn, {"depth": (16, _check_wrn_depth), "widen_factor": (1, _check_pos_int),
                        **_BARRIER})
for _name, _cfg in vgg.CONFIGS.items():
    _register(_name, _vgg(_cfg))
for _name in ("mobilenetv2", "mobile_half"):  # mobile_half: RepDistiller's name
    _register(_name, _mobilenetv2,
              {"width_mult": (0.5, _check_pos_number), "expand_ratio": (6, _check_pos_int)})
_register("shufflenetv1", lambda nc, dt: shufflenet.ShuffleNetV1(nc, dtype=dt))
_register("shufflenetv2", lambda nc, dt, net_size: shufflenet.ShuffleNetV2(nc, net_size, dt),
          {"net_size": (1, _check_net_size)})


def register(name, build, kwargs=None):
    """Adds a model of one's own (e.g. from a config file): `build(num_classes, dtype, **kwargs)` returns a
    linen module called as `module(x_BxHxWxC, train=...)` that returns logits [B, num_classes] and sows its
    taps (`self.sow('intermediates', name, x)`, at least 'features' and 'logits' for the feature losses).
    `kwargs` maps each keyword `build` takes to its default; a config's `model.kwargs` may set only those.
    Registering a name again with the same `build` (the config file executed twice) replaces it; a name
    taken by another model is a ValueError."""
    if name in _REGISTRY:
        old = _REGISTRY[name][0]
        if (old.__module__, old.__qualname__) != (build.__module__, build.__qualname__):
            raise ValueError(f"model {name!r} is already registered; choose another name")
    _register(name, build, {key: (default, lambda v: None) for key, default in dict(kwargs or {}).items()})
    _tap_names.cache_clear()


def names():
    """All registered model names, sorted."""
    return sorted(_REGISTRY)


def _check_dtype(name, dtype):
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        raise errors.ConfigError(
            f"model {name!r}: dtype must be a float dtype (float32, bfloat16, ...), got {dtype!r}")
    return dt


def create(name, num_classes=100, dtype=jnp.float32, **kwargs):
    """Build the linen module registered as `name`.

    `dtype` is the compute dtype (params stay float32, logits are float32).
    Unknown names and unknown or invalid kwargs raise `errors.ConfigError`.
    """
    if name not in _REGISTRY:
        raise errors.unknown_name("model", name, names())
    build, spec = _REGISTRY[name]
    if not (_is_int(num_classes) and num_classes > 0):
        raise errors.ConfigError(
            f"model {name!r}: num_classes must be a positive int, got {num_classes!r}")
    dt = _check_dtype(name, dtype)
    for key, value in kwargs.items():
        if key not in spec:
            allowed = ", ".join(sorted(spec)) or "none"
            raise errors.ConfigError(
                f"model {name!r} got unknown kwarg {key!r}; allowed kwargs: {allowed}")
        expected = spec[key][1](value)
        if expected is not None:
            raise errors.ConfigError(
                f"model {name!r}: kwarg {key!r} must be {expected}, got {value!r}")
    full = {key: kwargs.get(key, default) for key, (default, _) in spec.items()}
    try:
        return build(int(num_classes), dt, **full)
    except (TypeError, ValueError) as e:  # a registered model of one's own that rejects its kwargs
        raise errors.ConfigError(f"model {name!r}: cannot build it with {full} ({errors.first_line(e)})") from None


@functools.lru_cache(maxsize=None)
def _tap_names(name, frozen_kwargs):
    model = create(name, num_classes=10, **dict(frozen_kwargs))
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    shapes = jax.eval_shape(
        lambda inp: model.init({"params": jax.random.key(0)}, inp, train=False, mutable=True), x)
    return tuple(shapes.get("intermediates", {}))


def tap_names(name, **kwargs):
    """Names of the features model `name` (built with `kwargs`) sows into 'intermediates', sorted."""
    frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                          for k, v in kwargs.items()))
    return list(_tap_names(name, frozen))

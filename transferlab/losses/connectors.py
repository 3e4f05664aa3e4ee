"""Connectors: trainable flax modules mapping a student tap to the teacher's shape.

    module = create_connector("conv1x1_bn", teacher_shape)   # e.g. (B, 8, 8, 256)
    variables = module.init(key, student_feature, train=False)
    out, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])

`target` is the teacher tap's shape (an int width is accepted too); for the
multi-tap 'abf' connector, the list of teacher shapes. Connectors live on the
student side: they train with the student and are dropped at export.

Also here: `FusionRatioMLP`, the per-sample fusion-ratio network of the
trilateral-geometry KD loss (not a student-to-teacher connector).
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import flax.linen as nn
import jax.numpy as jnp

from transferlab import errors
from transferlab.models import native_conv
from transferlab.models.batch_norm import BatchNorm

# Connector convolutions run on the native CPU kernels where those apply, like the models' (native_conv).
_Conv = functools.partial(nn.Conv, conv_general_dilated=native_conv.conv_general_dilated)

# kaiming_uniform_(a=1) of the reference ABF convs: gain 1, fan-in, uniform.
_KAIMING_A1 = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def _batch_norm(train: bool, name=None):
    return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def resize_nearest(x, out_hw):
    """NHWC nearest-neighbour resize with torch's F.interpolate(mode='nearest') indices."""
    if tuple(x.shape[1:3]) == tuple(out_hw):
        return x
    rows = np.floor(np.arange(out_hw[0]) * x.shape[1] / out_hw[0]).astype(np.int32)
    cols = np.floor(np.arange(out_hw[1]) * x.shape[2] / out_hw[1]).astype(np.int32)
    return jnp.take(jnp.take(x, jnp.asarray(rows), axis=1), jnp.asarray(cols), axis=2)


def match_spatial(x, out_hw):
    """NHWC `x` brought to `out_hw`: integer-factor average pooling down, nearest up."""
    h, w = x.shape[1:3]
    if (h, w) == tuple(out_hw):
        return x
    if h % out_hw[0] == 0 and w % out_hw[1] == 0:
        fh, fw = h // out_hw[0], w // out_hw[1]
        return nn.avg_pool(x, (fh, fw), strides=(fh, fw))
    if out_hw[0] % h == 0 and out_hw[1] % w == 0:
        return resize_nearest(x, out_hw)
    raise errors.ConfigError(f"connector: cannot map spatial size {(h, w)} to the teacher's {tuple(out_hw)}; "
                             "expected an integer ratio")


class Linear(nn.Module):
    """Dense layer on the last axis (pooled features [B, D] or tokens [B, N, D])."""

    features: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(self.features, name="dense")(x.astype(jnp.float32))


class ConvBN(nn.Module):
    """k x k conv (no bias) + BatchNorm to the teacher's channels, after matching H, W.

    kernel 1 is the FitNet regressor (torchdistill's conv1x1 + BN hint connector);
    kernel 3 a wider-receptive-field variant. Spatial mismatch: integer-factor
    average pooling (student larger) or nearest upsampling (student smaller).
    """

    features: int
    kernel: int = 1
    out_hw: tuple | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.astype(jnp.float32)
        if self.out_hw is not None:
            x = match_spatial(x, self.out_hw)
        x = _Conv(self.features, (self.kernel, self.kernel), padding="SAME", use_bias=False, name="conv")(x)
        return _batch_norm(train, "bn")(x)


class ABFBlock(nn.Module):
    """Attention-based fusion of ReviewKD (arXiv:2104.09044) for one level.

    x -> BN(conv1x1(x)); with a residual from the deeper level: r upsampled (nearest)
    to x's size, z = sigmoid(conv1x1([x, r])) [.., 2], x = x * z0 + r * z1; x is
    resized (nearest) to the teacher's size; out = BN(conv3x3(x)). Returns (out, x),
    x being the residual for the next (shallower) level.
    """

    mid_channels: int
    out_channels: int
    fuse: bool

    @nn.compact
    def __call__(self, x, residual, out_hw, train: bool = False):
        x = _Conv(self.mid_channels, (1, 1), use_bias=False, kernel_init=_KAIMING_A1, name="conv1")(x)
        x = _batch_norm(train, "bn1")(x)
        if self.fuse:
            r = resize_nearest(residual, x.shape[1:3])
            z = nn.sigmoid(_Conv(2, (1, 1), name="att_conv")(jnp.concatenate([x, r], axis=-1)))
            x = x * z[..., 0:1] + r * z[..., 1:2]
        x = resize_nearest(x, out_hw)
        out = _Conv(self.out_channels, (3, 3), padding="SAME", use_bias=False, kernel_init=_KAIMING_A1,
                      name="conv2")(x)
        return _batch_norm(train, "bn2")(out), x


class ReviewABF(nn.Module):
    """ReviewKD's review path: ABF blocks fused deep-to-shallow over a list of student taps.

    Input: student features shallow to deep ([B, H, W, C] maps or pooled [B, D]);
    output: the list in the teacher's shapes (`teacher_shapes`, same order). The
    deepest level has no residual. mid_channels = min(512, width of the deepest
    student feature), as the reference (github.com/dvlab-research/ReviewKD).
    """

    teacher_shapes: Sequence[tuple]
    max_mid_channels: int = 512

    @nn.compact
    def __call__(self, features, train: bool = False):
        feats = [f.astype(jnp.float32) for f in features]
        feats = [f[:, None, None, :] if f.ndim == 2 else f for f in feats]
        mid = min(self.max_mid_channels, feats[-1].shape[-1])
        n = len(feats)
        outs = [None] * n
        residual = None
        for i in reversed(range(n)):
            shape = tuple(self.teacher_shapes[i])
            out_hw = (1, 1) if len(shape) == 2 else shape[1:3]
            block = ABFBlock(mid, shape[-1], fuse=i < n - 1, name=f"abf{i}")
            out, residual = block(feats[i], residual, out_hw, train=train)
            outs[i] = out.reshape(out.shape[0], shape[-1]) if len(shape) == 2 else out
        return outs


class FusionRatioMLP(nn.Module):
    """Per-sample KD / CE fusion ratio of TGeo-KD (arXiv:2312.15112): MLP -> sigmoid.

    Input: `logit.trilateral_features(...)` [B, F]; output: ratio [B] in (0, 1), fed to
    the 'trilateral' loss as batch['fusion_ratio'].
    """

    hidden: int = 64

    @nn.compact
    def __call__(self, feats, train: bool = False):
        h = nn.relu(nn.Dense(self.hidden, name="hidden")(feats.astype(jnp.float32)))
        return nn.sigmoid(nn.Dense(1, name="out")(h))[:, 0]


def _width(target) -> int:
    return int(target) if isinstance(target, (int, np.integer)) else int(tuple(target)[-1])


def _spatial(target):
    shape = () if isinstance(target, (int, np.integer)) else tuple(target)
    return tuple(shape[1:3]) if len(shape) == 4 else None


def _make_linear(target, **kw):
    return Linear(features=_width(target), **kw)


def _make_conv1x1_bn(target, **kw):
    return ConvBN(features=_width(target), kernel=1, out_hw=_spatial(target), **kw)


def _make_conv3x3(target, **kw):
    return ConvBN(features=_width(target), kernel=3, out_hw=_spatial(target), **kw)


def _make_abf(target, **kw):
    if isinstance(target, (int, np.integer)) or not all(isinstance(t, (tuple, list)) for t in target):
        raise errors.ConfigError("connector 'abf' maps a list of taps: it needs the list of teacher shapes "
                                 f"(use it with a multi-tap loss such as 'reviewkd'), got {target!r}")
    return ReviewABF(teacher_shapes=tuple(tuple(t) for t in target), **kw)


_CONNECTORS = {
    "linear": _make_linear,
    "conv1x1_bn": _make_conv1x1_bn,
    "conv3x3": _make_conv3x3,
    "abf": _make_abf,
}


def names() -> list[str]:
    """Connector names."""
    return sorted(_CONNECTORS)


def create_connector(name: str, target, **kw) -> nn.Module:
    """The connector `name` producing `target` (teacher shape, width, or list of shapes for 'abf')."""
    if name not in _CONNECTORS:
        raise errors.unknown_name("connector", name, _CONNECTORS)
    return _CONNECTORS[name](target, **kw)


def init_connector(module: nn.Module, key, student_example):
    """Variables of `module` for inputs like `student_example` (an array or list of arrays)."""
    return module.init({"params": key}, student_example, train=False)


__all__ = ["create_connector", "names", "init_connector", "Linear", "ConvBN", "ABFBlock", "ReviewABF",
           "FusionRatioMLP"]

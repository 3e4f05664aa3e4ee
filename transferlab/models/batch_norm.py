"""Batch normalisation (Ioffe & Szegedy, arXiv:1502.03167) with a hand-written backward.

Drop-in for `flax.linen.BatchNorm(axis=-1, use_fast_variance=True)`: the same
variables (params `scale`, `bias`; batch_stats `mean`, `var`), the same running
update (`momentum * old + (1 - momentum) * batch`, biased batch variance) and the
same statistics `var = max(E[x^2] - E[x]^2, 0)`, up to float rounding order.

Why not Flax's: on XLA:CPU a per-channel sum over (N, H, W) with few channels
in the minor dimension is rewritten into a windowed reduction that is neither
vectorised nor fused with its producer, and autodiff of the normalisation emits
four such reductions per layer plus several elementwise passes. Here

* statistics are summed over a `[rows, k * C]` view of the activations (k
  consecutive pixels side by side, so the minor axis is ~256 floats wide), which
  XLA vectorises, and the k partial sums are folded afterwards;
* the backward is the closed form (one fused pass for `sum(g)` and `sum(g * x)`,
  one fused pass for `dx = g * a + x * b + d` with per-channel a, b, d) instead
  of autodiff through mean and variance.

That is ~10% of a ResNet-20 train step on a 2-core CPU. Under GSPMD the sums
are over the global batch, as with Flax's BatchNorm without `axis_name`.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

# Width (in floats) of the minor axis the per-channel sums are taken over.
_SUM_WIDTH = 256


def _fold_factor(channels: int, rows: int) -> int:
    """How many pixels to lay side by side: a power of two dividing `rows`, k * C ~ 256."""
    k = max(2, _SUM_WIDTH // channels)
    while k > 1 and rows % k:
        k //= 2
    return k


def _channel_sums(a, b=None):
    """Per-channel (last-axis) `sum(a)` and `sum(a * b)` (`sum(a * a)` if b is None), float32."""
    channels = a.shape[-1]
    rows = a.size // channels
    k = _fold_factor(channels, rows)
    wide_a = a.reshape(rows // k, k * channels).astype(jnp.float32)
    wide_b = wide_a if b is None else b.reshape(rows // k, k * channels).astype(jnp.float32)
    sum_a = jnp.sum(wide_a, axis=0).reshape(k, channels).sum(axis=0)
    sum_ab = jnp.sum(wide_a * wide_b, axis=0).reshape(k, channels).sum(axis=0)
    return sum_a, sum_ab


def _per_channel(v, ndim):
    """A [C] vector shaped to broadcast against a [..., C] array of rank `ndim`."""
    return v.reshape((1,) * (ndim - 1) + v.shape)


def _affine(x, gain, shift, out_dtype):
    """x * gain + shift per channel, computed in float32."""
    return (x.astype(jnp.float32) * _per_channel(gain, x.ndim)
            + _per_channel(shift, x.ndim)).astype(out_dtype)


def _statistics(x, scale, bias, epsilon):
    count = x.size // x.shape[-1]
    total, total_sq = _channel_sums(x)
    mean = total / count
    var = jnp.maximum(total_sq / count - mean * mean, 0.0)
    inv_std = jax.lax.rsqrt(var + epsilon)
    gain = scale * inv_std
    y = _affine(x, gain, bias - mean * gain, x.dtype)
    return y, mean, var, inv_std


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def normalize_batch(x, scale, bias, epsilon):
    """Training-mode BN over all but the last axis: returns (y, batch mean, batch var)."""
    y, mean, var, _ = _statistics(x, scale, bias, epsilon)
    return y, mean, var


def _normalize_batch_fwd(x, scale, bias, epsilon):
    y, mean, var, inv_std = _statistics(x, scale, bias, epsilon)
    return (y, mean, var), (x, scale, mean, inv_std)


def _normalize_batch_bwd(epsilon, residuals, cotangents):
    del epsilon
    x, scale, mean, inv_std = residuals
    g_y, g_mean, g_var = cotangents
    count = x.size // x.shape[-1]
    g_sum, gx_sum = _channel_sums(g_y, x)
    g_scale = inv_std * (gx_sum - mean * g_sum)  # sum(g * x_hat)
    # dx = gain * (g - mean(g) - x_hat * mean(g * x_hat)) + dmean/dx * g_mean + dvar/dx * g_var,
    # written as g * a + x * b + d with per-channel a, b, d.
    a = scale * inv_std
    b = -a * inv_std * g_scale / count + 2.0 * g_var / count
    d = -a * g_sum / count - b * mean + g_mean / count
    g_x = (g_y.astype(jnp.float32) * _per_channel(a, x.ndim)
           + _affine(x, b, d, jnp.float32))
    return g_x.astype(x.dtype), g_scale, g_sum


normalize_batch.defvjp(_normalize_batch_fwd, _normalize_batch_bwd)


class BatchNorm(nn.Module):
    """BatchNorm over the last axis (arXiv:1502.03167); Flax `nn.BatchNorm`'s variables.

    `momentum` is the running-average decay (PyTorch's momentum 0.1 is 0.9 here).
    """

    use_running_average: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        x = x.astype(self.dtype)
        if self.use_running_average:
            gain = scale * jax.lax.rsqrt(running_var.value + self.epsilon)
            shift = bias - running_mean.value * gain
            return _affine(x, gain, shift, self.dtype)
        y, mean, var = normalize_batch(x, scale, bias, self.epsilon)
        if not self.is_initializing():
            m = self.momentum
            running_mean.value = m * running_mean.value + (1 - m) * jax.lax.stop_gradient(mean)
            running_var.value = m * running_var.value + (1 - m) * jax.lax.stop_gradient(var)
        return y

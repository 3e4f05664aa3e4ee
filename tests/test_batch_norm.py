"""transferlab's BatchNorm against Flax's nn.BatchNorm: outputs, gradients, running statistics."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transferlab.models import batch_norm

SHAPES = [(4, 8, 8, 16), (3, 5, 7, 6), (10, 12), (2, 4, 4, 256), (24, 3, 3, 8)]


def _pair(shape, seed=0):
    rng = np.random.RandomState(seed)
    x = jnp.asarray(rng.randn(*shape).astype(np.float32) * 3 + 1.5)
    ours = batch_norm.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
    ref = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
    v_ours = ours.init(jax.random.PRNGKey(0), x)
    v_ref = ref.init(jax.random.PRNGKey(0), x)
    assert jax.tree.map(jnp.shape, v_ours) == jax.tree.map(jnp.shape, v_ref)
    c = shape[-1]
    params = {"scale": jnp.asarray(rng.rand(c).astype(np.float32) + 0.5),
              "bias": jnp.asarray(rng.randn(c).astype(np.float32))}
    stats = {"mean": jnp.asarray(rng.randn(c).astype(np.float32)),
             "var": jnp.asarray(rng.rand(c).astype(np.float32) + 0.5)}
    return x, ours, ref, params, stats


@pytest.mark.parametrize("shape", SHAPES)
def test_train_mode_matches_flax(shape):
    x, ours, ref, params, stats = _pair(shape)
    g_out = jnp.asarray(np.random.RandomState(1).randn(*shape).astype(np.float32))

    def run(module):
        def loss(params, x):
            y, upd = module.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
            return jnp.sum(y * g_out) + jnp.sum(y ** 2) * 0.01, (y, upd["batch_stats"])
        (_, (y, new_stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        return y, new_stats, grads

    y, new_stats, (g_params, g_x) = run(ours)
    y_ref, new_stats_ref, (g_params_ref, g_x_ref) = run(ref)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for k in ("mean", "var"):
        np.testing.assert_allclose(new_stats[k], new_stats_ref[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_x, g_x_ref, rtol=1e-4, atol=1e-5)
    for k in ("scale", "bias"):
        np.testing.assert_allclose(g_params[k], g_params_ref[k], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(64, 8, 8, 16), (24, 3, 5, 7), (6, 10), (5, 2, 2, 3), (12,)])
def test_channel_sums_match_float64(shape):
    """The two-stage per-channel sums (8 batch slabs, then the partial sums) for any batch size."""
    rng = np.random.RandomState(4)
    a = rng.randn(*shape).astype(np.float32) * 2 + 1
    b = rng.randn(*shape).astype(np.float32)
    flat_a, flat_b = a.reshape(-1, shape[-1]).astype(np.float64), b.reshape(-1, shape[-1]).astype(np.float64)
    sum_a, sum_aa = jax.jit(batch_norm._channel_sums)(jnp.asarray(a))
    _, sum_ab = jax.jit(batch_norm._channel_sums)(jnp.asarray(a), jnp.asarray(b))
    np.testing.assert_allclose(sum_a, flat_a.sum(0), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(sum_aa, (flat_a ** 2).sum(0), rtol=1e-5)
    np.testing.assert_allclose(sum_ab, (flat_a * flat_b).sum(0), rtol=1e-5, atol=1e-3)
    assert batch_norm._slab_count(shape[0]) == {64: 8, 24: 8, 6: 2, 5: 1, 12: 4}[shape[0]]


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_eval_mode_matches_flax(shape):
    x, _, _, params, stats = _pair(shape)
    ours = batch_norm.BatchNorm(use_running_average=True)
    ref = nn.BatchNorm(use_running_average=True, epsilon=1e-5)
    y = ours.apply({"params": params, "batch_stats": stats}, x)
    y_ref = ref.apply({"params": params, "batch_stats": stats}, x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


def test_gradient_through_batch_statistics():
    """The closed-form backward also carries cotangents of the returned mean and variance."""
    x = jnp.asarray(np.random.RandomState(2).randn(6, 3, 3, 5).astype(np.float32))
    scale = jnp.linspace(0.5, 1.5, 5)
    bias = jnp.linspace(-1, 1, 5)

    def reference(x, scale, bias):
        mean = jnp.mean(x, axis=(0, 1, 2))
        var = jnp.mean(x * x, axis=(0, 1, 2)) - mean ** 2
        y = (x - mean[None, None, None]) * (jax.lax.rsqrt(var + 1e-5) * scale)[None, None, None] \
            + bias[None, None, None]
        return y, mean, var

    def objective(fn):
        def f(x, scale, bias):
            y, mean, var = fn(x, scale, bias)
            return jnp.sum(jnp.sin(y)) + jnp.sum(mean * 3.0) + jnp.sum(jnp.cos(var))
        return jax.grad(f, argnums=(0, 1, 2))(x, scale, bias)

    ours = objective(lambda x, s, b: batch_norm.normalize_batch(x, s, b, 1e-5))
    ref = objective(reference)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bfloat16_activations_keep_float32_statistics():
    x = jnp.asarray(np.random.RandomState(3).randn(4, 4, 4, 8).astype(np.float32)).astype(jnp.bfloat16)
    module = batch_norm.BatchNorm(dtype=jnp.bfloat16)
    variables = module.init(jax.random.PRNGKey(0), x)
    y, upd = module.apply(variables, x, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16
    assert upd["batch_stats"]["mean"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y, np.float32).mean(axis=(0, 1, 2)), 0.0, atol=0.05)

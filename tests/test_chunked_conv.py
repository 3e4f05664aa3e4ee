"""chunked_conv: the same convolution and gradients as lax.conv_general_dilated, sharding-local chunks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from conftest import needs_devices

from transferlab.models import chunked_conv

DIMS = ("NHWC", "HWIO", "NHWC")


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunk test-sized batches too (the default needs 4096 output pixels per chunk)."""
    monkeypatch.setattr(chunked_conv, "MIN_CHUNK_PIXELS", 64)


def _grads(conv, x, w, **kwargs):
    def objective(x, w):
        return jnp.sum(jnp.sin(conv(x, w, dimension_numbers=DIMS, **kwargs)))
    return jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))(x, w)


@pytest.mark.parametrize("batch,size,c_in,c_out,kernel,stride,padding", [
    (32, 16, 4, 6, 3, 1, ((1, 1), (1, 1))),
    (32, 16, 4, 8, 3, 2, ((1, 1), (1, 1))),
    (24, 16, 4, 8, 1, 2, ((0, 0), (0, 0))),
    (16, 20, 3, 5, 3, 1, "SAME"),
    (12, 16, 4, 4, 5, 1, ((2, 1), (0, 2))),
])
def test_gradients_match_lax(small_chunks, batch, size, c_in, c_out, kernel, stride, padding):
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(batch, size, size, c_in).astype(np.float32))
    w = jnp.asarray(rng.randn(kernel, kernel, c_in, c_out).astype(np.float32) * 0.3)
    out_size = -(-size // stride)
    assert chunked_conv.chunk_count(batch, out_size * out_size) > 1  # the chunked path is exercised
    kwargs = dict(window_strides=(stride, stride), padding=padding)
    value, (g_x, g_w) = _grads(chunked_conv.conv_general_dilated, x, w, **kwargs)
    value_ref, (g_x_ref, g_w_ref) = _grads(lax.conv_general_dilated, x, w, **kwargs)
    np.testing.assert_array_equal(value, value_ref)  # forward: XLA's own convolution
    np.testing.assert_array_equal(g_x, g_x_ref)  # input gradient: XLA's own
    np.testing.assert_allclose(g_w, g_w_ref, rtol=2e-5, atol=2e-5 * float(jnp.abs(g_w_ref).max()))


def test_bfloat16_kernels_get_bfloat16_gradients_close_to_float32(small_chunks):
    rng = np.random.RandomState(2)
    x = jnp.asarray(rng.randn(32, 16, 16, 4).astype(np.float32))
    w = jnp.asarray(rng.randn(3, 3, 4, 6).astype(np.float32) * 0.3)
    kwargs = dict(window_strides=(1, 1), padding=((1, 1), (1, 1)))
    _, (_, g_w) = _grads(chunked_conv.conv_general_dilated, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                         **kwargs)
    _, (_, g_w_ref) = _grads(lax.conv_general_dilated, x, w, **kwargs)
    assert g_w.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g_w, np.float32), g_w_ref, rtol=0.05,
                               atol=0.02 * float(jnp.abs(g_w_ref).max()))


def test_chunk_count():
    assert chunked_conv.chunk_count(64, 32 * 32) == 4
    assert chunked_conv.chunk_count(64, 8 * 8) == 1  # 16 images x 64 pixels < 4096 per chunk
    assert chunked_conv.chunk_count(64, 16 * 16) == 4
    assert chunked_conv.chunk_count(10, 32 * 32) == 2  # 10 is not divisible by 4
    assert chunked_conv.chunk_count(12, 32 * 32) == 2  # 3 images per chunk would be < 4096 pixels
    assert chunked_conv.chunk_count(7, 32 * 32) == 1
    assert chunked_conv.chunk_count(2, 28 * 28) == 1


def test_grouped_convolutions_are_plain_lax():
    x = jnp.ones((32, 16, 16, 4))
    w = jnp.ones((3, 3, 1, 4))
    jaxpr = jax.make_jaxpr(lambda x, w: chunked_conv.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=DIMS, feature_group_count=4))(x, w)
    assert "custom_vjp" not in str(jaxpr)


@needs_devices(8)
def test_batch_sharded_chunks_need_no_communication_but_the_gradient_sum(small_chunks):
    """Chunk i takes images i, i + k, ...: each device keeps its share of every chunk."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    rng = np.random.RandomState(1)
    x = jax.device_put(rng.randn(64, 16, 16, 4).astype(np.float32), NamedSharding(mesh, P("data")))
    w = jax.device_put(rng.randn(3, 3, 4, 8).astype(np.float32), NamedSharding(mesh, P()))
    kwargs = dict(window_strides=(1, 1), padding=((1, 1), (1, 1)))
    assert chunked_conv.chunk_count(64, 16 * 16) == 4

    def objective(x, w):
        return jnp.sum(chunked_conv.conv_general_dilated(x, w, dimension_numbers=DIMS, **kwargs) ** 2)

    step = jax.jit(jax.grad(objective, argnums=1))
    hlo = step.lower(x, w).compile().as_text()
    assert "all-to-all" not in hlo and "collective-permute" not in hlo and "all-gather" not in hlo
    expected = jax.grad(lambda x, w: jnp.sum(lax.conv_general_dilated(
        x, w, dimension_numbers=DIMS, **kwargs) ** 2), argnums=1)(np.asarray(x), np.asarray(w))
    np.testing.assert_allclose(step(x, w), expected, rtol=2e-5, atol=1e-3)

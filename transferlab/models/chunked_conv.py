"""`lax.conv_general_dilated` whose weight gradient is summed over batch chunks (XLA:CPU speed).

XLA:CPU computes a convolution's weight gradient as one Eigen convolution whose
"kernel" is the whole output gradient: it first packs every input patch into a
buffer of 9 x the activations for a 3x3 kernel (38 MB for a 64 x 32 x 32 x 16
CIFAR activation), which streams through memory instead of cache. Computing it
as the sum of the weight gradients of k batch chunks (k <= 4, each chunk at
least 4096 output pixels) keeps each packing buffer ~k times smaller: the
weight gradient of a ResNet-20 stage-1 convolution is ~25% faster on a 2-core
CPU, the stage-2 ones ~20% (bench/results_cpu.md). The input gradient and the
forward pass are XLA's own.

Chunk i holds images i, i + k, i + 2k, ...: under data parallelism (the batch
sharded in contiguous blocks) every device keeps its share of every chunk, so
the chunking moves no data between devices. Sums in a different order than one
convolution: weight gradients differ in the last float bits. Only on the CPU
backend and for ungrouped convolutions; elsewhere, and for small batches, this
is `lax.conv_general_dilated` exactly. On one CPU device `native_conv`'s
kernels are faster still: models use this where those do not apply (a
sharded CPU mesh, bfloat16), and for weight gradients too wide for them.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

# At most this many chunks, each with at least this many output pixels.
MAX_CHUNKS = 4
MIN_CHUNK_PIXELS = 4096


def chunk_count(batch: int, pixels_per_image: int) -> int:
    """How many batch chunks the weight gradient is summed over (1: not chunked)."""
    k = MAX_CHUNKS
    while k > 1 and (batch % k or (batch // k) * pixels_per_image < MIN_CHUNK_PIXELS):
        k //= 2
    return k


def _take_chunk(x, axis: int, k: int, i: int):
    """Every k-th slice of `x` along `axis`, starting at i."""
    shape = x.shape[:axis] + (x.shape[axis] // k, k) + x.shape[axis + 1:]
    return lax.index_in_dim(x.reshape(shape), i, axis + 1, keepdims=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(lhs, rhs, conv, batch_axes, k):
    return conv(lhs, rhs)


def _conv_fwd(lhs, rhs, conv, batch_axes, k):
    return conv(lhs, rhs), (lhs, rhs)


def _conv_bwd(conv, batch_axes, k, residuals, g_out):
    lhs, rhs = residuals
    lhs_axis, out_axis = batch_axes
    _, input_vjp = jax.vjp(lambda x: conv(x, rhs), lhs)
    (g_lhs,) = input_vjp(g_out)
    g_rhs = jnp.zeros(rhs.shape, jnp.float32)  # bfloat16 kernels: partial gradients added in float32
    for i in range(k):
        lhs_i = _take_chunk(lhs, lhs_axis, k, i)
        _, kernel_vjp = jax.vjp(lambda w: conv(lhs_i, w), rhs)
        (g_i,) = kernel_vjp(_take_chunk(g_out, out_axis, k, i))
        g_rhs = g_rhs + g_i.astype(jnp.float32)
    return g_lhs, g_rhs.astype(rhs.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
    """Drop-in for `lax.conv_general_dilated` (and `nn.Conv(conv_general_dilated=...)`)."""
    plain = functools.partial(
        lax.conv_general_dilated, window_strides=window_strides, padding=padding,
        lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)
    if (jax.default_backend() != "cpu" or feature_group_count != 1 or batch_group_count != 1
            or preferred_element_type is not None):
        return plain(lhs, rhs)
    dims = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    out_shape = jax.eval_shape(plain, lhs, rhs).shape
    pixels = 1
    for axis in dims.out_spec[2:]:
        pixels *= out_shape[axis]
    k = chunk_count(lhs.shape[dims.lhs_spec[0]], pixels)
    if k == 1:
        return plain(lhs, rhs)
    return _conv(lhs, rhs, plain, (dims.lhs_spec[0], dims.out_spec[0]), k)

"""Shared pieces for the model zoo: PyTorch-matching initialisers, conv/BN/dense
factories, channel shuffle, pooling and the fusion barrier.

All layers keep parameters in float32 (`param_dtype`) and compute in `dtype`.
Padding is explicit (PyTorch style, `padding=k // 2` on both sides), not 'SAME',
so strided convolutions see the same pixels as in the reference PyTorch code.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from transferlab.models import native_conv
from transferlab.models.batch_norm import BatchNorm

PARAM_DTYPE = jnp.float32

# Kaiming normal, fan_out, gain sqrt(2): what RepDistiller uses for every conv
# (resnet: kaiming_normal_(mode='fan_out'); wrn/vgg/mobilenet: N(0, sqrt(2/(k*k*out)))).
conv_kaiming_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# PyTorch's default Conv/Linear weight init: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias(fan_in: int):
    """PyTorch's default bias init U(+-1/sqrt(fan_in)) for a layer with `fan_in` inputs."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=PARAM_DTYPE):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def conv(features, kernel, dtype, stride=1, groups=1, use_bias=False,
         kernel_init=conv_kaiming_out, name=None):
    """A k x k convolution padded by k // 2 on each side, like nn.Conv2d(padding=k//2).

    On one CPU device its weight gradient is a native kernel (`native_conv`), on a sharded CPU mesh it is
    summed over batch chunks (`chunked_conv`).
    """
    pad = kernel // 2
    return nn.Conv(
        features, (kernel, kernel), strides=(stride, stride),
        padding=((pad, pad), (pad, pad)), feature_group_count=groups,
        use_bias=use_bias, kernel_init=kernel_init, bias_init=nn.initializers.zeros,
        dtype=dtype, param_dtype=PARAM_DTYPE, name=name,
        conv_general_dilated=native_conv.conv_general_dilated)


def batch_norm(train: bool, dtype=jnp.float32, name=None):
    """BatchNorm with PyTorch's defaults (momentum 0.1 there = 0.9 here, eps 1e-5).

    `batch_norm.BatchNorm`: Flax BatchNorm's variables, a faster CPU backward.
    Unlike PyTorch, the running variance is updated with the biased batch
    variance (a factor n/(n-1) apart, n = B*H*W; negligible at CIFAR sizes).
    """
    return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                     dtype=dtype, name=name)


def dense(features, fan_in, dtype, kernel_init=None, bias_init=None, name=None):
    """A Linear layer; PyTorch's default init unless `kernel_init`/`bias_init` are given."""
    return nn.Dense(
        features,
        kernel_init=torch_default_kernel if kernel_init is None else kernel_init,
        bias_init=torch_default_bias(fan_in) if bias_init is None else bias_init,
        dtype=dtype, param_dtype=PARAM_DTYPE, name=name)


def global_avg_pool(x_BxHxWxC):
    """Mean over the spatial axes (equals RepDistiller's fixed AvgPool at 32x32 input)."""
    return jnp.mean(x_BxHxWxC, axis=(1, 2))


def channel_shuffle(x_BxHxWxC, groups: int):
    """ShuffleNet channel shuffle: channel i*(C/g)+j moves to j*g+i (as in PyTorch NCHW)."""
    if groups == 1:
        return x_BxHxWxC
    b, h, w, c = x_BxHxWxC.shape
    x = x_BxHxWxC.reshape(b, h, w, groups, c // groups)
    return jnp.swapaxes(x, 3, 4).reshape(b, h, w, c)


def fusion_barrier(x, enabled: bool):
    """Stop XLA fusing across a residual block boundary; the identity on finite values.

    On XLA:CPU the BN -> add -> ReLU chain of a block otherwise gets duplicated
    into (recomputed inside) the layout transposes feeding the next block's
    weight-gradient convolutions. XLA does not duplicate a divide (an "expensive"
    op), so dividing by a ones tensor it cannot constant-fold (x * 0 + 1, which
    it may not simplify for floats) materialises the block output once; the
    backward gets the same treatment (g / 1). x / 1 == x exactly, so results are
    bitwise unchanged (only inf/nan activations turn into nan). This gives ~10%
    faster ResNet train steps on CPU. `jax.lax.optimization_barrier` does not
    work for this: XLA:CPU removes it before fusion.

    It applies on the CPU backend only: on an H200 GPU the same barrier made the
    resnet56 -> resnet20 KD step ~10% slower (bench/results_gpu.md), since XLA:GPU
    has no such transposes to protect and the barrier only splits its fusions.
    """
    if not enabled or jax.default_backend() != "cpu":
        return x
    return x / jax.lax.stop_gradient(x * 0 + 1)


def logits_f32(logits):
    """Logits are always returned (and tapped) as float32."""
    return logits.astype(jnp.float32)


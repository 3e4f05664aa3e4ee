"""`lax.conv_general_dilated` on native XLA:CPU kernels (`transferlab/kernels/conv2d.cc`).

On a 2-core CPU, XLA's convolutions are most of the gap to PyTorch's oneDNN in a ResNet train step
(bench/results_cpu.md): its weight gradients transpose the input and the output gradient to batch-minor
layouts and run an Eigen convolution over an im2col buffer (2-5x slower than a direct loop at CIFAR sizes),
its forward convolutions ~1.5x. Here the forward pass, the input gradient of stride-1 convolutions (the
forward kernel on the output gradient with the kernel flipped and transposed) and the weight gradient run on
direct loops, where `bench/conv_kernels.py` measured them faster (`_native`); everything else is XLA's. Every piece is differentiable again (the weight gradient is bilinear: its
vector-Jacobian products are a convolution and an input gradient), so look-ahead methods that differentiate
through a gradient step (TGeo-KD) work unchanged. Reverse mode only: the pieces are `jax.custom_vjp`s, so
forward-mode differentiation (`jax.jvp`, `jax.jacfwd`, `jax.hessian`) of a model on the kernels raises JAX's
"can't apply forward-mode autodiff (jvp) to a custom_vjp function"; nothing in transferlab uses it, and
`TRANSFERLAB_NATIVE_KERNELS=0` gives XLA's convolutions, which support it.

It applies where the whole computation runs on one CPU device (a CPU run with one device, the library's
default there) with AVX-512, for float32 NHWC/HWIO convolutions without dilation or groups. Elsewhere (GPUs,
TPUs, sharded CPU meshes, CPUs without AVX-512, bfloat16, grouped convolutions), where the kernels cannot be
built, or with
`TRANSFERLAB_NATIVE_KERNELS=0`, `conv_general_dilated` is `chunked_conv.conv_general_dilated`. Results equal
XLA's to float rounding (~1e-6 relative: the sums run in another order) and are bitwise reproducible run to
run, whatever the thread count.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from transferlab.kernels import build
from transferlab.models import chunked_conv

KERNEL = "conv2d"
_NHWC = ("NHWC", "HWIO", "NHWC")
# Where the kernels beat XLA (bench/conv_kernels.py, 2-core Xeon, batch 64): kernels of up to 3 x 3 x 64 x 64
# weights (the forward kernel streams all the weights once per block of 8 pixels x 32 channels, so XLA's
# packed GEMM wins from 3 x 3 x 128 x 128 on; 1 x 1 kernels up to ~190 x 190 channels are still faster here),
# with the channels a kernel vectorizes over (the output channels of the forward pass and of the weight
# gradient; the input channels of an input gradient) a multiple of 8.
MAX_WEIGHTS = 3 * 3 * 64 * 64
VECTOR_CHANNELS = 8


def _plain(lhs, rhs, strides, padding):
    return lax.conv_general_dilated(lhs, rhs, strides, padding, dimension_numbers=_NHWC)


def _ffi(suffix, out_shape, a, b, strides, padding):
    if build.load(KERNEL) is None:  # registers the handlers (conv_general_dilated checks this first)
        raise RuntimeError(f"native conv kernels unavailable here: {status()}")
    call = jax.ffi.ffi_call(build.target_name(KERNEL, suffix), jax.ShapeDtypeStruct(out_shape, jnp.float32),
                            vmap_method="sequential")
    return call(a, b, stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
                pad_h=np.int64(padding[0][0]), pad_w=np.int64(padding[1][0]))


def _native(rhs_shape) -> bool:
    """Whether the forward or weight-gradient kernel is faster than XLA for an HWIO kernel of this shape."""
    return math.prod(rhs_shape) <= MAX_WEIGHTS and rhs_shape[3] % VECTOR_CHANNELS == 0


def _forward(lhs, rhs, strides, padding):
    if not _native(rhs.shape):
        return _plain(lhs, rhs, strides, padding)
    out_shape = jax.eval_shape(functools.partial(_plain, strides=strides, padding=padding), lhs, rhs).shape
    return _ffi("forward", out_shape, lhs, rhs, strides, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def weight_grad(x, dy, kernel_shape, strides, padding):
    """d<conv(x, w), dy>/dw for an NHWC/HWIO convolution with a kernel of `kernel_shape`."""
    if not _native(kernel_shape):  # XLA's, summed over batch chunks
        _, kernel_vjp = jax.vjp(lambda w: chunked_conv.conv_general_dilated(
            x, w, strides, padding, dimension_numbers=_NHWC), jnp.zeros(kernel_shape, x.dtype))
        return kernel_vjp(dy)[0]
    return _ffi("weight_grad", kernel_shape, x, dy, strides, padding)


def _weight_grad_fwd(x, dy, kernel_shape, strides, padding):
    return weight_grad(x, dy, kernel_shape, strides, padding), (x, dy)


def _weight_grad_bwd(kernel_shape, strides, padding, residuals, g_w):
    # <weight_grad(x, dy), c> = <conv(x, c), dy>: bilinear in x and dy.
    x, dy = residuals
    return input_grad(dy, g_w, x.shape, strides, padding), conv(x, g_w, strides, padding)


weight_grad.defvjp(_weight_grad_fwd, _weight_grad_bwd)


def input_grad(dy, rhs, lhs_shape, strides, padding):
    """d<conv(x, rhs), dy>/dx for an NHWC/HWIO convolution of an input of `lhs_shape`."""
    kh, kw = rhs.shape[:2]
    flipped_pads = ((kh - 1 - padding[0][0], kh - 1 - padding[0][1]),
                    (kw - 1 - padding[1][0], kw - 1 - padding[1][1]))
    flipped = jnp.swapaxes(rhs[::-1, ::-1], 2, 3)
    if strides == (1, 1) and all(p >= 0 for pair in flipped_pads for p in pair) and _native(flipped.shape):
        # The transposed convolution of a stride-1 convolution: a convolution of dy with the kernel
        # flipped in space and its in/out channels swapped.
        return conv(dy, flipped, (1, 1), flipped_pads)
    _, input_vjp = jax.vjp(lambda x: _plain(x, rhs, strides, padding), jnp.zeros(lhs_shape, dy.dtype))
    return input_vjp(dy)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(lhs, rhs, strides, padding):
    """An NHWC/HWIO convolution with explicit (low, high) padding, on the native kernels where faster."""
    return _forward(lhs, rhs, strides, padding)


def _conv_fwd(lhs, rhs, strides, padding):
    # `conv` itself, not `_forward`: under a second differentiation (a gradient of a gradient) this rule is
    # differentiated too, and the FFI call has no derivative of its own.
    return conv(lhs, rhs, strides, padding), (lhs, rhs)


def _conv_bwd(strides, padding, residuals, g_out):
    lhs, rhs = residuals
    return (input_grad(g_out, rhs, lhs.shape, strides, padding),
            weight_grad(lhs, g_out, rhs.shape, strides, padding))


conv.defvjp(_conv_fwd, _conv_bwd)


def status(dtype="float32") -> str:
    """Which convolutions a run of models computing in `dtype` gets in this process: 'native' or 'XLA (why)'
    (recorded in each run's environment)."""
    if not _one_cpu_device():
        return "XLA (not one CPU device)"
    if jnp.dtype(dtype) != jnp.float32:
        return f"XLA ({jnp.dtype(dtype).name}: the kernels are float32)"
    if not build.enabled():
        return f"XLA ({build.DISABLE_ENV}=0)"
    if not build.supported(KERNEL):
        return f"XLA (no {build.KERNELS[KERNEL][2]} on this CPU)"
    if build.load(KERNEL) is None:
        return f"XLA (kernels not built here: {build.failure(KERNEL)})"[:300]
    return "native"


def _one_cpu_device() -> bool:
    """Whether computations here run on a single CPU device (where the kernels, unpartitioned, may serve)."""
    return jax.default_backend() == "cpu" and jax.device_count() == 1


def _unit(values) -> bool:
    return values is None or all(v == 1 for v in values)


def applies(lhs, rhs, window_strides, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
            feature_group_count=1, batch_group_count=1, preferred_element_type=None) -> bool:
    """Whether this convolution runs on the native kernels (see the module doc)."""
    if (not _one_cpu_device() or lhs.ndim != 4
            or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32 or preferred_element_type is not None
            or feature_group_count != 1 or batch_group_count != 1 or not _unit(lhs_dilation)
            or not _unit(rhs_dilation) or len(window_strides) != 2):
        return False
    if (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)):
        return False
    return build.load(KERNEL) is not None


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
    """Drop-in for `lax.conv_general_dilated` (and `nn.Conv(conv_general_dilated=...)`)."""
    if applies(lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers,
               feature_group_count, batch_group_count, preferred_element_type):
        if isinstance(padding, str):
            padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
        if all(p >= 0 for pair in pads for p in pair):
            return conv(lhs, rhs, tuple(int(s) for s in window_strides), pads)
    return chunked_conv.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type)

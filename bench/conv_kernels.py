"""Native conv kernels vs XLA:CPU, per convolution of the model zoo's shapes (batch 64, float32, one device).

Times, for each shape, the forward pass, the input gradient and the weight gradient as XLA computes them and
as `transferlab.models.native_conv`'s kernels do (forced on, whatever its size thresholds say), in the same
process, interleaved, median of --iters calls; checks that both agree. The thresholds
`native_conv.MAX_WEIGHTS` and `VECTOR_CHANNELS` come from this table.

    .venv/bin/python bench/conv_kernels.py [--iters 30] [--batch 64]
"""

import argparse
import functools
import os
import platform
import sys
import time

import transferlab  # noqa: F401  (XLA:CPU flags before JAX starts)

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from transferlab.kernels import build
from transferlab.models import native_conv

# (label, H=W, in channels, out channels, kernel, stride)
SHAPES = [
    ("resnet stem", 32, 3, 16, 3, 1),
    ("resnet20/56 stage 1", 32, 16, 16, 3, 1),
    ("resnet20/56 down 1->2", 32, 16, 32, 3, 2),
    ("resnet20/56 stage 2", 16, 32, 32, 3, 1),
    ("resnet20/56 down 2->3", 16, 32, 64, 3, 2),
    ("resnet20/56 stage 3", 8, 64, 64, 3, 1),
    ("projection 16->32", 32, 16, 32, 1, 2),
    ("projection 32->64", 16, 32, 64, 1, 2),
    ("resnet8x4 stage 1", 32, 64, 64, 3, 1),
    ("resnet8x4 stage 2", 16, 128, 128, 3, 1),
    ("resnet8x4 stage 3", 8, 256, 256, 3, 1),
    ("wrn_16_2 stage 1", 32, 32, 32, 3, 1),
    ("wrn_16_2 stage 3", 8, 128, 128, 3, 1),
    ("vgg 64", 32, 64, 64, 3, 1),
    ("vgg 128", 16, 128, 128, 3, 1),
    ("vgg 512", 4, 512, 512, 3, 1),
    ("1x1 expand 24->144", 16, 24, 144, 1, 1),
    ("1x1 116->116", 8, 116, 116, 1, 1),
    ("lenet 5x5 1->6", 28, 1, 6, 5, 1),
    ("lenet 5x5 6->16", 14, 6, 16, 5, 1),
]


def _time(fn, *args, iters):
    fn(*args).block_until_ready()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)
    if build.load(native_conv.KERNEL) is None:
        print("native kernels unavailable here (see the note above)", file=sys.stderr)
        return 1
    print(f"# native conv kernels vs XLA:CPU, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()}), batch {args.batch}, median of {args.iters}")
    print(f"# jax {jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print("| convolution | HxW | in→out | k/s | fwd XLA ms | fwd native ms | input grad XLA ms | "
          "input grad native ms | weight grad XLA ms | weight grad native ms | max rel diff |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for label, size, c_in, c_out, k, s in SHAPES:
        p = k // 2
        pads = ((p, p), (p, p))
        x = jnp.asarray(rng.standard_normal((args.batch, size, size, c_in), np.float32))
        w = jnp.asarray(rng.standard_normal((k, k, c_in, c_out), np.float32) / np.sqrt(k * k * c_in))
        plain = functools.partial(native_conv._plain, strides=(s, s), padding=pads)
        y_shape = jax.eval_shape(plain, x, w).shape
        dy = jnp.asarray(rng.standard_normal(y_shape, np.float32))
        xla = {
            "fwd": jax.jit(plain),
            "input": jax.jit(lambda dy, w: jax.vjp(lambda x_: plain(x_, w), x)[1](dy)[0]),
            "weight": jax.jit(lambda x, dy: jax.vjp(lambda w_: plain(x, w_), w)[1](dy)[0]),
        }
        ffi = functools.partial(native_conv._ffi, strides=(s, s), padding=pads)
        native = {
            "fwd": jax.jit(lambda x, w: ffi("forward", y_shape, x, w)),
            "weight": jax.jit(lambda x, dy: ffi("weight_grad", w.shape, x, dy)),
        }
        if s == 1:
            flipped = ((k - 1 - p, k - 1 - p),) * 2
            native["input"] = jax.jit(lambda dy, w: native_conv._ffi(
                "forward", x.shape, dy, jnp.swapaxes(w[::-1, ::-1], 2, 3), (1, 1), flipped))
        operands = {"fwd": (x, w), "input": (dy, w), "weight": (x, dy)}
        row, worst = [], 0.0
        for kind in ("fwd", "input", "weight"):
            row.append(_time(xla[kind], *operands[kind], iters=args.iters))
            if kind in native:
                ref, got = xla[kind](*operands[kind]), native[kind](*operands[kind])
                worst = max(worst, float(jnp.abs(ref - got).max() / jnp.abs(ref).max()))
                row.append(_time(native[kind], *operands[kind], iters=args.iters))
            else:
                row.append(float("nan"))
        cells = " | ".join("—" if np.isnan(v) else f"{v:.2f}" for v in row)
        print(f"| {label} | {size}x{size} | {c_in}→{c_out} | {k}/{s} | {cells} | {worst:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

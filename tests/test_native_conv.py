"""native_conv and kernels/conv2d.cc: the XLA:CPU conv kernels against lax, their dispatch, build cache and a
kill-and-resume on them.

The suite runs 8 simulated devices, where `native_conv.applies` says no (the kernels are for one CPU
device): these tests call the kernels directly, or patch the device count, and the CLI tests here run one
device (like `make run`)."""

import json
import os
import signal
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from transferlab import config as config_lib
from transferlab.kernels import build
from transferlab.models import layers, native_conv

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="kernels for XLA:CPU")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIMS = ("NHWC", "HWIO", "NHWC")


@pytest.fixture(scope="module")
def kernels():
    """The kernels must build wherever a C++ compiler is (CI's machines have g++) and the CPU has AVX-512."""
    if build.compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    if not build.supported(native_conv.KERNEL):
        pytest.skip("this CPU has no AVX-512: the conv kernels are not built (tested below: XLA's are used)")
    assert build.load(native_conv.KERNEL) is not None


def _lax(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DIMS)


def _close(got, want, rtol=2e-6):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(jnp.abs(want).max()))


# Shapes chosen to reach every register block: output channels 1-3 (scalar tails), 4-7, 8-15, 16, 32+
# (two vectors per block), input channels not a multiple of 16; strides 1-3, asymmetric and over-wide padding,
# 1x1 / 3x3 / 5x5 / non-square kernels, rows shorter and longer than a pixel block.
SHAPES = [  # batch, H, W, c_in, c_out, (kh, kw), strides, padding
    (3, 9, 9, 3, 16, (3, 3), (1, 1), ((1, 1), (1, 1))),
    (2, 17, 13, 5, 7, (3, 3), (2, 2), ((1, 1), (1, 1))),
    (4, 8, 8, 19, 33, (3, 3), (1, 1), ((1, 1), (1, 1))),
    (2, 12, 12, 16, 64, (1, 1), (2, 2), ((0, 0), (0, 0))),
    (1, 20, 6, 2, 1, (5, 5), (1, 1), ((2, 1), (0, 2))),
    (2, 7, 7, 8, 24, (3, 2), (3, 1), ((0, 3), (2, 2))),
    (9, 34, 34, 32, 48, (3, 3), (1, 1), ((1, 1), (1, 1))),
]


def _operands(shape, seed, kernel_scale=1.0):
    """(x, kernel, strides, padding, the generator for more draws) of a SHAPES row, from RandomState(seed)."""
    batch, h, w, c_in, c_out, (kh, kw), strides, padding = shape
    rng = np.random.RandomState(seed)
    x = jnp.asarray(rng.randn(batch, h, w, c_in).astype(np.float32))
    k = jnp.asarray(rng.randn(kh, kw, c_in, c_out).astype(np.float32) * kernel_scale)
    return x, k, strides, padding, rng


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_the_kernels_compute_what_lax_computes(shape):
    x, k, strides, padding, rng = _operands(shape, seed=0)
    y = _lax(x, k, strides, padding)
    dy = jnp.asarray(rng.randn(*y.shape).astype(np.float32))
    forward = jax.jit(lambda x, k: native_conv._ffi("forward", y.shape, x, k, strides, padding))
    _close(forward(x, k), y)
    weight_grad = jax.jit(lambda x, dy: native_conv._ffi("weight_grad", k.shape, x, dy, strides, padding))
    _, kernel_vjp = jax.vjp(lambda k_: _lax(x, k_, strides, padding), k)
    got = weight_grad(x, dy)
    _close(got, kernel_vjp(dy)[0], rtol=1e-5)
    # the same bits every time: fixed chunks, summed in a fixed order, whatever the threads do
    np.testing.assert_array_equal(weight_grad(x, dy), got)


@pytest.mark.usefixtures("kernels")
def test_the_kernels_refuse_inconsistent_shapes_and_negative_padding():
    x, w = jnp.ones((1, 4, 4, 3), jnp.float32), jnp.ones((3, 3, 3, 4), jnp.float32)
    with pytest.raises(Exception, match="conv2d forward: NHWC input and output, HWIO kernel of matching sizes"):
        jax.jit(lambda x, w: native_conv._ffi("forward", (1, 4, 4, 5), x, w, (1, 1), ((1, 1), (1, 1))))(x, w)
    with pytest.raises(Exception, match="conv2d weight_grad: strides and kernel sizes must be >= 1, padding >= 0"):
        jax.jit(lambda x, dy: native_conv._ffi("weight_grad", w.shape, x, dy, (1, 1), ((-1, 1), (1, 1))))(
            x, jnp.ones((1, 4, 4, 4), jnp.float32))


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gradients_and_gradients_of_gradients_match_lax(shape):
    x, k, strides, padding, _ = _operands(shape, seed=1, kernel_scale=0.3)

    def objective(conv):
        return lambda x, k: jnp.sum(jnp.sin(conv(x, k, strides, padding)))

    value, grads = jax.jit(jax.value_and_grad(objective(native_conv.conv), argnums=(0, 1)))(x, k)
    value_ref, grads_ref = jax.jit(jax.value_and_grad(objective(_lax), argnums=(0, 1)))(x, k)
    _close(value, value_ref, rtol=1e-5)
    for got, want in zip(grads, grads_ref):
        _close(got, want, rtol=1e-5)

    # A look-ahead (TGeo-KD) differentiates through a gradient step: the weight gradient, the input gradient
    # and the forward pass are each differentiated again.
    def second_order(conv):
        def f(x, k):
            g_x, g_k = jax.grad(objective(conv), argnums=(0, 1))(x, k)
            return jnp.sum(g_k ** 2) + jnp.sum(jnp.cos(g_x))
        return jax.jit(jax.grad(f, argnums=(0, 1)))(x, k)

    for got, want in zip(second_order(native_conv.conv), second_order(_lax)):
        _close(got, want, rtol=2e-5)


@pytest.mark.usefixtures("kernels")
def test_vmap_over_the_native_convolution():
    rng = np.random.RandomState(2)
    x = jnp.asarray(rng.randn(3, 2, 8, 8, 4).astype(np.float32))
    k = jnp.asarray(rng.randn(3, 3, 3, 4, 8).astype(np.float32))
    pads = ((1, 1), (1, 1))
    got = jax.vmap(jax.grad(lambda x, k: jnp.sum(native_conv.conv(x, k, (1, 1), pads) ** 2), argnums=1))(x, k)
    want = jax.vmap(jax.grad(lambda x, k: jnp.sum(_lax(x, k, (1, 1), pads) ** 2), argnums=1))(x, k)
    _close(got, want, rtol=1e-5)


def _uses_kernels(fn, *args) -> bool:
    return "transferlab_conv2d" in str(jax.make_jaxpr(jax.grad(fn))(*args))


@pytest.mark.usefixtures("kernels")
def test_models_use_the_kernels_on_one_cpu_device_only(monkeypatch):
    model = layers.conv(16, 3, jnp.float32)
    x = jnp.ones((2, 8, 8, 8), jnp.float32)
    params = model.init(jax.random.PRNGKey(0), x)

    def loss(p, x=x):
        return jnp.sum(model.apply(p, x) ** 2)

    assert not _uses_kernels(loss, params)  # 8 devices: a sharded mesh may split the batch
    monkeypatch.setattr(jax, "device_count", lambda *a: 1)
    assert _uses_kernels(loss, params) and native_conv.status() == "native"
    assert native_conv.status("bfloat16") == "XLA (bfloat16: the kernels are float32)"  # a bfloat16 run's record
    bf16 = layers.conv(16, 3, jnp.bfloat16)
    assert not _uses_kernels(lambda p: jnp.sum(bf16.apply(p, x.astype(jnp.bfloat16)).astype(jnp.float32)),
                             bf16.init(jax.random.PRNGKey(0), x))  # float32 only
    grouped = layers.conv(16, 3, jnp.float32, groups=8)
    assert not _uses_kernels(lambda p: jnp.sum(grouped.apply(p, x)), grouped.init(jax.random.PRNGKey(0), x))
    monkeypatch.setenv(build.DISABLE_ENV, "0")
    assert not _uses_kernels(loss, params) and native_conv.status() == f"XLA ({build.DISABLE_ENV}=0)"


@pytest.mark.usefixtures("kernels")
def test_kernel_sizes_the_kernels_lose_on_stay_on_xla(monkeypatch):
    """bench/conv_kernels.py: XLA is faster beyond 3 x 3 x 64 x 64 weights and for output channels not a
    multiple of 8; the forward/weight gradient/input gradient each pick for themselves."""
    monkeypatch.setattr(jax, "device_count", lambda *a: 1)
    x = jnp.ones((2, 8, 8, 128), jnp.float32)

    def jaxpr(c_in, c_out, size=3):
        k = jnp.ones((size, size, c_in, c_out), jnp.float32)
        return str(jax.make_jaxpr(jax.grad(lambda x, k: jnp.sum(native_conv.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=DIMS)), argnums=(0, 1)))(x[..., :c_in], k))

    assert "conv2d_forward" not in jaxpr(128, 128) and "conv2d_weight_grad" not in jaxpr(128, 128)
    assert jaxpr(128, 128, size=1).count("conv2d_forward") == 2 and "conv2d_weight_grad" in jaxpr(128, 128, size=1)
    six = jaxpr(16, 6)  # forward and weight gradient vectorize over 6 channels: XLA; the input gradient over 16
    assert "conv2d_weight_grad" not in six and six.count("conv2d_forward") == 1


@pytest.mark.usefixtures("kernels")
def test_the_build_is_cached_per_source_compiler_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERLAB_KERNEL_CACHE", str(tmp_path))
    cxx = build.compiler()
    path = build.library_path(native_conv.KERNEL, cxx)
    assert os.path.dirname(path) == str(tmp_path)
    build.compile_library(native_conv.KERNEL, cxx, path)
    name = os.path.basename(path)
    assert sorted(os.listdir(tmp_path)) == [name, name + ".sha256"]  # no temporary file left behind
    assert build._open(native_conv.KERNEL, path) is not None
    monkeypatch.setattr(build, "_cpu_signature", lambda: "flags : another cpu avx512f")
    assert build.library_path(native_conv.KERNEL, cxx) != path  # -march=native code is not shared across CPUs


@pytest.mark.usefixtures("kernels")
def test_a_damaged_or_foreign_library_in_the_cache_is_never_opened(tmp_path, monkeypatch):
    """dlopen of a shared object cut short (a full disk, a kill mid-copy) can crash the process (SIGBUS):
    only a file whose digest matches the one recorded at its build is opened, and only with every handler."""
    monkeypatch.setenv("TRANSFERLAB_KERNEL_CACHE", str(tmp_path))
    path = build.library_path(native_conv.KERNEL, build.compiler())
    build.compile_library(native_conv.KERNEL, build.compiler(), path)
    whole = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(whole[: len(whole) // 2])
    assert build._open(native_conv.KERNEL, path) is None
    os.remove(path + ".sha256")
    with open(path, "wb") as f:
        f.write(whole)
    assert build._open(native_conv.KERNEL, path) is None  # no recorded digest: built again
    import _ctypes
    import shutil
    shutil.copy(_ctypes.__file__, path)  # a loadable shared object without the handlers
    with open(path + ".sha256", "w") as f:
        f.write(build._file_digest(path))
    assert build._open(native_conv.KERNEL, path) is None


def test_without_a_working_compiler_the_convolutions_are_xla_and_a_note_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRANSFERLAB_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    monkeypatch.setattr(build, "supported", lambda name: True)  # whatever this CPU is
    monkeypatch.setattr(build, "_LOADED", {})
    monkeypatch.setattr(build, "_FAILURES", {})
    monkeypatch.setattr(jax, "device_count", lambda *a: 1)
    x = jnp.ones((2, 8, 8, 8), jnp.float32)
    k = jnp.ones((3, 3, 8, 16), jnp.float32)
    out = native_conv.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=DIMS)
    np.testing.assert_array_equal(out, _lax(x, k, (1, 1), ((1, 1), (1, 1))))
    err = capsys.readouterr().err
    assert err.count("[note] native CPU kernel 'conv2d' unavailable, using XLA's operations instead") == 1
    import shutil
    assert native_conv.status() == f"XLA (kernels not built here: {shutil.which('false')} failed (exit 1))"
    assert os.listdir(tmp_path) == []


AVX2_CHECK = """
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from transferlab.kernels import build
from transferlab.models import native_conv
assert build.load(native_conv.KERNEL) is not None
rng = np.random.RandomState(0)
for c_in, c_out, k, s in ((3, 16, 3, 1), (16, 24, 3, 2), (19, 40, 3, 1), (8, 7, 1, 1)):
    x = jnp.asarray(rng.randn(3, 9, 9, c_in).astype(np.float32))
    w = jnp.asarray(rng.randn(k, k, c_in, c_out).astype(np.float32))
    pads = ((k // 2, k // 2),) * 2
    conv = lambda x, w: lax.conv_general_dilated(x, w, (s, s), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = conv(x, w)
    got = native_conv._ffi("forward", y.shape, x, w, (s, s), pads)
    np.testing.assert_allclose(got, y, rtol=2e-6, atol=2e-6 * float(jnp.abs(y).max()))
    dw = jax.vjp(lambda w_: conv(x, w_), w)[1](y)[0]
    got = native_conv._ffi("weight_grad", w.shape, x, y, (s, s), pads)
    np.testing.assert_allclose(got, dw, rtol=1e-5, atol=1e-5 * float(jnp.abs(dw).max()))
print("ok")
"""


@pytest.mark.skipif(not {"avx2", "fma"} <= set(build._cpu_signature().split()) or build.compiler() is None,
                    reason="needs an x86-64 CPU with AVX2 and FMA, and a C++ compiler")
def test_the_avx2_build_of_the_kernels_computes_what_lax_computes(tmp_path):
    """conv2d.cc's AVX2 register blocking (8-float vectors), built with -march=x86-64-v3 (it runs on AVX-512
    CPUs too). Not used by default (build.supported: AVX-512 only), kept correct for CPUs without it."""
    env = {**os.environ, "TRANSFERLAB_KERNEL_CACHE": str(tmp_path),
           "TRANSFERLAB_KERNEL_FLAGS": "-march=x86-64-v3 -mprefer-vector-width=256",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    done = subprocess.run([sys.executable, "-c", AVX2_CHECK], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_cpus_without_avx512_get_xla_convolutions_without_a_note(monkeypatch, capsys):
    monkeypatch.setattr(build, "_cpu_signature", lambda: "flags\t\t: fpu sse2 avx avx2 fma")
    monkeypatch.setattr(build, "_LOADED", {})
    monkeypatch.setattr(jax, "device_count", lambda *a: 1)
    assert not build.supported(native_conv.KERNEL) and build.load(native_conv.KERNEL) is None
    assert native_conv.status() == "XLA (no avx512f on this CPU)"
    x, k = jnp.ones((2, 8, 8, 8), jnp.float32), jnp.ones((3, 3, 8, 16), jnp.float32)
    assert not _uses_kernels(lambda k: jnp.sum(native_conv.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=DIMS)), k)
    assert capsys.readouterr().err == ""  # an expected configuration, not a failure


def _cli(workdir, extra=(), env_extra=None):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", **(env_extra or {})}
    args = ["--config", "tests/configs/tiny.py", "--workdir", workdir, "--config.model.name=resnet8",
            "--config.total_steps=12", "--config.log_every_steps=4", "--config.eval_every_steps=12",
            "--config.checkpoint_every_steps=4", *extra]
    return subprocess.run([sys.executable, "-m", "transferlab.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.usefixtures("kernels")
def test_a_run_on_the_kernels_resumes_bitwise_and_records_them(tmp_path, data_dir):
    """One CPU device (as `make run` trains): a ResNet killed after its step-8 checkpoint and resumed ends
    with the same bits as a straight run, and each run's results.json names the kernels it ran on."""
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    done = _cli(straight)
    assert done.returncode == 0, done.stderr[-2000:]
    killed = _cli(resumed, env_extra={"TRANSFERLAB_FAULT_KILL_AT_STEP": "10"})
    assert killed.returncode == -signal.SIGKILL
    again = _cli(resumed)
    assert again.returncode == 0, again.stderr[-2000:]
    for run in (straight, resumed):
        with open(os.path.join(run, "results.json"), encoding="utf-8") as f:
            assert json.load(f)["environment"]["convolutions"] == "native"
    from test_train import final_params  # restored onto this process's 8 devices
    config = config_lib.load(os.path.join(REPO, "tests/configs/tiny.py"), ["--config.model.name=resnet8",
                                                                         "--config.total_steps=12"])
    jax.tree.map(np.testing.assert_array_equal, final_params(straight, config), final_params(resumed, config))


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("name", ["resnet20", "wrn_16_2", "vgg8", "lenet5"])
def test_models_on_the_kernels_match_models_on_xla(name, monkeypatch):
    """Whole models (their flax convolutions through layers.conv): logits and parameter gradients on one CPU
    device (the kernels where they apply) equal those on XLA's convolutions to float rounding."""
    from transferlab import models
    model = models.create(name, num_classes=10)
    x = jnp.asarray(np.random.RandomState(3).rand(4, 32, 32, 3).astype(np.float32))
    variables = model.init({"params": jax.random.PRNGKey(0)}, x, train=False)

    def logits_and_grads():
        def loss(params):
            logits = model.apply({**variables, "params": params}, x, train=False)
            return jnp.sum(jnp.sin(logits)), logits
        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
        return logits, grads

    on_xla = logits_and_grads()
    monkeypatch.setattr(jax, "device_count", lambda *a: 1)
    assert _uses_kernels(lambda p: jnp.sum(model.apply({**variables, "params": p}, x, train=False)),
                         variables["params"])
    on_kernels = logits_and_grads()
    jax.tree.map(lambda got, want: _close(got, want, rtol=1e-4), on_kernels, on_xla)

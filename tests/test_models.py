"""Model zoo: registry API, RepDistiller parameter-count parity, taps, BN modes, dtypes.

Shapes and parameter counts come from `jax.eval_shape` (no FLOPs); only a few
small models are actually run, on tiny inputs.
"""

import functools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FUSION_EMITTERS, REPO
from transferlab import errors, models
from transferlab.models import layers

GOLDEN = os.path.join(os.path.dirname(__file__), "parity", "data", "param_counts.json")
with open(GOLDEN) as f:
    PARAM_COUNTS = json.load(f)

REQUIRED = [
    "mlp", "lenet5", "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56",
    "resnet110", "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
    "wrn", "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "mobilenetv2", "mobile_half",
    "shufflenetv1", "shufflenetv2",
]
CONVNETS = [n for n in REQUIRED if n != "mlp"]


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


def _size(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@functools.lru_cache(maxsize=None)
def _abstract(name, shape=(2, 32, 32, 3), num_classes=100, dtype=jnp.float32):
    """Shapes of all variables (params, batch_stats, intermediates) for one init."""
    model = models.create(name, num_classes=num_classes, dtype=dtype)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.eval_shape(
        lambda inp: model.init({"params": jax.random.key(0)}, inp, train=False, mutable=True), x)


def _cheap_variables(model, x, seed=0):
    """Variables with init's shapes, filled by numpy (XLA-compiling an RNG init is slow)."""
    shapes = jax.eval_shape(lambda inp: model.init({"params": jax.random.key(0)}, inp), x)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        key = path[-1].key
        if key == "kernel":
            std = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0.0, std, leaf.shape), jnp.float32)
        if key in ("scale", "var"):
            return jnp.ones(leaf.shape, jnp.float32)
        return jnp.zeros(leaf.shape, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def test_names_sorted_and_complete():
    names = models.names()
    assert names == sorted(names)
    assert set(REQUIRED) <= set(names)


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_param_count_matches_repdistiller(name):
    shapes = _abstract(name)
    assert _size(shapes["params"]) == PARAM_COUNTS[name]
    assert "batch_stats" in shapes
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("name", REQUIRED)
def test_output_and_tap_shapes(name):
    inter = {k: v[0] for k, v in _abstract(name)["intermediates"].items()}
    assert inter["logits"].shape == (2, 100) and inter["logits"].dtype == jnp.float32
    assert inter["features"].ndim == 2 and inter["features"].shape[0] == 2
    assert sorted(inter) == models.tap_names(name)
    if name == "mlp":
        assert sorted(inter) == ["features", "hidden1", "hidden2", "logits"]
        return
    stages = sorted(k for k in inter if k.startswith("stage"))
    assert len(stages) >= 2
    for k, stage in enumerate(stages, start=1):
        assert stage == f"stage{k}"
        assert inter[stage].ndim == 4 and inter[stage].shape[0] == 2
        assert inter[f"preact_{stage}"].shape == inter[stage].shape
    if "stem" in inter:
        assert inter["stem"].ndim == 4
    # spatial size never grows from stage to stage
    sizes = [inter[s].shape[1] for s in stages]
    assert sizes == sorted(sizes, reverse=True)


# Depth does not change which inputs work, so one member per family is enough.
@pytest.mark.parametrize("shape", [(1, 28, 28, 1), (1, 8, 8, 1), (1, 12, 20, 3)])
@pytest.mark.parametrize("name", ["mlp", "lenet5", "resnet8", "resnet8x4", "wrn_16_2", "vgg8",
                                  "vgg13", "mobilenetv2", "shufflenetv1", "shufflenetv2"])
def test_other_input_sizes_and_channels(name, shape):
    if name == "lenet5" and min(shape[1:3]) < 12:
        with pytest.raises(errors.ConfigError, match="lenet5"):
            _abstract(name, shape, num_classes=10)
        return
    logits = _abstract(name, shape, num_classes=10)["intermediates"]["logits"][0]
    assert logits.shape == (1, 10)


def test_mlp_has_no_batch_stats_and_custom_hidden():
    model = models.create("mlp", num_classes=10, hidden_sizes=[32, 16, 8])
    variables = jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x),
                               jax.ShapeDtypeStruct((3, 8, 8, 1), jnp.float32))
    assert set(variables) == {"params"}
    assert _size(variables["params"]) == 64 * 32 + 32 + 32 * 16 + 16 + 16 * 8 + 8 + 8 * 10 + 10
    assert models.tap_names("mlp", hidden_sizes=(8,)) == ["features", "hidden1", "logits"]


def test_aliases_and_generic_wrn():
    assert _size(_abstract("mobile_half")["params"]) == PARAM_COUNTS["mobilenetv2"]
    model = models.create("wrn", depth=40, widen_factor=2)
    shapes = jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x),
                            jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    assert _size(shapes["params"]) == PARAM_COUNTS["wrn_40_2"]


# Real execution is kept to a few small models, each compiled once.
@pytest.mark.parametrize("name,size", [("resnet8", 8), ("wrn_16_1", 8), ("lenet5", 12)])
def test_batch_norm_train_vs_eval(name, size):
    model = models.create(name, num_classes=10)
    x = jax.random.normal(jax.random.key(1), (4, size, size, 3))

    variables = _cheap_variables(model, x)

    @jax.jit
    def run(variables, x):
        evaluated = model.apply(variables, x, train=False, mutable=["batch_stats"])
        trained = model.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"])
        return evaluated, trained

    (eval_logits, eval_state), (train_logits, updates) = run(variables, x)
    jax.tree.map(np.testing.assert_array_equal, eval_state["batch_stats"], variables["batch_stats"])
    assert train_logits.shape == (4, 10) and train_logits.dtype == jnp.float32
    assert set(updates["intermediates"]) == set(models.tap_names(name))
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                           updates["batch_stats"], variables["batch_stats"])
    assert all(jax.tree.leaves(changed))
    assert not np.allclose(train_logits, eval_logits)


def test_batch_norm_matches_pytorch_defaults():
    """Running stats move 10% of the way to the batch stats; eps 1e-5."""
    x = jax.random.normal(jax.random.key(2), (16, 2, 2, 3)) * 3.0 + 1.0
    bn = layers.batch_norm(train=True, dtype=jnp.float32)
    ones, zeros = jnp.ones(3), jnp.zeros(3)
    variables = {"params": {"scale": ones, "bias": zeros},
                 "batch_stats": {"mean": zeros, "var": ones}}
    y, updates = bn.apply(variables, x, mutable=["batch_stats"])
    stats = updates["batch_stats"]
    mean, var = np.mean(np.asarray(x), axis=(0, 1, 2)), np.var(np.asarray(x), axis=(0, 1, 2))
    np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * var, rtol=1e-5)
    np.testing.assert_allclose(y, (np.asarray(x) - mean) / np.sqrt(var + 1e-5), atol=1e-5)


def test_bf16_compute_float32_logits():
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    f32 = models.create("resnet8", num_classes=10)
    bf16 = models.create("resnet8", num_classes=10, dtype=jnp.bfloat16)

    shapes = jax.eval_shape(lambda inp: bf16.init({"params": jax.random.key(0)}, inp), x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
    variables = _cheap_variables(f32, x)

    @jax.jit
    def run(variables, x):
        ref = f32.apply(variables, x, train=False)
        out = bf16.apply(variables, x, train=False)
        out_train, updates = bf16.apply(variables, x, train=True,
                                        mutable=["batch_stats", "intermediates"])
        return ref, out, out_train, updates

    ref, out, out_train, updates = run(variables, x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(updates["batch_stats"]))
    assert out.dtype == jnp.float32 and out_train.dtype == jnp.float32
    assert updates["intermediates"]["stage1"][0].dtype == jnp.bfloat16
    np.testing.assert_allclose(out, ref, atol=0.05 * float(np.max(np.abs(ref))) + 1e-3)


@pytest.mark.parametrize("name,grads", [("resnet8", True), ("wrn_16_1", False)])
def test_fusion_barrier_is_numerically_neutral(name, grads):
    """Bitwise, under the XLA CPU codegen the library runs with (its fusion emitters): the suite compiles with the
    legacy emitters (conftest), under which the barrier's different fusions do change the rounding, so there this
    test reruns itself in a subprocess with the fusion emitters."""
    if jax.default_backend() == "cpu" and not FUSION_EMITTERS:
        test_id = f"{os.path.abspath(__file__)}::test_fusion_barrier_is_numerically_neutral[{name}-{grads}]"
        env = {**os.environ, "TRANSFERLAB_TEST_FUSION_EMITTERS": "1", "XLA_FLAGS": ""}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-n", "0", "-p", "no:cacheprovider", test_id],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        passed = proc.returncode == 0 and re.search(r"^1 passed", proc.stdout, re.M)
        assert passed, proc.stdout[-3000:] + proc.stderr[-2000:]
        return
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    y = jnp.array([1, 3])
    with_barrier = models.create(name, num_classes=10, fusion_barrier=True)
    without = models.create(name, num_classes=10, fusion_barrier=False)

    def loss_and_grads(model, variables):
        def loss(p):
            logits, upd = model.apply({"params": p, "batch_stats": variables["batch_stats"]},
                                      x, train=True, mutable=["batch_stats"])
            logp = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1)), upd
        if not grads:  # forward only: compiling the backward is the slow part
            return loss(variables["params"])
        return jax.value_and_grad(loss, has_aux=True)(variables["params"])

    variables = _cheap_variables(without, x)
    a = jax.jit(functools.partial(loss_and_grads, with_barrier))(variables)
    b = jax.jit(functools.partial(loss_and_grads, without))(variables)
    jax.tree.map(lambda u, v: np.testing.assert_array_equal(u, v), a, b)


@pytest.mark.parametrize("kwargs,culprit", [
    (dict(name="resnet8", foo=1), "foo"),
    (dict(name="vgg8", fusion_barrier=False), "fusion_barrier"),
    (dict(name="resnet8", fusion_barrier="yes"), "fusion_barrier"),
    (dict(name="wrn", depth=17), "depth"),
    (dict(name="wrn", widen_factor=0), "widen_factor"),
    (dict(name="mlp", hidden_sizes=[0]), "hidden_sizes"),
    (dict(name="mobilenetv2", width_mult=-1.0), "width_mult"),
    (dict(name="shufflenetv2", net_size=3), "net_size"),
    (dict(name="resnet8", num_classes=0), "num_classes"),
    (dict(name="resnet8", dtype="int32"), "dtype"),
])
def test_bad_kwargs_raise_config_error(kwargs, culprit):
    with pytest.raises(errors.ConfigError, match=culprit) as info:
        models.create(**kwargs)
    assert "\n" not in str(info.value)


def test_unknown_name_raises_config_error():
    with pytest.raises(errors.ConfigError, match="unknown model 'resnet9'") as info:
        models.create("resnet9")
    assert "resnet8" in str(info.value)
    with pytest.raises(errors.ConfigError):
        models.tap_names("nope")

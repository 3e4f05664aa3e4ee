"""Fast unit tests of transferlab.losses: registry contract, values, masks, jit, connectors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transferlab import losses
from transferlab.errors import ConfigError
from transferlab.losses import connectors, logit, relation

B = 8


def _normal(key, shape, scale=1.0):
    """Test inputs from numpy (eager jax.random compiles per shape: slow on CPU)."""
    return jnp.asarray(scale * np.random.default_rng(key).standard_normal(shape), jnp.float32)


def example(name, key=0):
    """(student, teacher, batch) small inputs suited to loss `name`."""
    rng = np.random.default_rng(key + 100)
    labels = jnp.asarray(rng.integers(0, 4, B), jnp.int32)
    batch = {"label": labels}
    if name in ("kd", "dkd", "dist", "kd_std", "cwtm", "dkpp", "trilateral"):
        s, t = _normal(key, (B, 10), 2.0), _normal(key + 1, (B, 10), 2.0)
        if name == "trilateral":
            batch["fusion_ratio"] = jnp.asarray(rng.uniform(0, 1, B), jnp.float32)
        return s, t, batch
    if name == "class_relation":
        return _normal(key, (B, 15)), _normal(key + 1, (B, 10)), batch
    if name == "fitnet":
        return _normal(key, (B, 4, 4, 8)), _normal(key + 1, (B, 4, 4, 8)), batch
    if name == "at":
        return ([_normal(key, (B, 8, 8, 4)), _normal(key + 1, (B, 4, 4, 8))],
                [_normal(key + 2, (B, 8, 8, 8)), _normal(key + 3, (B, 4, 4, 16))], batch)
    if name == "reviewkd":
        return ([_normal(key, (B, 8, 8, 4)), _normal(key + 1, (B, 6))],
                [_normal(key + 2, (B, 8, 8, 4)), _normal(key + 3, (B, 6))], batch)
    if name in ("nd", "crd"):
        s, t = _normal(key, (B, 16)), _normal(key + 1, (B, 16))
        if name == "crd":
            n, k = 32, 6
            stdv = 1.0 / np.sqrt(16 / 3)
            batch["crd_memory_student"] = jnp.asarray(rng.uniform(-stdv, stdv, (n, 16)), jnp.float32)
            batch["crd_memory_teacher"] = jnp.asarray(rng.uniform(-stdv, stdv, (n, 16)), jnp.float32)
            idx = np.concatenate([np.arange(B)[:, None], rng.integers(0, n, (B, k))], 1)
            batch["crd_contrast_idx"] = jnp.asarray(idx, jnp.int32)
        return s, t, batch
    if name == "sp":
        return _normal(key, (B, 4, 4, 8)), _normal(key + 1, (B, 4, 4, 16)), batch
    if name in ("rkd", "pkt"):
        return _normal(key, (B, 12)), _normal(key + 1, (B, 20)), batch
    if name == "trg":
        return _normal(key, (B, 4, 4, 8)), _normal(key + 1, (B, 4, 4, 8)), batch
    raise AssertionError(f"no example for {name}")


ALL = losses.names()


_JITTED = {}


def call(name, s, t, batch, **hp):
    """Loss `name` under a cached jit (eager dispatch compiles every primitive separately: slow)."""
    if name not in _JITTED:
        spec = losses.get(name)
        static = tuple(k for k, v in spec.defaults.items() if v is not None)
        _JITTED[name] = jax.jit(spec.fn, static_argnames=static)
    return _JITTED[name](s, t, batch, **hp)


def test_registry_names_and_specs():
    assert set(ALL) == {"kd", "dkd", "dist", "kd_std", "cwtm", "dkpp", "class_relation", "trilateral", "fitnet",
                        "at", "nd", "reviewkd", "sp", "rkd", "pkt", "trg", "crd"}
    for name in ALL:
        spec = losses.get(name)
        assert spec.name == name and callable(spec.fn)
        assert len(spec.default_taps) == 2
        if spec.multi_tap:
            assert all(isinstance(t, tuple) and t for t in spec.default_taps)
        else:
            assert all(isinstance(t, str) for t in spec.default_taps)
        assert spec.connector is None or spec.connector in connectors.names()
        assert spec.fn.__doc__ and "arXiv" in spec.fn.__doc__
    assert losses.get("fitnet").connector == "conv1x1_bn"
    assert losses.get("reviewkd").connector == "abf" and losses.get("reviewkd").multi_tap


@pytest.mark.parametrize("name", ALL)
def test_finite_differentiable_and_jittable(name):
    s, t, batch = example(name)
    fn = losses.get(name).fn
    hp = losses.resolve_hparams(name, {})
    value, grad = jax.jit(jax.value_and_grad(lambda x, y, b: fn(x, y, b, **hp)))(s, t, batch)
    assert value.shape == () and value.dtype == jnp.float32 and np.isfinite(value)
    leaves = jax.tree.leaves(grad)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)


ZERO_AT_EQUALITY = {"kd": {}, "dkd": {}, "dist": {}, "kd_std": {}, "fitnet": {}, "at": {}, "sp": {}, "rkd": {},
                    "pkt": {}, "reviewkd": {}, "trg": {"w_context": 0.0}}


@pytest.mark.parametrize("name", sorted(ZERO_AT_EQUALITY))
def test_zero_when_student_equals_teacher(name):
    _, t, batch = example(name)
    if name == "at":  # same channels so student == teacher is possible
        t = [x[..., :4] for x in t]
    if name == "sp":
        t = t[..., :8]
    if name in ("rkd", "pkt"):
        t = t[:, :12]
    value = call(name, t, t, batch, **losses.resolve_hparams(name, ZERO_AT_EQUALITY[name]))
    assert abs(float(value)) < 1e-6


def test_class_relation_zero_when_known_head_matches():
    s, t, batch = example("class_relation")
    s = s.at[:, :10].set(t)
    assert abs(float(call("class_relation", s, t, batch))) < 1e-6


def test_kd_hand_computed():
    # T = 2: p_t = softmax([ln 3, 0] / 2) = [sqrt3, 1] / (sqrt3 + 1), p_s = [1/2, 1/2].
    r3 = math.sqrt(3.0)
    pt = [r3 / (r3 + 1), 1 / (r3 + 1)]
    kl = sum(p * math.log(p / 0.5) for p in pt)
    s = jnp.array([[0.0, 0.0], [1.0, 1.0]])
    t = jnp.array([[math.log(3.0), 0.0], [1.0 + math.log(3.0), 1.0]])
    value = losses.get("kd").fn(s, t, {}, temperature=2.0)
    np.testing.assert_allclose(value, 4.0 * kl, rtol=1e-6)  # T^2 * batchmean KL
    np.testing.assert_allclose(4.0 * kl, 0.1453630, rtol=1e-5)


def test_dkd_decomposes_kd():
    """Paper Eq. 5, per sample: KL = TCKD + (1 - p^t_gt) * NCKD, so dkd(1, 1 - p^t_gt) == kd."""
    s, t, _ = example("dkd")
    for i in range(3):
        si, ti, yi = s[i:i + 1], t[i:i + 1], jnp.array([i % 10])
        p_gt = float(jax.nn.softmax(ti / 4.0)[0, yi[0]])
        kd_v = call("kd", si, ti, {"label": yi}, temperature=4.0)
        dkd_v = call("dkd", si, ti, {"label": yi}, alpha=1.0, beta=1.0 - p_gt, temperature=4.0)
        np.testing.assert_allclose(dkd_v, kd_v, rtol=1e-4)


MASKABLE = [n for n in ALL if n != "dkpp"]


_GRADS = {}


def value_and_student_grad(name, s, t, batch):
    """Loss `name` (default hparams) and its gradient w.r.t. the student taps, jitted once per loss."""
    if name not in _GRADS:
        fn, hp = losses.get(name).fn, losses.resolve_hparams(name, {})
        _GRADS[name] = jax.jit(jax.value_and_grad(lambda x, y, b: fn(x, y, b, **hp)))
    return _GRADS[name](s, t, batch)


def _rows(x, keep):
    return [a[keep] for a in x] if isinstance(x, list) else x[keep]


def _sub_batch(batch, keep):
    return {k: (v if k.startswith("crd_memory") else v[keep]) for k, v in batch.items()}


def _zero_rows(x, keep):
    """The rows not kept set to 0, as the padding of a short last batch."""
    def one(a):
        return jnp.where(jnp.asarray(keep).reshape((-1,) + (1,) * (a.ndim - 1)), a, 0.0)
    return [one(a) for a in x] if isinstance(x, list) else one(x)


@pytest.mark.parametrize("name", MASKABLE)
def test_mask_equals_subset(name):
    """Masked rows, random or zero-padded, leave the value and the kept rows' gradient as on the subset.

    The masked rows get an exactly zero gradient and nothing is NaN: a zero row is where a
    square root's or a clamped divisor's derivative overflows (DIST's Pearson norms, PKT's
    row sums once did, NaN-ing the whole gradient of a padded batch).
    """
    s, t, batch = example(name)
    keep = np.array([1, 1, 0, 1, 0, 1, 1, 1], bool)
    v_sub, g_sub = value_and_student_grad(name, _rows(s, keep), _rows(t, keep), _sub_batch(batch, keep))
    for padded in (False, True):
        s_in, t_in = (_zero_rows(s, keep), _zero_rows(t, keep)) if padded else (s, t)
        value, grad = value_and_student_grad(name, s_in, t_in, {**batch, "mask": jnp.asarray(keep)})
        np.testing.assert_allclose(value, v_sub, rtol=2e-5, atol=1e-6, err_msg=f"padded={padded}")
        for g, g_ref in zip(jax.tree.leaves(grad), jax.tree.leaves(g_sub)):
            g = np.asarray(g)
            assert np.all(np.isfinite(g)), f"padded={padded}: non-finite gradient"
            np.testing.assert_allclose(g[keep], g_ref, rtol=1e-4, atol=1e-6, err_msg=f"padded={padded}")
            assert np.all(g[~keep] == 0), f"padded={padded}: masked rows get a gradient"


@pytest.mark.parametrize("name", MASKABLE)
def test_a_single_valid_row_is_finite(name):
    """One valid sample (batch size 1, or all but one row masked) gives a finite value and gradient."""
    s, t, batch = example(name)
    one = np.arange(B) == 3
    v_masked, g_masked = value_and_student_grad(name, s, t, {**batch, "mask": jnp.asarray(one)})
    v_one, g_one = value_and_student_grad(name, _rows(s, one), _rows(t, one), _sub_batch(batch, one))
    assert np.isfinite(v_one) and np.isfinite(v_masked)
    np.testing.assert_allclose(v_masked, v_one, rtol=2e-5, atol=1e-6)
    for g, g_ref in zip(jax.tree.leaves(g_masked), jax.tree.leaves(g_one)):
        assert np.all(np.isfinite(g)) and np.all(np.isfinite(g_ref))
        np.testing.assert_allclose(np.asarray(g)[one], g_ref, rtol=1e-4, atol=1e-6)


def test_dist_constant_softmax_row_has_a_finite_gradient():
    """A student row with equal logits (zero-centred softmax) is where |a| = 0 in DIST's Pearson.

    4 classes: softmax = 0.25 exactly, so the centred row is exactly 0 (with 10 classes float
    rounding of 0.1 hides it); also a batch padded with zero logits."""
    s, t, batch = example("dist")
    s, t = s[:, :4].at[2].set(0.0), t[:, :4]
    value, grad = value_and_student_grad("dist", s, t, batch)
    assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_dkd_large_logit_gaps_stay_finite():
    """TCKD in log space: a logit gap of 95 at T = 1 (where softmax probabilities underflow in float32)
    still matches a float64 evaluation of the paper's formula."""
    s = np.array([[0.0, 95.0, 0.0], [3.0, -40.0, 120.0]])
    t = np.array([[2.0, 0.0, 1.0], [0.5, 0.1, -0.3]])
    y = np.array([0, 2])

    def reference(s, t):  # float64, the paper's b = [p_g, 1 - p_g] and NCKD, alpha 1, beta 8, T 1
        def log_softmax(z):
            z = z - z.max(-1, keepdims=True)
            return z - np.log(np.exp(z).sum(-1, keepdims=True))
        total = 0.0
        for i in range(len(y)):
            ls, lt = log_softmax(s[i]), log_softmax(t[i])
            others = np.arange(3) != y[i]
            lb_s = np.array([ls[y[i]], np.log(np.exp(ls[others]).sum())])
            lb_t = np.array([lt[y[i]], np.log(np.exp(lt[others]).sum())])
            tckd = np.sum(np.exp(lb_t) * (lb_t - lb_s))
            ns, nt = log_softmax(s[i][others]), log_softmax(t[i][others])
            total += tckd + 8.0 * np.sum(np.exp(nt) * (nt - ns))
        return total / len(y)

    batch = {"label": jnp.asarray(y, jnp.int32)}
    # the default T = 4 on logits x4 is T = 1 on these, times T^2 = 16
    value, grad = value_and_student_grad("dkd", jnp.asarray(4 * s, jnp.float32), jnp.asarray(4 * t, jnp.float32),
                                         batch)
    np.testing.assert_allclose(value, 16.0 * reference(s, t), rtol=1e-5)
    assert np.all(np.isfinite(grad))


def test_hparam_errors():
    assert losses.resolve_hparams("kd", {}) == {"temperature": 4.0}
    assert losses.resolve_hparams("kd", {"temperature": 2}) == {"temperature": 2.0}
    with pytest.raises(ConfigError) as e:
        losses.resolve_hparams("kd", {"temp": 2.0})
    msg = str(e.value)
    assert "'temp'" in msg and "temperature" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="expected a finite number"):
        losses.resolve_hparams("dkd", {"beta": "eight"})
    with pytest.raises(ConfigError, match="l2, l1"):
        losses.resolve_hparams("sp", {"row_norm": "l3"})
    for loss, key in (("dkd", "alpha"), ("dkd", "beta"), ("dist", "gamma"), ("rkd", "w_angle"), ("trg", "w_graph")):
        with pytest.raises(ConfigError, match=f"hparam '{key}': got -1.0; expected a number >= 0"):
            losses.resolve_hparams(loss, {key: -1.0})
        assert losses.resolve_hparams(loss, {key: 0.0})[key] == 0.0
    @losses.register("test_alpha_divergence", taps=("logits", "logits"))
    def alpha_divergence(student, teacher, batch, *, alpha=0.5):  # a loss of one's own: alpha may be negative
        return jnp.mean(student - teacher) * alpha
    assert losses.resolve_hparams("test_alpha_divergence", {"alpha": -1.0})["alpha"] == -1.0
    with pytest.raises(ConfigError, match="add, clamp"):
        losses.resolve_hparams("dist", {"eps_mode": "max"})
    with pytest.raises(ConfigError, match="expected an int"):
        losses.resolve_hparams("dkpp", {"seed": 1.5})
    with pytest.raises(ConfigError, match="allowed: \\(none\\)"):
        losses.resolve_hparams("cwtm", {"temperature": 1.0})


def test_unknown_names():
    with pytest.raises(ConfigError) as e:
        losses.get("kdd")
    assert "'kdd'" in str(e.value) and "dkd" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="unknown connector 'conv5x5'.*conv1x1_bn"):
        connectors.create_connector("conv5x5", (2, 4, 4, 8))


def test_missing_batch_keys_are_config_errors():
    s, t, batch = example("dkd")
    with pytest.raises(ConfigError, match="label"):
        losses.get("dkd").fn(s, t, {})
    with pytest.raises(ConfigError, match="fusion_ratio"):
        losses.get("trilateral").fn(s, t, batch)
    s, t, batch = example("crd")
    with pytest.raises(ConfigError, match="crd_contrast_idx"):
        losses.get("crd").fn(s, t, {k: v for k, v in batch.items() if k != "crd_contrast_idx"})


def test_dkpp_permutation():
    probs = jax.nn.softmax(_normal(3, (B, 10), 2.0))
    key = jax.random.PRNGKey(7)
    permute = jax.jit(logit.permute_non_argmax)
    q = permute(probs, key)
    np.testing.assert_array_equal(jnp.argmax(q, -1), jnp.argmax(probs, -1))
    np.testing.assert_allclose(jnp.max(q, -1), jnp.max(probs, -1))
    np.testing.assert_allclose(jnp.sort(q, -1), jnp.sort(probs, -1))
    assert not np.allclose(q, probs)
    np.testing.assert_array_equal(q, permute(probs, key))
    s, t, batch = example("dkpp")
    def fn(s, t, batch, **hp):
        return call("dkpp", s, t, batch, **hp)

    assert float(fn(s, t, batch, seed=0)) == float(fn(s, t, batch, seed=0))
    assert float(fn(s, t, batch, seed=0)) != float(fn(s, t, batch, seed=1))
    with_rng = fn(s, t, {**batch, "rng": jax.random.PRNGKey(1)}, seed=0)
    np.testing.assert_allclose(with_rng, fn(s, t, batch, seed=1))
    # == KD against the explicitly permuted teacher distribution (T = 1)
    q = np.asarray(permute(jax.nn.softmax(t), jax.random.PRNGKey(0)), np.float64)
    log_p_s = np.asarray(jax.nn.log_softmax(s), np.float64)
    manual = np.mean(np.sum(q * (np.log(q) - log_p_s), -1))
    np.testing.assert_allclose(fn(s, t, batch), manual, rtol=1e-5)


def test_cwtm_uniform_teacher_is_mean_ce():
    s, _, batch = example("cwtm")
    t = jnp.zeros_like(s)
    ce = jnp.mean(logit.cross_entropy_rows(s, batch["label"]))
    np.testing.assert_allclose(call("cwtm", s, t, batch), ce, rtol=1e-6)


def test_nd_with_class_means_and_in_batch_agree_when_means_match():
    s, t, batch = example("nd")
    y = batch["label"]
    means = jnp.stack([jnp.mean(t[y == k], 0) if bool(jnp.any(y == k)) else jnp.ones(16) for k in range(4)])
    np.testing.assert_allclose(call("nd", s, t, batch, class_means=means), call("nd", s, t, batch), rtol=1e-5)


def test_at_beta_scales():
    s, t, batch = example("at")
    np.testing.assert_allclose(call("at", s, t, batch, beta=1000.0), 1000.0 * call("at", s, t, batch, beta=1.0),
                               rtol=1e-6)


def test_trilateral_features_and_ratio_mlp():
    s, t, batch = example("kd")
    feats = jax.jit(logit.trilateral_features)(s, t, batch["label"])
    assert feats.shape == (B, 7 * 10 + 7) and np.all(np.isfinite(feats))
    mlp = connectors.FusionRatioMLP(hidden=16)
    params = jax.jit(mlp.init)(jax.random.PRNGKey(0), feats)
    ratio = jax.jit(mlp.apply)(params, feats)
    assert ratio.shape == (B,) and np.all((ratio > 0) & (ratio < 1))
    fn = losses.get("trilateral").fn

    def outer(p):  # the ratio network is differentiable through the loss (bilevel outer step)
        return fn(s, t, {**batch, "fusion_ratio": mlp.apply(p, feats)})

    grads = jax.jit(jax.grad(outer))(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    ones = call("trilateral", s, t, {**batch, "fusion_ratio": jnp.ones(B)})
    np.testing.assert_allclose(ones, call("kd", s, t, batch), rtol=1e-5)


def test_crd_helpers():
    idx = jax.jit(relation.crd_sample_indices, static_argnums=(2, 3))(jax.random.PRNGKey(0), jnp.arange(4) + 10, 50, 7)
    assert idx.shape == (4, 8)
    np.testing.assert_array_equal(idx[:, 0], jnp.arange(4) + 10)
    assert int(idx.min()) >= 0 and int(idx.max()) < 50
    mem = jax.jit(relation.crd_init_memory, static_argnums=(1, 2))(jax.random.PRNGKey(1), 50, 16)
    assert float(jnp.max(jnp.abs(mem))) <= 1.0 / np.sqrt(16 / 3)
    new = jax.jit(losses.crd_update_memory)(mem, _normal(2, (4, 16)), jnp.arange(4), 0.5)
    np.testing.assert_allclose(jnp.linalg.norm(new[:4], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(new[4:], mem[4:])


def _apply(module, x, train):
    """Output of a freshly initialised connector (shapes only: init and apply traced, not run)."""
    def run(inp):
        variables = module.init(jax.random.PRNGKey(0), inp, train=False)
        if train and "batch_stats" in variables:
            return module.apply(variables, inp, train=True, mutable=["batch_stats"])[0]
        return module.apply(variables, inp, train=train)
    return jax.eval_shape(run, x)


@pytest.mark.parametrize("name,s_shape,t_shape", [
    ("linear", (2, 16), (2, 32)),
    ("linear", (2, 9, 16), (2, 9, 24)),
    ("conv1x1_bn", (2, 8, 8, 16), (2, 8, 8, 32)),
    ("conv1x1_bn", (2, 16, 16, 16), (2, 8, 8, 32)),
    ("conv1x1_bn", (2, 4, 4, 16), (2, 8, 8, 32)),
    ("conv3x3", (2, 8, 8, 16), (2, 8, 8, 8)),
])
@pytest.mark.parametrize("train", [False, True])
def test_connectors_produce_teacher_shapes(name, s_shape, t_shape, train):
    module = connectors.create_connector(name, t_shape)
    out = _apply(module, jnp.ones(s_shape), train)
    assert out.shape == t_shape


def test_connector_width_from_int_and_bad_spatial():
    assert _apply(connectors.create_connector("linear", 7), jnp.ones((2, 3)), False).shape == (2, 7)
    module = connectors.create_connector("conv1x1_bn", (2, 5, 5, 8))
    with pytest.raises(ConfigError, match="integer ratio"):
        module.init(jax.random.PRNGKey(0), jnp.ones((2, 8, 8, 4)), train=False)


@pytest.mark.parametrize("train", [False, True])
def test_abf_connector_maps_list_to_teacher_shapes(train):
    s = [jnp.ones((2, 16, 16, 8)), jnp.ones((2, 8, 8, 16)), jnp.ones((2, 4, 4, 32)), jnp.ones((2, 32))]
    t_shapes = [(2, 16, 16, 16), (2, 8, 8, 32), (2, 4, 4, 64), (2, 64)]
    module = connectors.create_connector("abf", t_shapes)
    outs = _apply(module, s, train)
    assert [o.shape for o in outs] == t_shapes
    with pytest.raises(ConfigError, match="list of teacher shapes"):
        connectors.create_connector("abf", (2, 8, 8, 32))


def test_adaptive_pool_matches_torch_bins():
    from transferlab.losses.feature import adaptive_pool_matrix
    m = adaptive_pool_matrix(5, 2)  # torch bins for 5 -> 2: [0, 3) and [2, 5)
    np.testing.assert_allclose(m, [[1 / 3, 1 / 3, 1 / 3, 0, 0], [0, 0, 1 / 3, 1 / 3, 1 / 3]])


def test_bfloat16_inputs_give_float32():
    s, t, batch = example("kd")
    value = call("kd", s.astype(jnp.bfloat16), t.astype(jnp.bfloat16), batch)
    assert value.dtype == jnp.float32


def test_shape_mismatches_are_config_errors():
    s, t, batch = example("fitnet")
    with pytest.raises(ConfigError, match="'fitnet'.*connector"):
        losses.get("fitnet").fn(s, t[..., :4], batch)
    s, t, batch = example("at")
    with pytest.raises(ConfigError, match="2 student taps but 1 teacher"):
        losses.get("at").fn(s, t[:1], batch)
    with pytest.raises(ConfigError, match="lists of taps"):
        losses.get("reviewkd").fn(s[0], t[0], batch)


def test_trg_compares_different_grids_on_the_coarser_one():
    s, _, batch = example("trg")                      # student [B, 4, 4, 8]
    t_fine = _normal(9, (s.shape[0], 8, 8, 8))        # teacher on an 8x8 grid
    t_pooled = t_fine.reshape(s.shape[0], 4, 2, 4, 2, 8).mean(axis=(2, 4))
    fn = losses.get("trg").fn
    np.testing.assert_allclose(fn(s, t_fine, batch), fn(s, t_pooled, batch), rtol=1e-6)
    np.testing.assert_allclose(fn(t_fine, s, batch), fn(t_pooled, s, batch), rtol=1e-6)
    with pytest.raises(ConfigError, match="'trg'.*not integer multiples"):
        fn(s, _normal(9, (s.shape[0], 6, 6, 8)), batch)
    with pytest.raises(ConfigError, match="'trg'.*equal counts"):
        fn(s.reshape(s.shape[0], 16, 8), t_fine.reshape(s.shape[0], 64, 8), batch)


def test_crd_dense_and_gathered_scores_agree(monkeypatch):
    """crd_scores' two strategies (matmul over the whole bank vs gathering K+1 rows) are the same math."""
    from transferlab.losses import relation
    s, t, batch = example("crd")
    grad = jax.grad(lambda s_: losses.get("crd").fn(s_, t, batch))
    dense_value, dense_grad = losses.get("crd").fn(s, t, batch), grad(s)
    monkeypatch.setattr(relation, "CRD_DENSE_SCORE_FACTOR", 0)  # force the gather
    np.testing.assert_allclose(losses.get("crd").fn(s, t, batch), dense_value, rtol=1e-5)
    np.testing.assert_allclose(grad(s), dense_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ALL)
def test_matmuls_are_float32_on_every_backend(name):
    """Every matrix product of a loss and its gradient asks for float32 precision.

    XLA's default for float32 products is TF32 on recent GPUs and one bfloat16 pass on
    TPUs; the registry wraps each loss in `float32_matmuls` (CPU ignores the setting, so
    the check reads the lowered program).
    """
    s, t, batch = example(name)
    fn = losses.get(name).fn
    hp = losses.resolve_hparams(name, {})
    text = jax.jit(jax.value_and_grad(lambda x, y, b: fn(x, y, b, **hp))).lower(s, t, batch).as_text()
    dots = [line for line in text.splitlines() if "dot_general" in line or "stablehlo.dot " in line]
    assert all("HIGHEST" in line for line in dots), [line for line in dots if "HIGHEST" not in line][:2]


def test_helper_matmuls_are_float32():
    """The public helpers the KD task calls outside a registered loss also ask for float32 products."""
    rng = np.random.default_rng(0)
    labels = jnp.asarray(rng.integers(0, 3, B), jnp.int32)
    embed, memory = _normal(0, (B, 16)), _normal(1, (64, 16))
    idx = jnp.asarray(rng.integers(0, 64, (B, 5)), jnp.int32)
    for fn, args in [(relation.crd_scores, (embed, memory, idx, 0.07)),
                     (relation.crd_scores, (embed, _normal(2, (1000, 16)), idx, 0.07)),  # the gathered path
                     (logit.class_mean_rows, (embed, labels, jnp.ones((B,), jnp.float32))),
                     (losses.feature.adaptive_avg_pool, (_normal(3, (B, 5, 5, 4)), (2, 2)))]:
        text = jax.jit(fn, static_argnums=(3,) if fn is relation.crd_scores else
                       ((1,) if fn is losses.feature.adaptive_avg_pool else ())).lower(*args).as_text()
        dots = [line for line in text.splitlines() if "dot_general" in line]
        assert dots and all("HIGHEST" in line for line in dots), (fn.__name__, dots[:1])


def test_dist_eps_modes_differ_on_a_flat_softmax_only():
    """The authors' `+ eps` and torchdistill's clamped norms (`eps_mode='clamp'`; its parity golden is
    tests/parity/data/dist.npz) agree on peaked softmaxes and differ on flat ones: 1,000 classes, tau 4,
    a batch of 3 (the norms of the centred columns are then ~1e-5, not large next to eps = 1e-8)."""
    fn = losses.get("dist").fn
    rng = np.random.default_rng(0)

    def both(b, c, scale, tau):
        s, t = (jnp.asarray(rng.standard_normal((b, c)) * scale, jnp.float32) for _ in range(2))
        return [jax.value_and_grad(lambda x: fn(x, t, {}, tau=tau, eps_mode=m))(s) for m in ("add", "clamp")]

    (v_add, g_add), (v_clamp, g_clamp) = both(8, 10, 3.0, 1.0)
    np.testing.assert_allclose(v_add, v_clamp, rtol=1e-6)
    np.testing.assert_allclose(g_add, g_clamp, rtol=1e-4, atol=1e-6 * float(jnp.max(jnp.abs(g_clamp))))
    (v_add, g_add), (v_clamp, g_clamp) = both(3, 1000, 1.0, 4.0)
    assert abs(float(v_add - v_clamp)) > 1e-4 * abs(float(v_clamp))
    assert float(jnp.max(jnp.abs(g_add - g_clamp))) > 0.1 * float(jnp.max(jnp.abs(g_clamp)))

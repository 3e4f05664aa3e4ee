"""Optimizers, schedules, weight-decay masks, clipping and freezing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from transferlab import config as config_lib
from transferlab.errors import ConfigError
from transferlab.optim import decay_mask, frozen_labels, make_optimizer, make_schedule

PARAMS = {"conv": {"kernel": jnp.ones((3, 3, 1, 4))}, "bn": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
          "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}


def cfg(**kw):
    base = {"dataset": {"name": "digits"}, "total_steps": 100}
    base.update(kw)
    return config_lib.from_dict(base)


def test_warmup_cosine_and_step_and_linear():
    s = make_schedule(cfg(optimizer={"learning_rate": 1.0}, schedule={"name": "cosine", "warmup_steps": 10}))
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5) and float(s(10)) == pytest.approx(1.0)
    assert float(s(100)) == pytest.approx(0.0, abs=1e-6) and float(s(55)) == pytest.approx(0.5, abs=1e-6)
    s = make_schedule(cfg(optimizer={"learning_rate": 0.05},
                          schedule={"name": "step", "boundaries": (50, 0.8), "decay_factor": 0.1}))
    assert [float(s(t)) for t in (49, 50, 79, 80)] == pytest.approx([0.05, 0.005, 0.005, 0.0005])
    # boundaries that land on one step (25 and 0.25 of 100; two inside a warm-up) each apply
    s = make_schedule(cfg(optimizer={"learning_rate": 1.0}, schedule={
        "name": "step", "boundaries": (25, 0.25, 2, 3, 60), "decay_factor": 0.5, "warmup_steps": 5}))
    assert [float(s(t)) for t in (4, 5, 24, 25, 59, 60)] == pytest.approx([0.8, 0.25, 0.25, 0.0625, 0.0625, 0.03125])
    s = make_schedule(cfg(optimizer={"learning_rate": 2.0}, schedule={"name": "linear", "end_factor": 0.5}))
    assert float(s(50)) == pytest.approx(1.5)


def test_no_weight_decay_on_norms_and_biases():
    mask = decay_mask(PARAMS)
    assert mask["conv"]["kernel"] and mask["head"]["kernel"]
    assert not mask["bn"]["scale"] and not mask["bn"]["bias"] and not mask["head"]["bias"]
    tx, _ = make_optimizer(cfg(optimizer={"name": "sgd", "momentum": 0.0, "weight_decay": 0.1,
                                          "learning_rate": 1.0}, schedule={"name": "constant"}), PARAMS)
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    updates, _ = tx.update(zeros, tx.init(PARAMS), PARAMS)
    assert float(updates["conv"]["kernel"][0, 0, 0, 0]) == pytest.approx(-0.1)  # -lr * wd * w
    assert float(jnp.abs(updates["bn"]["scale"]).max()) == 0.0


def test_sgd_matches_pytorch_semantics():
    """PyTorch SGD: g += wd * w; buf = m * buf + g; w -= lr * buf (Nesterov: w -= lr * (g + m * buf))."""
    w = {"k": jnp.asarray([[1.0, -2.0]])}
    tx, _ = make_optimizer(cfg(optimizer={"momentum": 0.9, "weight_decay": 0.01, "learning_rate": 0.1},
                               schedule={"name": "constant"}), w)
    state, params = tx.init(w), w
    buf, ref = np.zeros((1, 2)), np.asarray([[1.0, -2.0]])
    for g in ([[0.5, 0.5]], [[-1.0, 2.0]]):
        updates, state = tx.update({"k": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
        grad = np.asarray(g) + 0.01 * ref
        buf = 0.9 * buf + grad
        ref = ref - 0.1 * buf
    np.testing.assert_allclose(params["k"], ref, rtol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "sgd"])
def test_optimizers_clip_and_freeze(name):
    tx, _ = make_optimizer(cfg(optimizer={"name": name, "clip_grad_norm": 1.0, "freeze": "^conv/",
                                          "learning_rate": 0.1}), PARAMS)
    grads = jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), PARAMS)
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    assert float(jnp.abs(updates["conv"]["kernel"]).max()) == 0.0  # frozen
    assert float(jnp.abs(updates["head"]["kernel"]).max()) > 0.0
    labels = frozen_labels(PARAMS, "^conv/")
    assert labels["conv"]["kernel"] == "frozen" and labels["head"]["bias"] == "trained"
    with pytest.raises(ConfigError, match="'optimizer.freeze': '\\^convv/' matches no parameter"):
        make_optimizer(cfg(optimizer={"name": name, "freeze": "^convv/"}), PARAMS)  # a typo
    with pytest.raises(ConfigError, match="'optimizer.freeze': '.\\*' matches every parameter"):
        make_optimizer(cfg(optimizer={"name": name, "freeze": ".*"}), PARAMS)  # nothing would train


def test_clipping_bounds_the_update():
    tx, _ = make_optimizer(cfg(optimizer={"name": "sgd", "momentum": 0.0, "weight_decay": 0.0, "learning_rate": 1.0,
                                          "clip_grad_norm": 1.0}, schedule={"name": "constant"}), PARAMS)
    grads = jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), PARAMS)
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-5)

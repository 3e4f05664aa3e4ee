"""KD schemes beyond one teacher: mutual learning, self-distillation, born-again generations, caching."""

import jax
import numpy as np
import pytest

from transferlab import config as config_lib
from transferlab.train import train_and_evaluate


def base(**kw):
    c = {"dataset": {"name": "digits"}, "total_steps": 20, "batch_size": 32, "eval_batch_size": 64,
         "log_every_steps": 10, "eval_every_steps": 0, "checkpoint_every_steps": 0,
         "schedule": {"name": "constant"}, "optimizer": {"learning_rate": 0.05},
         "model": {"name": "mlp", "kwargs": {"hidden_sizes": (32,)}}}
    c.update(kw)
    return c


def test_mutual_learning_trains_every_student(tmp_path, data_dir):
    cfg = config_lib.from_dict(base(task="dml", dml={"num_students": 3,
                                                     "peers": ({"name": "mlp", "kwargs": {"hidden_sizes": (16,)}},)}))
    results = train_and_evaluate(cfg, str(tmp_path / "dml"))
    for key in ("accuracy", "peer1_accuracy", "peer2_accuracy", "ensemble_accuracy"):
        assert results["test"][key] > 0.5, key


def test_mutual_learning_gradient_is_each_students_own_dml_loss(tmp_path, data_dir):
    """d(total)/d(student k) == d(CE_k + w * T^2 KL(p_peer || p_k))/d(student k): peers are constants."""
    import jax.numpy as jnp
    import optax
    from transferlab.train import Trainer
    cfg = config_lib.from_dict(base(task="dml", dml={"kl_weight": 2.0, "temperature": 3.0}))
    trainer = Trainer(cfg, str(tmp_path / "w"))
    task = trainer.task
    state = jax.device_get(trainer.init_state())
    batch = {k: jnp.asarray(v) for k, v in next(trainer.train_iterator()).items()}
    grads = jax.grad(lambda p: task.loss_fn(p, state["model_state"], {}, batch, None, 0)[0])(state["params"])

    def own(p0):
        x = batch["image"]
        s0 = task.models[0].apply({"params": p0}, x, train=True)
        s1 = task.models[1].apply({"params": state["params"]["peer1"]}, x, train=True)
        ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(s0, batch["label"]))
        t = 3.0
        kl = jnp.mean(jnp.sum(jax.nn.softmax(s1 / t) * (jax.nn.log_softmax(s1 / t) - jax.nn.log_softmax(s0 / t)), -1))
        return ce + 2.0 * t * t * kl

    expected = jax.grad(own)(state["params"]["model"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), grads["model"], expected)

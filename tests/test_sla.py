"""SLA+SD (arXiv:1910.05872): self-supervised label augmentation with self-distillation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from transferlab import config as config_lib
from transferlab.errors import ConfigError
from transferlab.tasks import sla
from transferlab.train import Trainer, train_and_evaluate


def base(**kw):
    c = {"task": "sla_sd", "dataset": {"name": "digits"}, "total_steps": 40, "batch_size": 32,
         "eval_batch_size": 64, "log_every_steps": 20, "eval_every_steps": 0, "checkpoint_every_steps": 0,
         "schedule": {"name": "constant"}, "optimizer": {"learning_rate": 0.05},
         "model": {"name": "mlp", "kwargs": {"hidden_sizes": (32,)}}}
    c.update(kw)
    return c


def test_aggregate_takes_each_copys_own_transformation_slot():
    m, b, n = 4, 2, 3
    # joint logit of (copy j, example i, class c, slot s) = 1000 j + 100 i + 10 c + s
    j, i, c, s = np.meshgrid(np.arange(m), np.arange(b), np.arange(n), np.arange(m), indexing="ij")
    joint = (1000 * j + 100 * i + 10 * c + s).reshape(m * b, n * m).astype(np.float32)
    expected = np.mean([1000 * k + 100 * np.arange(b)[:, None] + 10 * np.arange(n)[None, :] + k
                        for k in range(m)], axis=0)
    np.testing.assert_allclose(sla.aggregate(jnp.asarray(joint), m), expected)
    targets = sla.joint_targets(jnp.asarray(np.eye(n, dtype=np.float32)[[2, 0]]), m)
    assert targets.shape == (m * b, n * m)
    for k in range(m):  # copy k of example 0 (class 2) is joint label 2 * M + k
        assert int(jnp.argmax(targets[k * b])) == 2 * m + k and float(targets[k * b].sum()) == 1.0


def test_transforms_are_the_four_rotations_and_six_channel_orders():
    x = np.arange(2 * 3 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 3)
    rot = np.asarray(sla.transform_images(jnp.asarray(x), "rotation")).reshape(4, 2, 3, 3, 3)
    for k in range(4):
        np.testing.assert_array_equal(rot[k], np.rot90(x, k, axes=(1, 2)))
    perm = np.asarray(sla.transform_images(jnp.asarray(x), "color_permutation")).reshape(6, 2, 3, 3, 3)
    np.testing.assert_array_equal(perm[0], x)
    assert len({tuple(p[0, 0, 0]) for p in perm}) == 6
    both = np.asarray(sla.transform_images(jnp.asarray(x), "rotation_color")).reshape(24, 2, 3, 3, 3)
    assert sla.num_transforms("rotation_color") == 24
    np.testing.assert_array_equal(both[0], x)  # the identity first
    for k in range(4):
        for j in range(6):  # rotation k of colour order j
            np.testing.assert_array_equal(both[6 * k + j], np.rot90(perm[j], k, axes=(1, 2)))
    assert len({b.tobytes() for b in both}) == 24


def test_loss_and_gradient_match_the_authors_formula(tmp_path, data_dir):
    """The reference's per-example layout (copies interleaved, preds[i::n, i::n]) written independently."""
    cfg = config_lib.from_dict(base(sla={"temperature": 2.0, "distill_weight": 0.7, "joint_weight": 1.3}))
    trainer = Trainer(cfg, str(tmp_path / "w"))
    task = trainer.task
    state = jax.device_get(trainer.init_state())
    batch = {k: jnp.asarray(v) for k, v in next(trainer.train_iterator()).items()}
    loss, (_, metrics) = task.loss_fn(state["params"], state["model_state"], {}, batch, None, 0)
    x, y, n, t = batch["image"], batch["label"], 4, 2.0

    def reference(params):
        copies = jnp.stack([jnp.rot90(x, k, axes=(1, 2)) for k in range(n)], axis=1)  # [B, n, ...]
        flat = copies.reshape(-1, *x.shape[1:])  # example-major, as the authors' transform
        variables = {"params": params["model"], **state["model_state"]["model"]}
        single_all, inter = task.model.apply(variables, flat, train=True, mutable=["intermediates", "batch_stats"])
        feats = inter["intermediates"]["features"][0]
        joint = task.joint_head.apply({"params": params["joint_head"]}, feats)
        joint_labels = jnp.stack([y * n + k for k in range(n)], 1).reshape(-1)
        joint_ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(joint, joint_labels))
        single = single_all[::n]
        single_ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(single, y))
        agg = sum(joint[k::n, k::n] for k in range(n)) / n
        agg = jax.lax.stop_gradient(agg)
        kl = jnp.mean(jnp.sum(jax.nn.softmax(agg / t) * (jax.nn.log_softmax(agg / t)
                                                         - jax.nn.log_softmax(single / t)), -1))
        return 1.3 * joint_ce + single_ce + 0.7 * t * t * kl

    np.testing.assert_allclose(loss, reference(state["params"]), rtol=1e-5)
    ours = jax.jit(jax.grad(lambda p: task.loss_fn(p, state["model_state"], {}, batch, None, 0)[0]))(state["params"])
    theirs = jax.jit(jax.grad(reference))(state["params"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), ours, theirs)
    assert float(metrics["loss/self_distill"]) > 0


def test_sla_sd_trains_and_reports_single_aggregated_and_joint_heads(tmp_path, data_dir):
    results = train_and_evaluate(config_lib.from_dict(base()), str(tmp_path / "run"))
    for key in ("accuracy", "aggregated_accuracy", "joint_accuracy"):
        assert results["test"][key] > 0.5, (key, results["test"])


@pytest.mark.parametrize("override,culprit", [
    ({"sla": {"transform": "color_permutation"}}, "3 channels"),  # digits are grayscale
    ({"sla": {"transform": "rotation_color"}}, "'rotation_color' needs 3 channels"),
    ({"sla": {"transform": "flip"}}, "sla.transform"),
    ({"sla": {"temperature": 0.0}}, "sla.temperature"),
    ({"sla": {"joint_weight": 0.0, "single_weight": 0.0, "distill_weight": 0.0}}, "nothing to train"),
])
def test_bad_sla_settings_name_the_key(tmp_path, data_dir, override, culprit):
    with pytest.raises(ConfigError, match=culprit):
        cfg = config_lib.from_dict(base(**override))
        config_lib.validate(cfg)
        Trainer(cfg, str(tmp_path / "w")).init_state()


def test_rotation_color_loss_matches_the_formula_on_rgb_images(tmp_path):
    """M = 24 (4 rotations x 6 colour orders) on synthetic RGB inputs: the loss equals the formula written
    in the authors' per-example layout, with the joint label of copy (k, p) being y * 24 + 6k + p."""
    from types import SimpleNamespace
    info = SimpleNamespace(num_classes=5, image_shape=(8, 8, 3), split_sizes={"train": 64})
    cfg = config_lib.from_dict(base(sla={"transform": "rotation_color", "temperature": 3.0}, batch_size=4,
                                    eval_batch_size=4, mesh_shape="data=1"))
    trainer = Trainer(cfg, str(tmp_path / "w"), jax.devices()[:1], info=info)
    task = trainer.task
    state = jax.device_get(trainer.init_state())
    assert state["params"]["joint_head"]["kernel"].shape[-1] == 5 * 24
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(size=(4, 8, 8, 3)), jnp.float32)
    y = jnp.asarray([0, 3, 1, 4], jnp.int32)
    loss, _ = task.loss_fn(state["params"], state["model_state"], {}, {"image": x, "label": y}, None, 0)
    n, t = 24, 3.0
    import itertools
    copies = [jnp.rot90(x[..., list(p)], k, axes=(1, 2)) for k in range(4) for p in itertools.permutations(range(3))]
    flat = jnp.stack(copies, axis=1).reshape(-1, 8, 8, 3)  # example-major
    variables = {"params": state["params"]["model"], **state["model_state"]["model"]}
    single_all, inter = task.model.apply(variables, flat, train=True, mutable=["intermediates", "batch_stats"])
    joint = task.joint_head.apply({"params": state["params"]["joint_head"]}, inter["intermediates"]["features"][0])
    joint_ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        joint, jnp.stack([y * n + j for j in range(n)], 1).reshape(-1)))
    single = single_all[::n]
    agg = sum(joint[j::n, j::n] for j in range(n)) / n
    kl = jnp.mean(jnp.sum(jax.nn.softmax(agg / t) * (jax.nn.log_softmax(agg / t) - jax.nn.log_softmax(single / t)),
                          -1))
    reference = joint_ce + jnp.mean(optax.softmax_cross_entropy_with_integer_labels(single, y)) + t * t * kl
    np.testing.assert_allclose(loss, reference, rtol=1e-5)

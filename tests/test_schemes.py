"""KD schemes beyond one teacher: mutual learning, self-distillation, born-again generations, caching."""

import glob
import os
import signal

import jax
import numpy as np
import pytest

from transferlab import config as config_lib, preemption
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


def test_init_checkpoint_from_a_dml_run_restores_every_student(tmp_path, data_dir, capfd):
    """init_checkpoint = a DML run: every student starts from its own trained weights; from a
    single-model run, student 0 does and the peers keep their fresh init (said in one line)."""
    from transferlab import checkpoint
    from transferlab.train import Trainer
    dml = {"num_students": 2, "peers": ({"name": "mlp", "kwargs": {"hidden_sizes": (16,)}},)}
    source = str(tmp_path / "dml")
    train_and_evaluate(config_lib.from_dict(base(task="dml", dml=dml, total_steps=6)), source)
    trainer = Trainer(config_lib.from_dict(base(task="dml", dml=dml, init_checkpoint=source)), str(tmp_path / "b"))
    ckpt = checkpoint.Checkpointer(source, read_only=True)
    saved, _ = ckpt.restore(6, checkpoint.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings))
    ckpt.close()
    fresh = trainer.init_state()
    started = trainer.load_init_checkpoint(fresh)
    for name in ("model", "peer1"):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(started["params"][name]),
                     jax.device_get(saved["params"][name]))
    single = str(tmp_path / "single")
    train_and_evaluate(config_lib.from_dict(base(total_steps=6)), single)
    trainer = Trainer(config_lib.from_dict(base(task="dml", dml=dml, init_checkpoint=single)), str(tmp_path / "c"))
    capfd.readouterr()
    started = trainer.load_init_checkpoint(trainer.init_state())
    assert f"[note] init_checkpoint: {single} has no peer1; they start from their fresh init" in capfd.readouterr().err
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(started["params"]["peer1"]),
                 jax.device_get(trainer.init_state()["params"]["peer1"]))


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
    # Both sides in float32 products: on GPUs XLA's default is TF32, which rounds the two ways differently.
    with jax.default_matmul_precision("float32"):
        grads = jax.jit(jax.grad(lambda p: task.loss_fn(p, state["model_state"], {}, batch, None, 0)[0]))(
            state["params"])

    def own(p0):
        x = batch["image"]
        s0 = task.models[0].apply({"params": p0}, x, train=True)
        s1 = task.models[1].apply({"params": state["params"]["peer1"]}, x, train=True)
        ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(s0, batch["label"]))
        t = 3.0
        kl = jnp.mean(jnp.sum(jax.nn.softmax(s1 / t) * (jax.nn.log_softmax(s1 / t) - jax.nn.log_softmax(s0 / t)), -1))
        return ce + 2.0 * t * t * kl

    with jax.default_matmul_precision("float32"):
        expected = jax.jit(jax.grad(own))(state["params"]["model"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), grads["model"], expected)


def test_self_distillation_from_an_ema_of_the_student(tmp_path, data_dir):
    from transferlab import parallel
    from transferlab.train import Trainer
    cfg = config_lib.from_dict(base(task="kd", teacher={"checkpoint": "self_ema"},
                                    distill={"ema_decay": 0.9, "terms": ({"name": "kd", "weight": 0.5},)}))
    trainer = Trainer(cfg, str(tmp_path / "w"))
    frozen = trainer.task.load_frozen(trainer.mesh, trainer.abstract_images)
    trainer.compile(frozen)
    state = trainer.init_state()
    before = jax.device_get(state["params"]["model"])
    batch = parallel.global_batch(trainer.mesh, next(trainer.train_iterator()))
    state, _ = trainer.jit_train_step(state, frozen, batch)
    ema = jax.device_get(state["model_state"]["ema"]["params"])
    # EMA after one step from the pre-update weights: 0.9 * init + 0.1 * init == init
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ema, before)
    state, _ = trainer.jit_train_step(state, frozen, batch)
    mid = jax.device_get(state["model_state"]["ema"]["params"])
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(mid), jax.tree.leaves(before)))
    results = train_and_evaluate(cfg, str(tmp_path / "run"))
    assert results["test"]["accuracy"] > 0.5


def test_data_partition_kd_between_two_pretrained_models(tmp_path, data_dir):
    """Fantastic Gains (2310.17653): student initialized from its own pretrained run, distilled per sample
    from whichever of (teacher, its own pretrained self) is more confident in the true class."""
    teacher_dir, student_dir = str(tmp_path / "teacher"), str(tmp_path / "student")
    teacher = {"name": "mlp", "kwargs": {"hidden_sizes": (64,)}}
    train_and_evaluate(config_lib.from_dict(base(model=teacher, total_steps=30)), teacher_dir)
    pre = train_and_evaluate(config_lib.from_dict(base(total_steps=10)), student_dir)
    cfg = config_lib.from_dict(base(
        task="kd", init_checkpoint=student_dir, teacher={**teacher, "checkpoint": teacher_dir},
        extra_teachers=({"name": "mlp", "kwargs": {"hidden_sizes": (32,)}, "checkpoint": student_dir},),
        distill={"teacher_combination": "partition", "ce_weight": 0.0, "terms": ({"name": "kd", "temperature": 1.0},)},
        total_steps=1, optimizer={"learning_rate": 1e-9}))
    out = train_and_evaluate(cfg, str(tmp_path / "dp"))
    # one near-zero step from the pretrained student keeps its accuracy: the init really came from the checkpoint
    assert out["test"]["accuracy"] == pytest.approx(pre["test"]["accuracy"], abs=0.01)
    import jax.numpy as jnp
    from transferlab.train import Trainer
    task = Trainer(cfg, str(tmp_path / "dp2")).task
    a = jnp.asarray([[5.0, 0.0], [0.0, 1.0]])
    b = jnp.asarray([[0.0, 1.0], [0.0, 5.0]])
    combined = task.combined_logits([{"logits": a}, {"logits": b}], jnp.asarray([0, 1]))
    np.testing.assert_array_equal(combined, jnp.asarray([[5.0, 0.0], [0.0, 5.0]]))
    # evaluation does not pick by the eval labels (an oracle): its teacher_accuracy is of the teachers' average
    np.testing.assert_array_equal(task.combined_logits([{"logits": a}, {"logits": b}], None), (a + b) / 2)


def test_born_again_generations_and_their_ensemble(tmp_path, data_dir):
    import json
    import os
    import subprocess
    import sys
    from conftest import REPO
    workdir = str(tmp_path / "ban")
    proc = subprocess.run([sys.executable, "-m", "transferlab.main", "--config",
                           "experiments/kd/born_again.py:generations=2,seeds=1,steps=8", "--workdir", workdir,
                           "--config.dataset.name=digits", "--config.model.name=mlp",
                           "--config.model.kwargs.hidden_sizes=(32,)", "--config.batch_size=32",
                           "--config.log_every_steps=4"], cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    gen2 = json.load(open(os.path.join(workdir, "gen2", "seed_0", "config.json")))
    assert gen2["teacher"]["checkpoint"] == os.path.join(os.path.abspath(workdir), "gen1", "seed_0")
    rows = {r["arm"]: r for r in json.load(open(os.path.join(workdir, "results.json")))["arms"]}
    assert set(rows) == {"gen0", "gen1", "gen2", "ensemble"}
    ens = json.load(open(os.path.join(workdir, "ensemble", "seed_0", "results.json")))
    assert ens["test"]["count"] == 360 and 0.0 < ens["test"]["accuracy"] <= 1.0
    assert ens["environment"]["jax"] == jax.__version__  # the study's environment line counts it too


def test_teacher_cache_agrees_with_the_live_teacher(tmp_path, data_dir):
    import jax.numpy as jnp
    from transferlab import parallel
    from transferlab.tasks import teacher_cache
    from transferlab.train import Trainer
    teacher_dir = str(tmp_path / "teacher")
    teacher = {"name": "mlp", "kwargs": {"hidden_sizes": (64,)}}
    train_and_evaluate(config_lib.from_dict(base(model=teacher, total_steps=10)), teacher_dir)
    cache_dir = str(tmp_path / "data")
    import shutil
    shutil.copytree(os.path.join(data_dir, "digits"), os.path.join(cache_dir, "digits"))

    def kd(cache, **kw):
        return config_lib.from_dict(base(task="kd", dataset={"name": "digits", "data_dir": cache_dir},
                                         teacher={**teacher, "checkpoint": teacher_dir},
                                         distill={"teacher_cache": cache, "terms": ({"name": "kd"},)}, **kw))
    cached, live = Trainer(kd(True), str(tmp_path / "c")), Trainer(kd(False), str(tmp_path / "l"))
    frozen_c = cached.task.load_frozen(cached.mesh, cached.abstract_images)
    frozen_l = live.task.load_frozen(live.mesh, live.abstract_images)
    assert len(os.listdir(os.path.join(cache_dir, "transferlab_teacher_cache"))) == 1
    state = jax.device_get(cached.init_state())
    batch = {k: jnp.asarray(v) for k, v in next(cached.train_iterator()).items()}
    loss_c, (_, m_c) = cached.task.loss_fn(state["params"], state["model_state"], frozen_c, batch, None, jnp.int32(0))
    loss_l, (_, m_l) = live.task.loss_fn(state["params"], state["model_state"], frozen_l, batch, None, jnp.int32(0))
    assert float(loss_c) == pytest.approx(float(loss_l), rel=1e-5)
    table = np.asarray(frozen_c["cache"][0]["logits"])
    assert teacher_cache.verify(table, live.task.teachers[0], frozen_l["teachers"][0], live.config, live.mesh, 64) \
        <= teacher_cache.AGREEMENT_ATOL
    results = train_and_evaluate(kd(True), str(tmp_path / "run"))
    assert results["test"]["accuracy"] > 0.3
    # the teacher retrained in place (same directory and step): a new cache file, made from the new weights
    shutil.rmtree(teacher_dir)
    train_and_evaluate(config_lib.from_dict(base(model=teacher, total_steps=10, seed=1)), teacher_dir)
    again = Trainer(kd(True), str(tmp_path / "c2"))
    frozen_again = again.task.load_frozen(again.mesh, again.abstract_images)
    assert len(os.listdir(os.path.join(cache_dir, "transferlab_teacher_cache"))) == 2
    assert teacher_cache.verify(np.asarray(frozen_again["cache"][0]["logits"]), again.task.teachers[0],
                                Trainer(kd(False), str(tmp_path / "l2")).task.load_frozen(
                                    again.mesh, again.abstract_images)["teachers"][0],
                                again.config, again.mesh, 64) <= teacher_cache.AGREEMENT_ATOL
    # a damaged cache file (replaced, truncated) is built again, not used (found by a kill/damage audit)
    good = np.asarray(frozen_again["cache"][0]["logits"])
    newest = max(glob.glob(os.path.join(cache_dir, "transferlab_teacher_cache", "*.npy")), key=os.path.getmtime)
    for damage in (lambda p: np.save(p, np.zeros((10, 10), np.float32)), lambda p: open(p, "r+b").truncate(1000)):
        damage(newest)
        rebuilt = Trainer(kd(True), str(tmp_path / "c3")).task.load_frozen(again.mesh, again.abstract_images)
        np.testing.assert_array_equal(np.asarray(rebuilt["cache"][0]["logits"]), good)
    from transferlab.errors import ConfigError, UserError
    with pytest.raises(ConfigError, match="fixed or replayable inputs"):
        Trainer(kd(True, augment={"flip": True}), str(tmp_path / "bad"))
    # a bfloat16 teacher's cache (logits and a feature tap) agrees with its own forward (a float32 tolerance
    # refused every one; so could a forward compiled apart for each tap)
    fitnet = {"name": "fitnet", "student_tap": "features", "teacher_tap": "features", "connector": "linear"}
    bf16 = config_lib.from_dict(base(task="kd", dataset={"name": "digits", "data_dir": cache_dir},
                                     teacher={**teacher, "checkpoint": teacher_dir, "dtype": "bfloat16"},
                                     distill={"teacher_cache": True, "terms": ({"name": "kd"}, fitnet)}))
    trainer = Trainer(bf16, str(tmp_path / "bf16"))
    cached = trainer.task.load_frozen(trainer.mesh, trainer.abstract_images)["cache"][0]
    assert np.all(np.isfinite(cached["logits"])) and cached["features"].shape == (1257, 64)
    # a data directory the cache cannot be written in: one line, before the teacher's pass over the data
    unwritable = str(tmp_path / "data_ro")
    shutil.copytree(os.path.join(data_dir, "digits"), os.path.join(unwritable, "digits"))
    open(os.path.join(unwritable, "transferlab_teacher_cache"), "w").close()  # (root ignores chmod)
    blocked = config_lib.from_dict(base(task="kd", dataset={"name": "digits", "data_dir": unwritable},
                                        teacher={**teacher, "checkpoint": teacher_dir},
                                        distill={"teacher_cache": True, "terms": ({"name": "kd"},)}))
    trainer = Trainer(blocked, str(tmp_path / "ro"))
    with pytest.raises(UserError, match=r"'distill.teacher_cache': cannot write the cache in .*data_ro/"
                                        r"transferlab_teacher_cache .*set distill.teacher_cache=False"):
        trainer.task.load_frozen(trainer.mesh, trainer.abstract_images)


def test_teacher_cache_of_replayable_crop_and_flip_views(tmp_path, data_dir):
    """`teacher_cache_views=K`: K crop/flip views per example cached once, logits and the feature taps terms
    read; a step shows each example one view, exactly the image its cached outputs were computed on, so the
    cached loss equals the live teacher's."""
    import shutil

    import jax.numpy as jnp
    from transferlab.errors import ConfigError
    from transferlab.tasks import common
    from transferlab.train import Trainer
    teacher_dir, cache_dir = str(tmp_path / "teacher"), str(tmp_path / "data")
    teacher = {"name": "mlp", "kwargs": {"hidden_sizes": (64,)}}
    train_and_evaluate(config_lib.from_dict(base(model=teacher, total_steps=10)), teacher_dir)
    shutil.copytree(os.path.join(data_dir, "digits"), os.path.join(cache_dir, "digits"))

    def kd(cache=True, views=4, **kw):
        return config_lib.from_dict(base(task="kd", dataset={"name": "digits", "data_dir": cache_dir},
                                         teacher={**teacher, "checkpoint": teacher_dir},
                                         augment=kw.pop("augment", {"crop_padding": 1, "flip": True}),
                                         distill={"teacher_cache": cache, "teacher_cache_views": views,
                                                  "terms": ({"name": "kd"}, fitnet)}, **kw))
    fitnet = {"name": "fitnet", "weight": 0.1, "student_tap": "features", "teacher_tap": "features",
              "connector": "linear"}
    trainer = Trainer(kd(), str(tmp_path / "c"))
    frozen = trainer.task.load_frozen(trainer.mesh, trainer.abstract_images)
    assert sorted(frozen["cache"][0]) == ["features", "logits"]  # every teacher tap a term reads
    table, features = np.asarray(frozen["cache"][0]["logits"]), np.asarray(frozen["cache"][0]["features"])
    assert table.shape == (1257, 4, 10) and not np.allclose(table[:, 0], table[:, 1])  # the views differ
    assert features.shape == (1257, 4, 64)
    batch = {k: jnp.asarray(v) for k, v in next(trainer.train_iterator()).items()}
    shown = jax.jit(trainer.task.replay_augment)(jax.random.key(3), batch)
    assert len(set(np.asarray(shown["view"]).tolist())) > 1 and not np.array_equal(shown["image"], batch["image"])
    variables = frozen["teachers"][0]
    live, _, taps = common.forward(trainer.task.teachers[0], variables["params"], variables["model_state"],
                                   shown["image"], train=False, taps=True)
    rows = (np.asarray(shown["index"]), np.asarray(shown["view"]))
    np.testing.assert_allclose(table[rows], live, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(features[rows], taps["features"], rtol=1e-5, atol=1e-5)
    # the cached loss equals the live teacher's on the same replayed images
    live_trainer = Trainer(kd(cache=False, views=0), str(tmp_path / "l"))
    frozen_live = live_trainer.task.load_frozen(live_trainer.mesh, live_trainer.abstract_images)
    state = jax.device_get(trainer.init_state())
    args = (state["params"], state["model_state"])
    loss_c = trainer.task.loss_fn(*args, frozen, shown, None, jnp.int32(0))[0]
    loss_l = live_trainer.task.loss_fn(*args, frozen_live, shown, None, jnp.int32(0))[0]
    assert float(loss_c) == pytest.approx(float(loss_l), rel=1e-5)
    assert train_and_evaluate(kd(), str(tmp_path / "run"))["test"]["accuracy"] > 0.3
    assert len(os.listdir(os.path.join(cache_dir, "transferlab_teacher_cache"))) == 2  # built once, reused
    for config, message in (
            (dict(augment={}), r"'distill.teacher_cache_views': 4 views of un-augmented images are one image"),
            (dict(views=0), r"set distill.teacher_cache_views \(e.g. 8 replayable crop/flip views"),
            (dict(cache=False), r"'distill.teacher_cache_views': set, but distill.teacher_cache is off"),
            (dict(augment={"crop_padding": 1, "mixup_alpha": 0.2}), r"mixup and cutmix mix pairs of examples")):
        with pytest.raises(ConfigError, match=message):
            Trainer(kd(**config), str(tmp_path / "bad"))


def test_hard_augmentor_seeks_disagreement_and_the_student_learns_from_its_images(tmp_path, data_dir):
    """HARD: the augmentor's gradient comes from its own objective (teacher-student disagreement on the warped
    images, minus teacher inconsistency), the student's from its loss on those images as constants."""
    import jax.numpy as jnp
    from transferlab.tasks import hard_augment
    from transferlab.train import Trainer
    # identity warp leaves the image unchanged
    images = jnp.asarray(np.random.RandomState(0).rand(2, 8, 8, 1), jnp.float32)
    eye = jnp.tile(jnp.asarray([[1.0, 0, 0], [0, 1.0, 0]]), (2, 1, 1))
    np.testing.assert_allclose(hard_augment.warp(images, eye), images, atol=1e-5)
    teacher_dir = str(tmp_path / "teacher")
    teacher = {"name": "mlp", "kwargs": {"hidden_sizes": (64,)}}
    train_and_evaluate(config_lib.from_dict(base(model=teacher, total_steps=20)), teacher_dir)
    cfg = config_lib.from_dict(base(task="kd", teacher={**teacher, "checkpoint": teacher_dir},
                                    distill={"hard_augment": {"enabled": True, "consistency_weight": 0.0},
                                             "terms": ({"name": "kd"},)}))
    trainer = Trainer(cfg, str(tmp_path / "kd"))
    frozen = trainer.task.load_frozen(trainer.mesh, trainer.abstract_images)
    state = jax.device_get(trainer.init_state())
    batch = {k: jnp.asarray(v) for k, v in next(trainer.train_iterator()).items()}
    rng = jax.random.PRNGKey(0)

    @jax.jit
    def out(p):
        return trainer.task.loss_fn(p, state["model_state"], frozen, batch, rng, jnp.int32(0))

    def grad_of(metric):
        return jax.jit(jax.grad(lambda p: out(p)[1][1][metric]))(state["params"])

    def norm(tree):
        return float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(tree))))

    g = jax.jit(jax.grad(lambda p: out(p)[0]))(state["params"])
    assert norm(g["augmentor"]) > 0 and norm(g["model"]) > 0
    assert norm(grad_of("loss/hard_disagreement")["model"]) == 0  # the objective moves the augmentor only
    assert norm(grad_of("loss/hard_disagreement")["augmentor"]) > 0
    assert norm(grad_of("loss/term0_kd")["augmentor"]) == 0  # the student's loss: its images are constants
    # the saturation penalty (mean squared pre-tanh deviation) pulls the augmentor's warps back, nothing else
    saturation = grad_of("loss/hard_saturation")
    assert norm(saturation["augmentor"]) > 0 and norm(saturation["model"]) == 0
    # the student sees fraction * B (rounded half up, at least one) of the batch warped, the rest unchanged
    for fraction, count in ((0.5, 16), (0.25, 8), (1.0, 32), (0.01, 1), (0.2, 6)):
        task = Trainer(config_lib.from_dict(base(task="kd", teacher={**teacher, "checkpoint": teacher_dir}, distill={
            "hard_augment": {"enabled": True, "fraction": fraction}, "terms": ({"name": "kd"},)})),
            str(tmp_path / "kd")).task
        shown = jax.jit(task._hard_augment)(state["params"], state["model_state"], frozen, batch, rng)[0]["image"]
        changed = np.any(np.asarray(shown) != np.asarray(batch["image"]), axis=(1, 2, 3))
        assert len(changed) == 32 and changed.sum() == count, (fraction, changed.sum())
    step = jax.tree.map(lambda p, d: p - 1e-2 * d, state["params"]["augmentor"], g["augmentor"])  # SGD on the total
    before, after = out(state["params"])[1][1], out({**state["params"], "augmentor": step})[1][1]
    assert float(after["loss/hard_disagreement"]) > float(before["loss/hard_disagreement"])
    results = train_and_evaluate(cfg, str(tmp_path / "run"))
    assert np.isfinite(results["test"]["loss"])


class _StopAfter(preemption.StopFlag):
    """A preemption flag that stops the loop after `steps` steps, as a SIGTERM arriving then would."""

    def __init__(self, steps):
        super().__init__()
        self.steps = steps

    def should_stop(self):
        self.steps -= 1
        if self.steps == 0:
            self.signum = signal.SIGTERM
        return self.raised


RESUMED_SCHEMES = {  # every piece of state outside the student's params must come back too
    "kd_crd_bn": dict(model={"name": "resnet8", "kwargs": {}}, task="kd",
                      teacher={"name": "mlp", "checkpoint": "random"}, augment={"crop_padding": 1, "flip": True},
                      distill={"terms": ({"name": "kd"}, {"name": "crd", "embed_dim": 8, "num_negatives": 16}),
                               "ce_weight": 0.5}),
    "self_ema_mixup": dict(task="kd", teacher={"checkpoint": "self_ema"}, augment={"mixup_alpha": 0.4},
                           distill={"terms": ({"name": "kd", "weight": 0.5},), "ema_decay": 0.9}),
    "hard_augment": dict(task="kd", teacher={"name": "mlp", "kwargs": {"hidden_sizes": (16,)}, "checkpoint": "random"},
                         distill={"terms": ({"name": "kd"},), "hard_augment": {"enabled": True}}),
    "dml": dict(task="dml", dml={"num_students": 2}),
    "sla_sd": dict(task="sla_sd"),
}


@pytest.mark.parametrize("scheme", sorted(RESUMED_SCHEMES))
def test_a_stopped_run_resumes_bitwise_as_one_that_never_stopped(tmp_path, data_dir, monkeypatch, scheme):
    from transferlab import checkpoint
    from transferlab.train import Trainer
    # one device: the programs compile ~2x faster; resuming onto the 8-device mesh is test_train's kill test
    cfg = config_lib.from_dict(base(total_steps=8, checkpoint_every_steps=4, mesh_shape="data=1",
                                    **RESUMED_SCHEMES[scheme]))
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    one = jax.devices()[:1]
    train_and_evaluate(cfg, straight, one)
    monkeypatch.setattr(preemption, "_FLAG", _StopAfter(3))
    assert train_and_evaluate(cfg, resumed, one)["preempted_at_step"] == 3
    monkeypatch.setattr(preemption, "_FLAG", None)
    train_and_evaluate(cfg, resumed, one)

    def final(workdir):
        trainer = Trainer(cfg, workdir, jax.devices()[:1])
        ckpt = checkpoint.Checkpointer(workdir, read_only=True)
        state, _ = ckpt.restore(8, checkpoint.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings))
        ckpt.close()
        return jax.device_get(state)

    jax.tree.map(np.testing.assert_array_equal, final(straight), final(resumed))

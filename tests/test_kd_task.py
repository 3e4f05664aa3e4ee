"""The KD task: frozen teacher restored from a workdir, terms composed from the config, no retracing."""

import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transferlab import config as config_lib, parallel
from transferlab.errors import ConfigError, UserError
from transferlab.train import Trainer, check_config, train_and_evaluate


def base(**kw):
    c = {"dataset": {"name": "digits"}, "total_steps": 12, "batch_size": 32, "eval_batch_size": 64,
         "log_every_steps": 4, "eval_every_steps": 0, "checkpoint_every_steps": 0,
         "schedule": {"name": "constant"}, "optimizer": {"learning_rate": 0.05}}
    c.update(kw)
    return c


TEACHER = {"name": "mlp", "kwargs": {"hidden_sizes": (128,)}}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("teacher"))
    train_and_evaluate(config_lib.from_dict(base(model=TEACHER, total_steps=30)), workdir)
    return workdir


def kd_config(teacher_dir, terms=({"name": "kd", "weight": 0.9, "temperature": 4.0},), **kw):
    return config_lib.from_dict(base(task="kd", model={"name": "mlp", "kwargs": {"hidden_sizes": (32,)}},
                                     teacher={**TEACHER, "checkpoint": teacher_dir},
                                     distill={"ce_weight": 0.1, "terms": terms}, **kw))


def test_teacher_is_frozen_and_outside_the_optimizer(tmp_path, teacher_dir):
    trainer = Trainer(kd_config(teacher_dir), str(tmp_path / "kd"))
    frozen = trainer.task.load_frozen(trainer.mesh, trainer.abstract_images)
    before = jax.device_get(frozen)
    trainer.compile(frozen)
    state = trainer.init_state()
    assert set(state["params"]) == {"model", "connectors"}  # no teacher params in the trained state
    it = trainer.train_iterator()
    for _ in range(3):
        state, metrics = trainer.jit_train_step(state, frozen, parallel.global_batch(trainer.mesh, next(it)))
    jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(frozen))
    assert "loss/term0_kd" in metrics and "teacher_agreement" in metrics


def test_teacher_restored_equals_the_teacher_run(tmp_path, teacher_dir):
    teacher_cfg = config_lib.from_dict(base(model=TEACHER, total_steps=30))
    teacher_trainer = Trainer(teacher_cfg, teacher_dir)
    from transferlab import checkpoint
    ckpt = checkpoint.Checkpointer(teacher_dir, read_only=True)
    state, _ = ckpt.restore(30, checkpoint.abstract_with_shardings(teacher_trainer.abstract_state,
                                                                   teacher_trainer.state_shardings))
    trainer = Trainer(kd_config(teacher_dir), str(tmp_path / "kd"))
    frozen = trainer.task.load_frozen(trainer.mesh, trainer.abstract_images)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(frozen["teachers"][0]["params"]),
                 jax.device_get(state["params"]["model"]))


def _loss_setup(tmp_path, teacher_dir, terms):
    """A KD task with ce_weight 0 and `terms`, its initial state, one batch, and the student's and
    teacher's logits on it."""
    cfg = config_lib.from_dict(base(task="kd", model={"name": "mlp", "kwargs": {"hidden_sizes": (32,)}},
                                    teacher={**TEACHER, "checkpoint": teacher_dir},
                                    distill={"ce_weight": 0.0, "terms": terms}))
    trainer = Trainer(cfg, str(tmp_path / "kd"))
    frozen = trainer.task.load_frozen(trainer.mesh, trainer.abstract_images)
    state = jax.device_get(trainer.init_state())
    batch = {k: jnp.asarray(v) for k, v in next(trainer.train_iterator()).items()}
    s = trainer.task.model.apply({"params": state["params"]["model"], **state["model_state"]["model"]},
                                 batch["image"], train=True)
    teacher = frozen["teachers"][0]
    t = trainer.task.teachers[0].apply({"params": teacher["params"], **teacher["model_state"]}, batch["image"],
                                       train=False)
    return trainer, state, frozen, batch, s, t


def _loss_of(trainer, state, frozen, batch):
    """The task's total loss as a function of the per-step key."""
    return lambda key: trainer.task.loss_fn(state["params"], state["model_state"], frozen, batch, key,
                                            jnp.int32(0))[0]


def test_kd_loss_value_matches_a_hand_computation(tmp_path, teacher_dir):
    """With ce_weight=0 the total loss is exactly T^2 * KL(p_t || p_s) at temperature T."""
    trainer, state, frozen, batch, s, t = _loss_setup(tmp_path, teacher_dir, ({"name": "kd", "temperature": 2.0},))
    loss = _loss_of(trainer, state, frozen, batch)(None)
    s, t = np.asarray(s, np.float64) / 2.0, np.asarray(t, np.float64) / 2.0
    log_ps = s - np.log(np.exp(s - s.max(1, keepdims=True)).sum(1, keepdims=True)) - s.max(1, keepdims=True)
    log_pt = t - np.log(np.exp(t - t.max(1, keepdims=True)).sum(1, keepdims=True)) - t.max(1, keepdims=True)
    expected = 4.0 * np.mean(np.sum(np.exp(log_pt) * (log_pt - log_ps), axis=1))
    assert float(loss) == pytest.approx(expected, rel=1e-4)


def test_standardize_logits_makes_any_logit_term_its_ls_variant(tmp_path, teacher_dir):
    """DKD+LS (arXiv:2403.01427): the term sees z-scored student and teacher logits."""
    from transferlab import losses
    from transferlab.losses.logit import standardize
    terms = ({"name": "dkd", "temperature": 2.0, "standardize_logits": True},)
    trainer, state, frozen, batch, s, t = _loss_setup(tmp_path, teacher_dir, terms)
    loss = _loss_of(trainer, state, frozen, batch)
    expected = losses.get("dkd").fn(standardize(s), standardize(t), batch, temperature=2.0)
    plain = losses.get("dkd").fn(s, t, batch, temperature=2.0)
    assert float(loss(None)) == pytest.approx(float(expected), rel=1e-5)
    assert abs(float(expected) - float(plain)) > 1e-3
    with pytest.raises(ConfigError, match=r"terms\[0\]\.standardize_logits: only for logit terms"):
        Trainer(kd_config(teacher_dir, terms=({"name": "fitnet", "student_tap": "features",
                                                "teacher_tap": "features", "standardize_logits": True},)),
                str(tmp_path / "bad"))
    with pytest.raises(ConfigError, match="standardize_logits: expected true or false"):
        Trainer(kd_config(teacher_dir, terms=({"name": "kd", "standardize_logits": "yes"},)), str(tmp_path / "b2"))


def test_dkpp_draws_a_fresh_permutation_each_step(tmp_path, teacher_dir):
    loss = _loss_of(*_loss_setup(tmp_path, teacher_dir, ({"name": "dkpp"},))[:4])
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    assert float(loss(k1)) == float(loss(k1))
    assert float(loss(k1)) != float(loss(k2))


def test_nd_uses_the_teachers_train_split_class_means(tmp_path, teacher_dir):
    """ND (arXiv:2305.17007) with class_means='train' (the default): per-class means of the teacher's
    features over the un-augmented train split, computed once in load_frozen and used by the loss."""
    from transferlab import data, losses
    trainer, state, frozen, batch, _, _ = _loss_setup(tmp_path, teacher_dir, ({"name": "nd"},))
    means = np.asarray(frozen["class_means"]["term0"])
    teacher = frozen["teachers"][0]
    feats, labels = [], []
    for b in data.eval_batches("digits", "train", 100):
        _, taps = trainer.task.teachers[0].apply({"params": teacher["params"], **teacher["model_state"]},
                                                 b["image"], train=False, mutable=["intermediates"])
        keep = np.asarray(b["mask"]).astype(bool)
        feats.append(np.asarray(taps["intermediates"]["features"][0])[keep])
        labels.append(np.asarray(b["label"])[keep])
    feats, labels = np.concatenate(feats), np.concatenate(labels)
    assert len(labels) == 1257 and means.shape == (10, feats.shape[1])
    expected = np.stack([feats[labels == c].mean(axis=0) for c in range(10)])
    np.testing.assert_allclose(means, expected, rtol=1e-5, atol=1e-6)

    def terms_value(means_or_none):
        student = trainer.task.model.apply({"params": state["params"]["model"], **state["model_state"]["model"]},
                                           batch["image"], train=True, mutable=["intermediates"])[1]
        s = trainer.task.connectors["term0"].apply({"params": state["params"]["connectors"]["term0"]},
                                                   student["intermediates"]["features"][0])
        t = trainer.task.teachers[0].apply({"params": teacher["params"], **teacher["model_state"]}, batch["image"],
                                           train=False, mutable=["intermediates"])[1]["intermediates"]["features"][0]
        return losses.get("nd").fn(s, t, batch, class_means=means_or_none)

    loss = _loss_of(trainer, state, frozen, batch)(None)
    assert float(loss) == pytest.approx(float(terms_value(means)), rel=1e-5)
    assert abs(float(terms_value(means)) - float(terms_value(None))) > 1e-4  # in-batch means differ
    with pytest.raises(ConfigError, match=r"terms\[0\]\.class_means: 'mean' is not one of train, batch"):
        Trainer(kd_config(teacher_dir, terms=({"name": "nd", "class_means": "mean"},)), str(tmp_path / "b1"))
    self_ema = config_lib.from_dict(base(task="kd", teacher={"checkpoint": "self_ema"},
                                         distill={"terms": ({"name": "nd"},)}))
    with pytest.raises(ConfigError, match="class_means: 'train' needs a fixed teacher"):
        Trainer(self_ema, str(tmp_path / "b2"))


def test_feature_term_with_connector_trains(tmp_path, teacher_dir):
    terms = ({"name": "kd", "weight": 0.9, "temperature": 4.0},
             {"name": "fitnet", "weight": 1.0, "student_tap": "features", "teacher_tap": "features",
              "connector": "linear"})
    results = train_and_evaluate(kd_config(teacher_dir, terms=terms), str(tmp_path / "kd"))
    assert results["test"]["accuracy"] > 0.3


def test_wrong_tap_lists_the_available_taps(tmp_path, teacher_dir):
    terms = ({"name": "fitnet", "student_tap": "stage9", "teacher_tap": "features"},)
    with pytest.raises(ConfigError, match="available: .*features"):
        Trainer(kd_config(teacher_dir, terms=terms), str(tmp_path / "kd"))


def test_shape_mismatch_without_connector_is_an_error(tmp_path, teacher_dir):
    terms = ({"name": "fitnet", "student_tap": "features", "teacher_tap": "features", "connector": "none"},)
    with pytest.raises(ConfigError, match="differ in shape"):
        Trainer(kd_config(teacher_dir, terms=terms), str(tmp_path / "kd"))


@pytest.mark.parametrize("term, shapes", [
    ({"name": "at", "student_tap": ["hidden1"], "teacher_tap": ["hidden1"]}, r"\['hidden1'\] \[\(32, 32\)\]"),
    ({"name": "dist", "teacher_tap": "features"}, r"teacher tap features \[\(32, \d+\)\]"),
    ({"name": "kd_std", "student_tap": "hidden1"}, r"student tap hidden1 \[\(32, 32\)\]"),
])
def test_taps_a_loss_cannot_compare_are_one_config_error_before_anything_is_written(tmp_path, teacher_dir, term,
                                                                                     shapes):
    """Found by tracing the step (no connector checks these shapes), before the workdir gets any file."""
    workdir = tmp_path / "kd"
    with pytest.raises(ConfigError, match=rf"distill.terms\[0\]: loss '{term['name']}' failed on .*{shapes}"):
        train_and_evaluate(kd_config(teacher_dir, terms=(term,)), str(workdir))
    assert not workdir.exists() or not os.listdir(workdir)


def test_a_bug_inside_a_loss_is_not_blamed_on_the_taps(tmp_path, teacher_dir):
    """A loss of one's own that branches on a traced value raises JAX's own error (with its traceback), not
    a config error about the taps."""
    from transferlab import losses

    @losses.register("test_branches_on_a_tracer", taps=("logits", "logits"))
    def branches(student, teacher, batch):
        return jnp.mean(student) if jnp.mean(student) > 0 else jnp.mean(teacher)
    with pytest.raises(jax.errors.ConcretizationTypeError):
        train_and_evaluate(kd_config(teacher_dir, terms=({"name": "test_branches_on_a_tracer"},)),
                           str(tmp_path / "kd"))


@pytest.mark.parametrize("term, message", [
    ({"name": "kd", "weight": "a"}, r"terms\[0\]\.weight: expected a finite number >= 0, got 'a'"),
    ({"name": "kd", "weight": -1.0}, r"terms\[0\]\.weight: expected a finite number >= 0, got -1.0"),
    ({"name": "kd", "warmup_steps": -3}, r"terms\[0\]\.warmup_steps: expected an int >= 0"),
    ({"name": "kd", "temperature": -1.0}, r"terms\[0\]: loss 'kd' hparam 'temperature': got -1.0; expected a number > 0"),
    ({"name": "dist", "tau": 0.0}, r"hparam 'tau': got 0.0; expected a number > 0"),
    ({"name": "rkd", "student_tap": "features", "teacher_tap": "features", "w_dist": float("inf")},
     r"'distill.terms\[0\].w_dist': expected a finite number, got inf"),
    ({"name": "kd", "temperature": 1e39}, r"'distill.terms\[0\].temperature': 1e\+39 is beyond float32's range"),
    ({"name": "fitnet", "student_tap": ("stage1", "stage2"), "teacher_tap": ("stage1", "stage2")},
     r"terms\[0\]\.student_tap: loss 'fitnet' compares one tap, got \['stage1', 'stage2'\]"),
    ({"name": "fitnet", "connector": "mlp"}, r"terms\[0\]\.connector: unknown connector 'mlp'"),
    ({"name": "at", "connector": "conv1x1_bn"}, r"terms\[0\]\.connector: 'conv1x1_bn' maps one tap, but loss 'at'"),
    # FitNet's default 1x1-conv connector on [B, D] vectors: a clear error, not a conv shape traceback
    ({"name": "fitnet", "student_tap": "hidden1", "teacher_tap": "logits"},
     r"terms\[0\]\.connector: 'conv1x1_bn' maps feature maps \[B, H, W, C\], but student tap hidden1"),
    # found by a new-user audit: these were tracebacks or silently ignored
    ({"name": "crd", "embed_dim": 0}, r"terms\[0\]\.embed_dim: expected an int >= 1, got 0"),
    ({"name": "crd", "num_negatives": -3}, r"terms\[0\]\.num_negatives: expected an int >= 1, got -3"),
    ({"name": "crd", "embed_dim": 8.7}, r"terms\[0\]\.embed_dim: expected an int >= 1, got 8.7"),
    ({"name": "crd", "memory_momentum": 1.5}, r"terms\[0\]\.memory_momentum: expected a number in \[0, 1\)"),
    ({"name": "kd", "embed_dim": 64}, r"terms\[0\]: embed_dim only apply to a 'crd' term, not 'kd'"),
    ({"name": "crd", "connector": "linear"}, r"terms\[0\]\.connector: loss 'crd' embeds both sides"),
    ({"name": "trilateral", "connector": "linear"}, r"terms\[0\]\.connector: loss 'trilateral' compares logits"),
    ({"name": "kd", "student_tap": {"a": 1}}, r"terms\[0\]\.student_tap: expected a tap name like 'logits'"),
    ({"name": "kd", "student_tap": [["logits"]]}, r"terms\[0\]\.student_tap: expected a tap name"),
    ({"name": "reviewkd", "pool_sizes": (4, "a")}, r"hparam 'pool_sizes': got \(4, 'a'\); expected a non-empty list "
                                                   r"of ints > 0"),
    ({"name": "reviewkd", "pool_sizes": (0,)}, r"hparam 'pool_sizes': got \(0,\); expected a non-empty list"),
    ({"name": "kd", "warmup_steps": 100}, r"terms\[0\]\.warmup_steps: 100 is more than total_steps"),
    ({"name": "kd", "warmup_shape": "cosine"}, r"terms\[0\]\.warmup_shape: 'cosine' is not one of linear, sigmoid"),
    ({"name": "kd", "weight_schedule": "cosine"}, r"terms\[0\]\.weight_schedule: expected a dict like"),
    ({"name": "kd", "weight_schedule": {"name": "cosin"}},
     r"'distill.terms\[0\]\.weight_schedule.name': 'cosin' is not one of constant, cosine, step, linear"),
    ({"name": "kd", "weight_schedule": {"name": "cosine", "warmup_steps": 2}},
     r"weight_schedule: unknown key 'warmup_steps'; expected name, end_factor, boundaries, decay_factor"),
    ({"name": "kd", "weight_schedule": {"name": "linear", "end_factor": "x"}},
     r"terms\[0\]\.weight_schedule\.end_factor: expected float, got 'x'"),
    ({"name": "kd", "weight_schedule": {"name": "step", "boundaries": (12,)}},
     r"weight_schedule.boundaries': step 12 is not before total_steps 12"),
    ({"name": "kd", "weight_schedule": {"name": "linear", "end_factor": True}},
     r"terms\[0\]\.weight_schedule\.end_factor: expected float, got True"),
    ({"name": "kd", "weight_schedule": {"name": "step", "decay_factor": 0}},
     r"weight_schedule.decay_factor' must be > 0"),
])
def test_bad_term_values_are_one_clear_config_error(tmp_path, term, message):
    with pytest.raises(ConfigError, match=message):
        Trainer(kd_config("random", terms=(term,)), str(tmp_path / "kd"))


def test_term_weights_follow_their_warmup_and_schedule(tmp_path):
    """Per-term weight schedules: a linear or sigmoid (mean teacher's, arXiv:1610.02242) warm-up, then the
    `schedule` section's decays; each scheduled weight is logged, and the loss is CE + sum of weight x term."""
    terms = ({"name": "kd", "weight": 2.0, "warmup_steps": 4,
              "weight_schedule": {"name": "cosine", "end_factor": 0.25}},
             {"name": "kd", "temperature": 1.0, "warmup_steps": 4, "warmup_shape": "sigmoid"},
             {"name": "kd", "weight_schedule": {"name": "step", "boundaries": (0.5,), "decay_factor": 0.1}},
             {"name": "kd", "weight": 0.5})
    trainer = Trainer(kd_config("random", terms=terms), str(tmp_path / "kd"))  # 12 steps
    frozen = trainer.task.load_frozen(trainer.mesh, trainer.abstract_images)
    trainer.compile(frozen)
    state, it = trainer.init_state(), trainer.train_iterator()
    for step in range(12):
        state, metrics = trainer.jit_train_step(state, frozen, parallel.global_batch(trainer.mesh, next(it)))
        metrics = jax.device_get(metrics)
        ramp = min(1.0, step / 4)
        cosine = 1.0 if step < 4 else 0.25 + 0.75 * 0.5 * (1 + np.cos(np.pi * (step - 4) / 8))
        expected = [2.0 * ramp * cosine, np.exp(-5 * (1 - ramp) ** 2), 1.0 if step < 6 else 0.1]
        for i, weight in enumerate(expected):
            assert metrics[f"weight/term{i}_kd"] == pytest.approx(weight, rel=1e-5, abs=1e-7), (step, i)
        assert "weight/term3_kd" not in metrics  # a constant weight is not logged
        values = [metrics[f"loss/term{i}_kd"] for i in range(4)]
        total = 0.1 * metrics["loss/ce"] + sum(w * v for w, v in zip(expected + [0.5], values))
        assert metrics["loss/total"] == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize("term, message", [
    # a vector tap through 'linear' stays a vector: not comparable with a feature map
    ({"name": "fitnet", "student_tap": "hidden1", "teacher_tap": "stage1", "connector": "linear"},
     r"terms\[0\]\.connector: 'linear' maps student tap hidden1 .* to \(2, 16\), not to the teacher tap's rank"),
    # TRG's token graph on pooled vectors: was an einsum traceback
    ({"name": "trg", "student_tap": "features", "teacher_tap": "features"},
     r"terms\[0\]: loss 'trg': the student tap \(32, 64\) is neither tokens \[B, N, D\] nor a feature map"),
    # a loss's own shape check, found while tracing the step, names the term
    ({"name": "fitnet", "student_tap": "features", "teacher_tap": "features", "connector": "linear"}, None),
])
def test_taps_of_different_kinds_are_one_clear_config_error(tmp_path, term, message):
    """Student MLP (vectors) against a ResNet-8 teacher (feature maps, then pooled features)."""
    config = kd_config("random", terms=(term,))
    config.teacher.name, config.teacher.kwargs = "resnet8", {}
    if message is None:  # linear from 32 to the ResNet's 64 pooled features: a valid FitNet on vectors
        train_and_evaluate(config, str(tmp_path / "ok"))
        return
    with pytest.raises(ConfigError, match=message):  # as a study checks its arms before training any
        check_config(config)


@pytest.mark.parametrize("distill, extra, message", [
    ({"terms": ({"name": "dkd"},)}, (), r"'augment.mixup_alpha': distill.terms\[0\] \('dkd'\) reads each image's "
                                        r"class label"),
    ({"terms": ({"name": "kd"},), "teacher_combination": "adaptive"}, ({"name": "mlp", "checkpoint": "random"},),
     r"'augment.mixup_alpha': distill.teacher_combination='adaptive' reads each image's class label"),
])
def test_label_reading_methods_refuse_mixup(tmp_path, distill, extra, message):
    def config(mixup):
        return config_lib.from_dict(base(task="kd", model={"name": "mlp", "kwargs": {"hidden_sizes": (32,)}},
                                         teacher={**TEACHER, "checkpoint": "random"}, extra_teachers=extra,
                                         distill=distill, augment={"mixup_alpha": mixup}))
    with pytest.raises(ConfigError, match=message):
        Trainer(config(0.4), str(tmp_path / "kd"))
    Trainer(config(0.0), str(tmp_path / "kd2"))  # the same without mixing is fine


@pytest.mark.parametrize("combination", ["adaptive", "partition"])
def test_a_combination_of_teachers_needs_several(tmp_path, combination):
    config = kd_config("random")
    config.distill.teacher_combination = combination
    with pytest.raises(ConfigError, match=rf"'distill.teacher_combination': '{combination}' weighs several "
                                          "teachers against each other, but this run has one"):
        Trainer(config, str(tmp_path / "kd"))


def test_bad_override_value_names_the_key():
    config = kd_config("random")
    with pytest.raises(ConfigError, match=r"config key 'distill.terms': expected tuple, got .*\(not a valid Python literal\)"):
        config_lib.apply_override(config, "distill.terms", "[{'name': 'kd'}")


def test_a_teacher_trained_on_another_dataset_is_noted(tmp_path, teacher_dir, capfd):
    other = str(tmp_path / "teacher")
    shutil.copytree(teacher_dir, other)
    with open(os.path.join(other, "config.json")) as f:
        saved = json.load(f)
    saved["dataset"]["name"] = "mnist5k"  # as if trained on MNIST (same classes: accepted, but said)
    with open(os.path.join(other, "config.json"), "w") as f:
        json.dump(saved, f)
    for teacher, noted in ((teacher_dir, False), (other, True)):
        trainer = Trainer(kd_config(teacher), str(tmp_path / "kd"))
        capfd.readouterr()
        trainer.task.load_frozen(trainer.mesh, trainer.abstract_images)
        note = f"[note] teacher.checkpoint: {other} was trained on 'mnist5k', this run is on 'digits'"
        assert (note in capfd.readouterr().err) == noted


def test_a_teacher_trained_on_this_runs_test_examples_is_noted(tmp_path, teacher_dir, capfd):
    """The student's test accuracy is partly on examples its teacher learned from: said when the run starts."""
    leaky = str(tmp_path / "teacher")
    shutil.copytree(teacher_dir, leaky)
    with open(os.path.join(leaky, "config.json")) as f:
        saved = json.load(f)
    saved["dataset"]["train_split"] = "train+test[:10]"
    with open(os.path.join(leaky, "config.json"), "w") as f:
        json.dump(saved, f)
    trainer = Trainer(kd_config(leaky), str(tmp_path / "kd"))
    capfd.readouterr()
    trainer.task.load_frozen(trainer.mesh, trainer.abstract_images)
    err = capfd.readouterr().err
    assert (f"[note] teacher.checkpoint: {leaky} was trained on 'train+test[:10]', which shares 10 examples with "
            "this run's dataset.test_split 'test'") in err
    assert "eval_split" not in err  # validation is disjoint from it


def test_missing_teacher_checkpoint_is_a_clear_error(tmp_path):
    trainer = Trainer(kd_config(str(tmp_path / "nowhere")), str(tmp_path / "kd"))
    with pytest.raises(UserError, match="teacher.checkpoint"):
        trainer.task.load_frozen(trainer.mesh, trainer.abstract_images)


def test_damaged_teacher_results_is_a_clear_error(tmp_path, teacher_dir):
    damaged = str(tmp_path / "teacher")
    shutil.copytree(teacher_dir, damaged)
    with open(os.path.join(damaged, "results.json"), "w") as f:
        f.write("{bad")
    trainer = Trainer(kd_config(damaged), str(tmp_path / "kd"))
    with pytest.raises(ConfigError, match=r"results.json: unreadable \(JSONDecodeError\), so the step that run "
                                          r"selected is unknown; rerun that run's command"):
        trainer.task.load_frozen(trainer.mesh, trainer.abstract_images)
    with open(os.path.join(teacher_dir, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(damaged, "results.json"), "w") as f:  # its selected checkpoint deleted
        json.dump({**results, "selected_step": 7}, f)
    with pytest.raises(ConfigError, match=r"that run selected step 7, but .*/checkpoints/7 is gone"):
        trainer.task.load_frozen(trainer.mesh, trainer.abstract_images)


def test_results_name_a_relative_teacher_path_absolutely(tmp_path, teacher_dir, monkeypatch):
    """`teachers` in results.json must say which run taught, wherever the results are read from."""
    monkeypatch.chdir(os.path.dirname(teacher_dir))
    results = train_and_evaluate(kd_config(os.path.basename(teacher_dir), total_steps=2, eval_every_steps=0),
                                 str(tmp_path / "kd"))
    assert list(results["teachers"]) == [teacher_dir]


def test_an_unfinished_teacher_is_noted_and_pinned_for_the_whole_run(tmp_path, capfd):
    """A teacher run without results.json is used from its latest checkpoint (with a note); if it finishes
    (or trains further) before a killed KD run resumes, the resume is refused rather than swapping teachers."""
    teacher = str(tmp_path / "teacher")
    train_and_evaluate(config_lib.from_dict(base(model=TEACHER, total_steps=10, checkpoint_every_steps=5)), teacher)
    aside = tmp_path / "aside"
    aside.mkdir()
    for name in ("results.json", "checkpoints/10"):  # as if the teacher were still at step 5
        shutil.move(os.path.join(teacher, name), aside / os.path.basename(name))
    capfd.readouterr()
    kd_dir = str(tmp_path / "kd")
    results = train_and_evaluate(kd_config(teacher, total_steps=4, checkpoint_every_steps=2), kd_dir)
    assert results["teachers"] == {teacher: 5}
    assert f"teacher.checkpoint: {teacher} has not finished (no results.json); using its latest checkpoint, " \
           "step 5" in capfd.readouterr().err
    os.remove(os.path.join(kd_dir, "results.json"))  # the KD run killed after its step-2 checkpoint
    shutil.rmtree(os.path.join(kd_dir, "checkpoints", "4"))
    shutil.move(aside / "10", os.path.join(teacher, "checkpoints", "10"))  # ... and the teacher finished meanwhile
    shutil.move(aside / "results.json", os.path.join(teacher, "results.json"))
    with pytest.raises(UserError, match=r"this run started from step 5 of teacher .*, which now gives step 10"):
        train_and_evaluate(kd_config(teacher, total_steps=4, checkpoint_every_steps=2), kd_dir)


def test_train_step_does_not_retrace(tmp_path, teacher_dir):
    trainer = Trainer(kd_config(teacher_dir), str(tmp_path / "kd"))
    frozen = trainer.task.load_frozen(trainer.mesh, trainer.abstract_images)
    traced = chex.assert_max_traces(trainer.train_step, n=1)
    step = jax.jit(traced, donate_argnums=(0,))
    state = trainer.init_state()
    it = trainer.train_iterator()
    for _ in range(3):
        state, _ = step(state, frozen, parallel.global_batch(trainer.mesh, next(it)))


@pytest.mark.parametrize("combination", ["average", "weighted", "adaptive"])
def test_multi_teacher_combinations(tmp_path, teacher_dir, combination):
    cfg = config_lib.from_dict(base(
        task="kd", model={"name": "mlp", "kwargs": {"hidden_sizes": (32,)}},
        teacher={**TEACHER, "checkpoint": teacher_dir},
        extra_teachers=({"name": "mlp", "kwargs": {"hidden_sizes": (64, 64)}, "checkpoint": "random"},),
        distill={"ce_weight": 0.1, "teacher_combination": combination,
                 "teacher_weights": (3.0, 1.0) if combination == "weighted" else (),
                 "terms": ({"name": "kd", "weight": 0.9},
                           {"name": "rkd", "weight": 1.0, "teacher": 1})}))
    trainer = Trainer(cfg, str(tmp_path / "kd"))
    frozen = trainer.task.load_frozen(trainer.mesh, trainer.abstract_images)
    assert len(frozen["teachers"]) == 2
    logits = [jnp.asarray(np.random.RandomState(i).randn(4, 10), jnp.float32) for i in range(2)]
    labels = jnp.asarray([0, 1, 2, 3])
    combined = trainer.task.combined_logits([{"logits": x} for x in logits], labels)
    if combination == "average":
        np.testing.assert_allclose(combined, (logits[0] + logits[1]) / 2, rtol=1e-6)
    elif combination == "weighted":
        np.testing.assert_allclose(combined, 0.75 * logits[0] + 0.25 * logits[1], rtol=1e-6)
    else:
        ce = [-jax.nn.log_softmax(x)[jnp.arange(4), labels] for x in logits]
        w0 = np.exp(-ce[0]) / (np.exp(-ce[0]) + np.exp(-ce[1]))
        np.testing.assert_allclose(combined, w0[:, None] * logits[0] + (1 - w0[:, None]) * logits[1], rtol=1e-5)
    results = train_and_evaluate(cfg, str(tmp_path / "run"))
    assert np.isfinite(results["test"]["loss"])


def test_crd_keeps_and_updates_its_memory_bank(tmp_path, teacher_dir):
    terms = ({"name": "kd", "weight": 0.9}, {"name": "crd", "weight": 0.8, "embed_dim": 16, "num_negatives": 64})
    trainer = Trainer(kd_config(teacher_dir, terms=terms), str(tmp_path / "kd"))
    frozen = trainer.task.load_frozen(trainer.mesh, trainer.abstract_images)
    trainer.compile(frozen)
    state = trainer.init_state()
    memory = state["model_state"]["memory"]["term1"]
    assert memory["student"].shape == (trainer.info.split_sizes["train"], 16)
    assert "term1_teacher" in state["params"]["connectors"]  # the trainable teacher-side embedding head
    before = jax.device_get(memory)
    batch = next(trainer.train_iterator())
    state, metrics = trainer.jit_train_step(state, frozen, parallel.global_batch(trainer.mesh, batch))
    after = jax.device_get(state["model_state"]["memory"]["term1"])
    touched = np.asarray(batch["index"])
    assert not np.allclose(after["student"][touched], before["student"][touched])
    untouched = np.setdiff1d(np.arange(len(after["student"])), touched)
    np.testing.assert_array_equal(after["student"][untouched], before["student"][untouched])
    np.testing.assert_allclose(np.linalg.norm(after["teacher"][touched], axis=-1), 1.0, rtol=1e-5)
    assert (after["z"] > 0).all() and np.isfinite(float(metrics["loss/term1_crd"]))
    state, _ = trainer.jit_train_step(state, frozen, parallel.global_batch(trainer.mesh, batch))
    np.testing.assert_array_equal(jax.device_get(state["model_state"]["memory"]["term1"]["z"]), after["z"])


def test_crd_says_when_it_clips_num_negatives(tmp_path, teacher_dir, capfd):
    """CRD's default 16,384 negatives exceed digits' 1,256 other train examples: clipped, and said so."""
    for negatives, noted in ((64, False), (16384, True)):
        terms = ({"name": "crd", "weight": 0.8, "embed_dim": 16, "num_negatives": negatives},)
        trainer = Trainer(kd_config(teacher_dir, terms=terms), str(tmp_path / "kd"))
        capfd.readouterr()
        trainer.task.load_frozen(trainer.mesh, trainer.abstract_images)
        note = ("[note] distill.terms[0]: num_negatives 16384 is more than the 1256 other train examples; "
                "using 1256")
        assert (note in capfd.readouterr().err) == noted


def test_trilateral_ratio_network_learns_by_lookahead(tmp_path, teacher_dir):
    # Every gradient here in float32 products: on GPUs XLA's default is TF32, which rounds each formulation
    # differently (0.2-0.3% apart on an H200).
    with jax.default_matmul_precision("float32"):
        _check_trilateral_lookahead(tmp_path, teacher_dir)


def _check_trilateral_lookahead(tmp_path, teacher_dir):
    trainer, state, frozen, batch, _, _ = _loss_setup(tmp_path, teacher_dir, ({"name": "trilateral", "weight": 1.0},))
    grads, (_, metrics) = jax.jit(jax.grad(trainer.task.loss_fn, has_aux=True))(
        state["params"], state["model_state"], frozen, batch, None, jnp.int32(0))
    ratio_grad = grads["connectors"]["term0_ratio"]
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(ratio_grad))
    assert "loss/term0_ratio_lookahead_ce" in metrics
    # the student's gradient is that of the fused loss with the ratio held fixed (the look-ahead doesn't reach it)
    from transferlab import losses
    from transferlab.losses import logit
    task = trainer.task
    t_logits = task.teacher_outputs(frozen["teachers"], batch["image"])[0]["logits"]
    s0 = task.model.apply({"params": state["params"]["model"]}, batch["image"], train=True)
    feats = logit.trilateral_features(s0, t_logits, batch["label"], temperature=4.0)
    ratio = task.ratio_net.apply({"params": state["params"]["connectors"]["term0_ratio"]}, feats)

    def fused(theta):
        s = task.model.apply({"params": theta}, batch["image"], train=True)
        return losses.get("trilateral").fn(s, t_logits, {**batch, "fusion_ratio": ratio}, temperature=4.0)

    expected = jax.jit(jax.grad(fused))(state["params"]["model"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads["model"], expected)

    # The ratio network's gradient is that of the bilevel outer objective with a held-out half (the default
    # distill.trilateral_outer): a virtual SGD step on the even-position examples, scored by the
    # cross-entropy on the odd-position ones.
    assert trainer.config.distill.trilateral_outer == "held_out_half"
    n = batch["image"].shape[0] // 2
    inner_ex, outer_ex = slice(0, 2 * n, 2), slice(1, 2 * n, 2)
    lr = trainer.config.distill.trilateral_lookahead_lr

    def outer(phi):
        def inner(theta):
            s = task.model.apply({"params": theta}, batch["image"][inner_ex], train=True)
            f = logit.trilateral_features(s, t_logits[inner_ex], batch["label"][inner_ex], temperature=4.0)
            r = task.ratio_net.apply({"params": phi}, f)
            return losses.get("trilateral").fn(s, t_logits[inner_ex], {"label": batch["label"][inner_ex],
                                                                        "fusion_ratio": r}, temperature=4.0)
        theta = state["params"]["model"]
        ahead = jax.tree.map(lambda w, g: w - lr * g, theta, jax.grad(inner)(theta))
        held_out = task.model.apply({"params": ahead}, batch["image"][outer_ex], train=True)
        return -jnp.mean(jnp.sum(jax.nn.one_hot(batch["label"][outer_ex], held_out.shape[-1])
                                 * jax.nn.log_softmax(held_out), -1))

    expected_ratio = jax.jit(jax.grad(outer))(state["params"]["connectors"]["term0_ratio"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), ratio_grad, expected_ratio)
    results = train_and_evaluate(trainer.config, str(tmp_path / "run"))
    assert np.isfinite(results["test"]["loss"])


def test_after_is_bitwise_the_identity():
    """kd._after orders the student's forward after the teacher's; the value must not change at all."""
    from transferlab.tasks.kd import _after
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 5, 5, 3)).astype(np.float32) * 1e30
    x[0, 0, 0, :] = [-0.0, 0.0, 1e-30]  # (subnormals are flushed to zero, as by any XLA:CPU arithmetic)
    ys = [jnp.asarray(rng.standard_normal((4, 10)) * 50, jnp.float32), jnp.asarray(-rng.random((4, 10)), jnp.float32)]
    out = np.asarray(jax.jit(_after)(jnp.asarray(x), ys))
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_array_equal(out.view(np.uint32), x.view(np.uint32))


def test_abstract_state_is_the_traced_init_state(tmp_path, teacher_dir):
    """Trainer builds `abstract_state` without a second init trace: it must equal eval_shape(_init_state)."""
    terms = ({"name": "kd", "weight": 0.9}, {"name": "crd", "weight": 0.8, "embed_dim": 16, "num_negatives": 64},
             {"name": "fitnet", "weight": 1.0, "student_tap": "features", "teacher_tap": "features",
              "connector": "linear"})
    trainer = Trainer(kd_config(teacher_dir, terms=terms), str(tmp_path / "kd"))
    traced = jax.eval_shape(trainer._init_state, jnp.uint32(0))
    assert jax.tree.structure(traced) == jax.tree.structure(trainer.abstract_state)
    chex.assert_trees_all_equal_shapes_and_dtypes(traced, trainer.abstract_state)
    assert set(trainer.abstract_state["params"]["connectors"]) and trainer.abstract_state["model_state"]["memory"]


def test_random_teacher_variables_are_he_normal_and_seeded():
    from transferlab.tasks.kd import random_variables
    abstract = {"params": {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 64, 128), jnp.float32)},
                           "bn": {"scale": jax.ShapeDtypeStruct((128,), jnp.float32),
                                  "bias": jax.ShapeDtypeStruct((128,), jnp.float32)}},
                "model_state": {"batch_stats": {"bn": {"mean": jax.ShapeDtypeStruct((128,), jnp.float32),
                                                       "var": jax.ShapeDtypeStruct((128,), jnp.float32)}}}}
    v = random_variables(abstract, seed=3)
    kernel = v["params"]["conv"]["kernel"]
    assert kernel.shape == (3, 3, 64, 128) and kernel.dtype == np.float32
    np.testing.assert_allclose(kernel.std(), np.sqrt(2 / (3 * 3 * 64)), rtol=0.02)
    assert (v["params"]["bn"]["scale"] == 1).all() and (v["params"]["bn"]["bias"] == 0).all()
    assert (v["model_state"]["batch_stats"]["bn"]["var"] == 1).all()
    assert (v["model_state"]["batch_stats"]["bn"]["mean"] == 0).all()
    np.testing.assert_array_equal(kernel, random_variables(abstract, seed=3)["params"]["conv"]["kernel"])
    assert not np.array_equal(kernel, random_variables(abstract, seed=4)["params"]["conv"]["kernel"])


def test_train_accuracy_under_mixup_weights_both_labels():
    """Under mixup/cutmix a prediction of the first image's class scores lam, of the second's 1 - lam."""
    from transferlab.tasks.common import train_accuracy
    logits = jnp.asarray([[5.0, 1.0, 0.0], [0.0, 5.0, 1.0], [0.0, 1.0, 5.0]])
    labels = jnp.asarray([0, 0, 0])
    soft = jnp.asarray([[0.7, 0.3, 0.0], [0.7, 0.3, 0.0], [0.7, 0.3, 0.0]])
    assert float(train_accuracy(logits, labels)) == pytest.approx(1 / 3)
    assert float(train_accuracy(logits, labels, soft)) == pytest.approx((0.7 + 0.3 + 0.0) / 3)


def test_a_teacher_checkpoint_of_another_architecture_is_one_line_naming_what_it_trained(tmp_path, teacher_dir):
    config = kd_config(teacher_dir)
    config.teacher.kwargs = {"hidden_sizes": (64,)}  # the run in teacher_dir trained hidden_sizes (128,)
    trainer = Trainer(config, str(tmp_path / "kd"))
    with pytest.raises(UserError) as e:
        trainer.task.load_frozen(trainer.mesh, trainer.abstract_images)
    message = str(e.value)
    assert message.startswith(f"teacher.checkpoint: checkpoint {teacher_dir}/checkpoints/30: its ")
    assert message.endswith("do not match the configured model (different architecture, number of classes or "
                            "input size?); that run trained mlp {'hidden_sizes': [128]} on digits")
    assert "\n" not in message


def test_a_run_whose_teachers_read_the_data_traces_its_step_first(tmp_path, teacher_dir, monkeypatch):
    """ND's train-split class means (or a teacher cache) take a pass over the data before training: a loss
    of the wrong kind is found before that pass, not after it."""
    terms = ({"name": "nd", "student_tap": "features", "teacher_tap": "features", "connector": "linear"},
             {"name": "trg", "student_tap": "features", "teacher_tap": "features"})
    trainer = Trainer(kd_config(teacher_dir, terms=terms), str(tmp_path / "kd"))
    assert trainer.task.frozen_reads_data
    monkeypatch.setattr(trainer.task, "load_frozen", lambda *a: pytest.fail("read the data first"))
    with pytest.raises(ConfigError, match=r"distill.terms\[1\]: loss 'trg': the student tap"):
        trainer.run()
    assert not Trainer(kd_config(teacher_dir), str(tmp_path / "plain")).task.frozen_reads_data


def test_a_study_directory_given_as_the_teacher_lists_the_runs_under_it(tmp_path):
    study_dir = tmp_path / "study"
    for arm in ("teacher", "student"):
        (study_dir / arm / "seed_0" / "checkpoints").mkdir(parents=True)
    trainer = Trainer(kd_config(str(study_dir)), str(tmp_path / "kd"))
    with pytest.raises(UserError, match=r"teacher.checkpoint: no checkpoints in .*study' \(expected .*\); runs "
                                        r"under it: student/seed_0, teacher/seed_0$"):
        trainer.task.load_frozen(trainer.mesh, trainer.abstract_images)

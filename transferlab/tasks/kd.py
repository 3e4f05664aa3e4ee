"""Knowledge distillation from a frozen teacher (Hinton et al., arXiv:1503.02531, and the
loss terms of `transferlab.losses`).

The teacher's variables are passed into the jitted step as an argument outside
the optimizer state, under `stop_gradient`; its forward runs in the same
compiled step as the student's. The loss is
`ce_weight * CE(student, labels) + sum_i weight_i(step) * term_i(taps)`, where
each term is `{name, weight, student_tap, teacher_tap, connector, warmup_steps,
**hparams}` from `config.distill.terms`. A term whose student tap needs mapping
to the teacher's shape gets a trainable connector (params under
`params['connectors']['term<i>']`), student-side and dropped at export.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

from transferlab import losses
from transferlab.config import TERM_KEYS
from transferlab.errors import ConfigError, UserError
from transferlab.tasks import common

RANDOM_TEACHER = "random"  # teacher.checkpoint value for smoke tests and benchmarks only


class Term:
    """One resolved loss term of `config.distill.terms`."""

    def __init__(self, index: int, raw: dict):
        raw = dict(raw)
        self.key = f"term{index}"
        self.where = f"distill.terms[{index}]"
        self.name = raw["name"]
        self.spec = losses.get(self.name)
        self.weight = float(raw.get("weight", 1.0))
        self.warmup_steps = int(raw.get("warmup_steps", 0))
        default_s, default_t = self.spec.default_taps
        self.student_tap = raw.get("student_tap", default_s)
        self.teacher_tap = raw.get("teacher_tap", default_t)
        self.connector = raw.get("connector", self.spec.connector)
        self.hparams = losses.resolve_hparams(self.name, {k: v for k, v in raw.items() if k not in TERM_KEYS})

    def taps(self, which: str):
        names = self.student_tap if which == "student" else self.teacher_tap
        return list(names) if isinstance(names, (list, tuple)) else [names]

    def weight_at(self, step):
        if not self.warmup_steps:
            return self.weight
        return self.weight * jnp.minimum(1.0, step.astype(jnp.float32) / self.warmup_steps)


class KDTask:
    """Student trained with CE + distillation terms against a frozen teacher."""

    def __init__(self, config, num_classes: int):
        self.config = config
        self.num_classes = num_classes
        self.model = common.build_model(config.model, num_classes)
        self.teacher = common.build_model(config.teacher, num_classes)
        self.terms = [Term(i, t) for i, t in enumerate(config.distill.terms)]
        self.needs_taps = any(t.taps("student") != ["logits"] or t.taps("teacher") != ["logits"]
                              for t in self.terms)
        self.connectors = {}
        if not config.teacher.checkpoint:
            raise ConfigError("config key 'teacher.checkpoint': required for task 'kd' (a trained run's "
                              f"workdir, or {RANDOM_TEACHER!r} for an untrained teacher in smoke tests)")

    # ------------------------------------------------------------------ init

    def _tap_shapes(self, model, images):
        def run(x):
            variables = model.init({"params": jax.random.key(0)}, x, train=False)
            _, _, taps = common.forward(model, variables["params"],
                                        {k: v for k, v in variables.items() if k not in ("params", "intermediates")},
                                        x, train=False, taps=True)
            return taps
        return jax.eval_shape(run, images)

    def _check_taps(self, term, which, shapes):
        for tap in term.taps(which):
            if tap not in shapes:
                raise ConfigError(f"{term.where}.{which}_tap: {tap!r} is not a tap of the {which} "
                                  f"({self.config.model.name if which == 'student' else self.config.teacher.name});"
                                  f" available: {', '.join(sorted(shapes))}")

    def init_params(self, rng, images):
        student_rng, connector_rng = jax.random.split(rng)
        params, model_state = common.init_model(self.model, student_rng, images)
        all_params, all_state = {"model": params, "connectors": {}}, {"model": model_state, "connectors": {}}
        if not self.terms:
            return all_params, all_state
        s_shapes, t_shapes = self._tap_shapes(self.model, images), self._tap_shapes(self.teacher, images)
        for term in self.terms:
            self._check_taps(term, "student", s_shapes)
            self._check_taps(term, "teacher", t_shapes)
            s_list = [s_shapes[t].shape for t in term.taps("student")]
            t_list = [t_shapes[t].shape for t in term.taps("teacher")]
            use_connector = bool(term.connector) and term.connector != "none"
            if term.spec.connector and not use_connector and s_list != t_list:
                raise ConfigError(f"{term.where}: student tap {term.student_tap} {s_list} and teacher tap "
                                  f"{term.teacher_tap} {t_list} differ in shape and 'connector' is 'none' "
                                  f"(default for {term.name!r}: {term.spec.connector!r})")
            if use_connector:
                module = losses.connectors.create_connector(term.connector, t_list if term.spec.multi_tap
                                                            else t_list[0])
                self.connectors[term.key] = module
                dummy = [jnp.zeros(s, jnp.float32) for s in s_list]
                variables = dict(module.init({"params": jax.random.fold_in(connector_rng, len(self.connectors))},
                                             dummy if term.spec.multi_tap else dummy[0], train=False))
                all_params["connectors"][term.key] = variables.pop("params", {})
                all_state["connectors"][term.key] = variables
        return all_params, all_state

    def load_frozen(self, mesh, abstract_images):
        """Teacher variables restored read-only (replicated on `mesh`) from `teacher.checkpoint`."""
        from transferlab.checkpoint import Checkpointer, abstract_with_shardings
        from transferlab.parallel import replicated
        params, state = jax.eval_shape(lambda x: common.init_model(self.teacher, jax.random.key(0), x),
                                       abstract_images)
        target = {"params": {"model": params}, "model_state": {"model": state}}
        shardings = jax.tree.map(lambda _: replicated(mesh), target)
        if self.config.teacher.checkpoint == RANDOM_TEACHER:
            init = jax.jit(lambda x: common.init_model(self.teacher, jax.random.key(self.config.seed + 1), x),
                           out_shardings=(shardings["params"]["model"], shardings["model_state"]["model"]))
            params, state = init(jnp.zeros(abstract_images.shape, abstract_images.dtype))
            return {"params": params, "model_state": state}
        workdir = self.config.teacher.checkpoint
        ckpt_dir = os.path.join(workdir, "checkpoints")
        if not os.path.isdir(ckpt_dir):
            raise UserError(f"teacher.checkpoint: no checkpoints in {workdir!r} (expected {ckpt_dir})")
        ckpt = Checkpointer(workdir, read_only=True)
        step = selected_step(workdir, ckpt)
        if step is None:
            raise UserError(f"teacher.checkpoint: {ckpt_dir} holds no complete checkpoint")
        restored = ckpt.restore_subtree(step, abstract_with_shardings(target, shardings))
        ckpt.close()
        return {"params": restored["params"]["model"], "model_state": restored["model_state"]["model"]}

    # ------------------------------------------------------------------ steps

    def loss_fn(self, params, model_state, frozen, batch, rng, step):
        del rng
        teacher = jax.lax.stop_gradient(frozen)
        t_logits, _, t_taps = common.forward(self.teacher, teacher["params"], teacher["model_state"],
                                             batch["image"], train=False, taps=self.needs_taps)
        t_logits = jax.lax.stop_gradient(t_logits)
        t_taps = jax.lax.stop_gradient(t_taps)
        s_logits, new_model_state, s_taps = common.forward(
            self.model, params["model"], model_state["model"], batch["image"], train=True, taps=self.needs_taps)
        s_taps, t_taps = {**s_taps, "logits": s_logits}, {**t_taps, "logits": t_logits}
        new_state = {"model": new_model_state, "connectors": dict(model_state["connectors"])}
        ce = common.cross_entropy(s_logits, common.targets(batch, self.num_classes))
        total = self.config.distill.ce_weight * ce
        metrics = {"loss/ce": ce, "accuracy": common.train_accuracy(s_logits, batch["label"]),
                   "teacher_agreement": common.train_accuracy(s_logits, jnp.argmax(t_logits, -1))}
        for term in self.terms:
            student = [s_taps[t] for t in term.taps("student")]
            teacher_in = [t_taps[t] for t in term.taps("teacher")]
            if term.key in self.connectors:
                student, new_state["connectors"][term.key] = self._connect(
                    term, params["connectors"][term.key], model_state["connectors"][term.key], student)
            if not term.spec.multi_tap:
                student, teacher_in = student[0], teacher_in[0]
            value = term.spec.fn(student, teacher_in, batch, **term.hparams)
            total = total + term.weight_at(step) * value
            metrics[f"loss/{term.key}_{term.name}"] = value
        metrics["loss/total"] = total
        return total, (new_state, metrics)

    def _connect(self, term, params, state, student):
        module = self.connectors[term.key]
        inputs = student if term.spec.multi_tap else student[0]
        mutable = ["batch_stats"] if "batch_stats" in state else False
        if mutable:
            out, updates = module.apply({"params": params, **state}, inputs, train=True, mutable=mutable)
            state = {**state, **updates}
        else:
            out = module.apply({"params": params, **state}, inputs, train=True)
        return (list(out) if term.spec.multi_tap else [out]), state

    def eval_fn(self, params, model_state, frozen, batch):
        logits, _, _ = common.forward(self.model, params["model"], model_state["model"], batch["image"], train=False)
        sums = common.classification_sums(logits, batch["label"], batch["mask"])
        t_logits, _, _ = common.forward(self.teacher, frozen["params"], frozen["model_state"], batch["image"],
                                        train=False)
        agree = (jnp.argmax(logits, -1) == jnp.argmax(t_logits, -1)).astype(jnp.float32)
        sums["teacher_agreement"] = jnp.sum(agree * batch["mask"].astype(jnp.float32))
        teacher_sums = common.classification_sums(t_logits, batch["label"], batch["mask"])
        sums["teacher_accuracy"] = teacher_sums["accuracy"]
        return sums


def selected_step(workdir: str, ckpt) -> int | None:
    """The step a finished run selected (results.json), else its latest checkpoint."""
    path = os.path.join(workdir, "results.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            step = json.load(f).get("selected_step")
        if step is not None and step in ckpt.manager.all_steps():
            return int(step)
    return ckpt.latest_step()

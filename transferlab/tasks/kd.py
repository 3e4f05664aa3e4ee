"""Knowledge distillation from frozen teachers (Hinton et al., arXiv:1503.02531, and the
loss terms of `transferlab.losses`).

The teachers' variables are passed into the jitted step as an argument outside
the optimizer state, under `stop_gradient`; their forwards run in the same
compiled step as the student's. The loss is
`ce_weight * CE(student, labels) + sum_i weight_i(step) * term_i(taps)`, where
each term is `{name, weight, student_tap, teacher_tap, connector, warmup_steps,
teacher, **hparams}` from `config.distill.terms`. A term whose student tap needs
mapping to the teacher's shape gets a trainable connector (params under
`params['connectors']['term<i>']`), student-side and dropped at export.

Multi-teacher: `extra_teachers` adds teachers (any architectures). A term with
`teacher: k` taps teacher k; otherwise a logits term gets the teachers' logits
combined by `distill.teacher_combination`: `average`, `weighted`
(`distill.teacher_weights`), `adaptive` (per-sample weights softmax over
teachers of -CE(teacher, label), the confidence-aware weighting of CA-MKD,
arXiv:2201.00007) or `partition` (per sample, the teacher most confident in the
true class: with the student's own pretrained checkpoint as the second teacher
and `init_checkpoint` set, this is the data-partition transfer between two
pretrained models of "Fantastic Gains and Where to Find Them", arXiv:2310.17653:
distil from the teacher where it is more confident, keep the student's own
knowledge elsewhere); other taps come from teacher 0.

Self-distillation: `teacher.checkpoint = 'self_ema'` makes the teacher an
exponential moving average of the student itself (decay `distill.ema_decay`,
kept in the model state and never differentiated; "mean teacher"
self-distillation, arXiv:1703.01780), updated from the pre-update weights of each
step.

Learned hard augmentations (`distill.hard_augment`, HARD arXiv:2305.14890, see
`hard_augment`): an affine augmentor trained in the same step to find warps on
which teacher and student disagree while the teacher's prediction stays; the
student trains on a batch whose `fraction` (default half) is warped. `loss/total` is the student's loss; the
augmentor's objective is logged as `loss/hard_augmentor_objective`.

Teacher-output caching (`distill.teacher_cache`, see `teacher_cache`): for
fixed inputs, or K replayable crop/flip views of each example
(`distill.teacher_cache_views`, drawn by `replay_augment`), the teachers'
train-split outputs (logits and the taps the terms read, `cached_taps`) are
computed once and looked up by example index (and view), so no teacher forward
runs in the step.

TGeo-KD (`trilateral`, arXiv:2312.15112) learns its per-sample fusion ratio with
a one-step look-ahead in the same step, scored on a held-out half of the batch
(see `_trilateral_term`).

ND (arXiv:2305.17007): a `nd` term's `class_means` is 'train' (default, the paper's:
the teacher's mean feature per class over the un-augmented train split, computed in
`load_frozen` by `class_means.teacher_class_means` and passed in `frozen`) or 'batch'
(in-batch means of the same-label samples).

CRD (arXiv:1910.10699) keeps its memory banks and normalizing constants in the
model state (`model_state['memory']['term<i>']`, not differentiated) and a
trainable teacher-side embedding head in `params['connectors']['term<i>_teacher']`.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from transferlab import config as config_lib, losses, optim
from transferlab.config import TERM_KEYS, model_section
from transferlab.data import augment
from transferlab.errors import ConfigError, first_line, note
from transferlab.losses import connectors as connector_lib
from transferlab.losses import logit as logit_losses
from transferlab.losses import relation
from transferlab.tasks import common, hard_augment

RANDOM_TEACHER = "random"  # teacher.checkpoint value for smoke tests and benchmarks only
COMBINATIONS = ("average", "weighted", "adaptive", "partition")
CONV_CONNECTORS = ("conv1x1_bn", "conv3x3")  # connectors that need NHWC feature maps on both sides
MULTI_TAP_CONNECTORS = ("abf",)  # connectors that map a list of taps (ReviewKD's attention-based fusion)
SELF_EMA = "self_ema"  # teacher.checkpoint value: the teacher is an EMA of the student (self-distillation)
CRD_DEFAULTS = {"embed_dim": 128, "num_negatives": 16384, "memory_momentum": 0.5}
# losses whose terms build their own trainable heads instead of a connector
OWN_HEADS = {"crd": "embeds both sides with its own heads (embed_dim)",
             "trilateral": "compares logits and trains its own fusion-ratio network"}
ND_CLASS_MEANS = ("train", "batch")  # nd term's class_means: teacher means over the train split, or in-batch


def _after(x, ys):
    """`x`, but computed only once every array in `ys` is (XLA:CPU only; elsewhere `x` itself).

    x + 0 * sum(ys) is bitwise x for finite ys (subnormal x flushed to zero, as XLA:CPU's own arithmetic
    does), and XLA may not simplify 0 * y for floats. Used to run
    the frozen teacher's forward before the student's instead of interleaving the two programs' ops on
    the same CPU threads, which measured ~3% faster KD steps on a 2-core CPU (bench/results_cpu.md).
    """
    if jax.default_backend() != "cpu":
        return x
    # per example (sums over the non-batch axes), so no cross-device reduction under data parallelism
    total = sum(jnp.sum(y.astype(jnp.float32), axis=tuple(range(1, y.ndim))) for y in ys)
    zero = (0.0 * jax.lax.stop_gradient(total)).astype(x.dtype)
    return x + zero.reshape(zero.shape + (1,) * (x.ndim - 1))


def random_variables(abstract, seed: int):
    """An untrained model's variables for `teacher.checkpoint='random'` (smoke tests and benchmarks only),
    drawn on the host: He-normal kernels (std sqrt(2 / fan_in), He et al. arXiv:1502.01852), unit BN
    scale and running variance, zero biases and running means. Host numpy rather than the model's own
    jitted `init`, which takes XLA:CPU ~15 s to compile for a resnet110 (one kernel per parameter)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name in ("scale", "var"):
            return np.ones(leaf.shape, leaf.dtype)
        if name == "kernel" and len(leaf.shape) >= 2:
            fan_in = math.prod(leaf.shape[:-1])
            return (rng.standard_normal(leaf.shape) * math.sqrt(2.0 / fan_in)).astype(leaf.dtype)
        if name in ("bias", "mean"):
            return np.zeros(leaf.shape, leaf.dtype)
        return (rng.standard_normal(leaf.shape) * 0.02).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _crd_settings(where: str, raw: dict) -> dict:
    """A crd term's embed_dim, num_negatives (positive ints) and memory_momentum (in [0, 1))."""
    out = {k: raw.get(k, v) for k, v in CRD_DEFAULTS.items()}
    for key in ("embed_dim", "num_negatives"):
        value = out[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ConfigError(f"{where}.{key}: expected an int >= 1, got {value!r}")
        out[key] = int(value)
    m = out["memory_momentum"]
    if isinstance(m, bool) or not isinstance(m, numbers.Real) or not 0.0 <= m < 1.0:
        raise ConfigError(f"{where}.memory_momentum: expected a number in [0, 1), got {m!r}")
    return out


WARMUP_SHAPES = ("linear", "sigmoid")


def _weight_decay_schedule(where: str, section, warmup_steps: int, total_steps: int):
    """A term's `weight_schedule` ({name, end_factor, boundaries, decay_factor}: the keys and meaning of the
    `schedule` section, over the same steps) as a multiplier of its weight: 1 until `warmup_steps`, then
    decaying as the learning rate would. None without one (a constant weight)."""
    if section is None:
        return None
    if not isinstance(section, (dict, ml_collections.ConfigDict)):
        raise ConfigError(f"{where}.weight_schedule: expected a dict like {{'name': 'cosine', 'end_factor': 0.1}}, "
                          f"got {section!r}")
    keys = ("name", "end_factor", "boundaries", "decay_factor")
    if unknown := sorted(set(dict(section)) - set(keys)):
        raise ConfigError(f"{where}.weight_schedule: unknown key {unknown[0]!r}; expected {', '.join(keys)} "
                          "(the warm-up is the term's warmup_steps)")
    full = config_lib.defaults().schedule
    for key, value in {"name": "constant", **dict(section), "warmup_steps": warmup_steps}.items():
        if isinstance(value, bool):  # (ConfigDict would store True as 1.0)
            raise ConfigError(f"{where}.weight_schedule.{key}: expected {type(full[key]).__name__}, got {value!r}")
        try:
            full[key] = tuple(value) if key == "boundaries" else value
        except (TypeError, ValueError):  # (ConfigDict keeps each key's type: a number, a string, a list)
            raise ConfigError(f"{where}.weight_schedule.{key}: expected {type(full[key]).__name__}, got "
                              f"{value!r}") from None
    config_lib.check_schedule(f"{where}.weight_schedule", full, total_steps)
    if full.name == "constant":
        return None
    peak_one = optim.schedule_from(full, 1.0, total_steps)
    return lambda step: jnp.where(step < warmup_steps, 1.0, peak_one(step))


class Term:
    """One resolved loss term of `config.distill.terms`."""

    def __init__(self, index: int, raw: dict, num_teachers: int, total_steps: int):
        raw = dict(raw)
        self.key = f"term{index}"
        self.where = f"distill.terms[{index}]"
        self.name = raw["name"]
        self.spec = losses.get(self.name)
        self.weight = raw.get("weight", 1.0)
        if isinstance(self.weight, bool) or not isinstance(self.weight, numbers.Real) \
                or not math.isfinite(self.weight) or self.weight < 0:
            raise ConfigError(f"{self.where}.weight: expected a finite number >= 0, got {self.weight!r}")
        self.weight = float(self.weight)
        self.warmup_steps = raw.get("warmup_steps", 0)
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, numbers.Integral) \
                or self.warmup_steps < 0:
            raise ConfigError(f"{self.where}.warmup_steps: expected an int >= 0, got {self.warmup_steps!r}")
        self.warmup_steps = int(self.warmup_steps)
        if self.warmup_steps > total_steps:
            raise ConfigError(f"{self.where}.warmup_steps: {self.warmup_steps} is more than total_steps {total_steps}")
        self.warmup_shape = raw.get("warmup_shape", WARMUP_SHAPES[0])
        if self.warmup_shape not in WARMUP_SHAPES:
            raise ConfigError(f"{self.where}.warmup_shape: {self.warmup_shape!r} is not one of "
                              f"{', '.join(WARMUP_SHAPES)}")
        self.decay = _weight_decay_schedule(self.where, raw.get("weight_schedule"), self.warmup_steps, total_steps)
        default_s, default_t = self.spec.default_taps
        self.student_tap = raw.get("student_tap", default_s)
        self.teacher_tap = raw.get("teacher_tap", default_t)
        for which, tap in (("student_tap", self.student_tap), ("teacher_tap", self.teacher_tap)):
            names = list(tap) if isinstance(tap, (list, tuple)) else [tap]
            if not names or not all(isinstance(t, str) and t for t in names):
                expected = "a list of tap names" if self.spec.multi_tap else "a tap name"
                raise ConfigError(f"{self.where}.{which}: expected {expected} like 'logits' or 'stage2', got {tap!r}")
            if not self.spec.multi_tap and isinstance(tap, (list, tuple)) and len(tap) != 1:
                raise ConfigError(f"{self.where}.{which}: loss {self.name!r} compares one tap, got {list(tap)}; "
                                  "use one term per tap")
        if "connector" in raw and self.name in OWN_HEADS:
            raise ConfigError(f"{self.where}.connector: loss {self.name!r} {OWN_HEADS[self.name]}; "
                              "a connector does not apply")
        self.connector = raw.get("connector", self.spec.connector)
        if self.connector and self.connector != "none":
            if self.connector not in connector_lib.names():
                raise ConfigError(f"{self.where}.connector: unknown connector {self.connector!r}; expected one of: "
                                  f"{', '.join(connector_lib.names())}, or 'none'")
            if self.spec.multi_tap and self.connector not in MULTI_TAP_CONNECTORS:
                raise ConfigError(f"{self.where}.connector: {self.connector!r} maps one tap, but loss {self.name!r} "
                                  f"takes lists of taps; use {' or '.join(map(repr, MULTI_TAP_CONNECTORS))}, or 'none'")
        self.teacher = raw.get("teacher")
        if self.teacher is not None and self.teacher not in range(num_teachers):
            raise ConfigError(f"{self.where}.teacher: {self.teacher!r} is not a teacher index (0..{num_teachers - 1})")
        if self.name != "crd" and set(raw) & set(CRD_DEFAULTS):
            raise ConfigError(f"{self.where}: {', '.join(sorted(set(raw) & set(CRD_DEFAULTS)))} only apply to a "
                              f"'crd' term, not {self.name!r}")
        self.crd = _crd_settings(self.where, raw) if self.name == "crd" else None
        # nd: the teacher's class means over the train split (the paper's), or in-batch means
        self.class_means = raw.pop("class_means", ND_CLASS_MEANS[0]) if self.name == "nd" else None
        if self.name == "nd" and self.class_means not in ND_CLASS_MEANS:
            raise ConfigError(f"{self.where}.class_means: {self.class_means!r} is not one of "
                              f"{', '.join(ND_CLASS_MEANS)}")
        self.standardize_logits = raw.get("standardize_logits", False)
        if not isinstance(self.standardize_logits, bool):
            raise ConfigError(f"{self.where}.standardize_logits: expected true or false, got "
                              f"{self.standardize_logits!r}")
        if self.standardize_logits and (self.taps("student") != ["logits"] or self.taps("teacher") != ["logits"]
                                        or self.crd is not None):
            raise ConfigError(f"{self.where}.standardize_logits: only for logit terms (student_tap and "
                              f"teacher_tap 'logits'), not {self.name!r} on {self.student_tap!r}/{self.teacher_tap!r}")
        try:
            self.hparams = losses.resolve_hparams(self.name, {k: v for k, v in raw.items() if k not in TERM_KEYS})
        except ConfigError as e:
            raise ConfigError(f"{self.where}: {e}") from None

    def taps(self, which: str):
        names = self.student_tap if which == "student" else self.teacher_tap
        return list(names) if isinstance(names, (list, tuple)) else [names]

    @property
    def scheduled(self) -> bool:
        """Whether the weight changes during the run (its value is then logged as `weight/<term>`)."""
        return bool(self.warmup_steps) or self.decay is not None

    def weight_at(self, step):
        """weight x warm-up ramp (0 -> 1 over warmup_steps) x `weight_schedule`'s decay from warmup_steps on."""
        if not self.scheduled:
            return self.weight
        weight = self.weight
        if self.warmup_steps:
            progress = jnp.minimum(1.0, step.astype(jnp.float32) / self.warmup_steps)
            if self.warmup_shape == "sigmoid":  # Laine & Aila's ramp-up, arXiv:1610.02242 (mean teacher's)
                progress = jnp.exp(-5.0 * (1.0 - progress) ** 2)
            weight = weight * progress
        if self.decay is not None:
            weight = weight * self.decay(step)
        return weight

    @contextlib.contextmanager
    def naming_errors(self, student=None, teacher=None):
        """A ConfigError raised inside (a loss's own shape check, found while tracing) names this term; so
        does a shape error of the loss's own arithmetic on the taps `student` and `teacher` (lists of
        arrays): AT on [B, D] vectors, DIST on a feature tap, ... without a connector to map them."""
        try:
            yield
        except ConfigError as e:
            if str(e).startswith(self.where):
                raise
            raise ConfigError(f"{self.where}: {e}") from None
        except (TypeError, ValueError, IndexError) as e:
            if student is None or isinstance(e, jax.errors.ConcretizationTypeError):  # (a bug in the loss)
                raise
            def shapes(taps):
                return [tuple(x.shape) for x in taps]
            raise ConfigError(
                f"{self.where}: loss {self.name!r} failed on student tap {self.student_tap} {shapes(student)} "
                f"and teacher tap {self.teacher_tap} {shapes(teacher)} ({first_line(e)}); if it does not compare "
                "taps of these shapes, choose others (e.g. 'logits' for logit losses, [B, H, W, C] maps for 'at') "
                "or a 'connector'") from e


class KDTask:
    """Student trained with CE + distillation terms against frozen teachers."""

    def __init__(self, config, num_classes: int, num_train_examples: int = 0):
        self.config = config
        self.num_classes = num_classes
        self.num_train_examples = num_train_examples
        self.model = common.build_model(config.model, num_classes)
        self.teacher_sections = [_primary_teacher(config)] + [_teacher_section(t, i) for i, t in
                                                    enumerate(config.extra_teachers)]
        self.self_ema = config.teacher.checkpoint == SELF_EMA
        if self.self_ema:
            if config.extra_teachers:
                raise ConfigError("config key 'extra_teachers': not supported with teacher.checkpoint='self_ema'")
            if config.distill.teacher_cache:
                raise ConfigError("config key 'distill.teacher_cache': the EMA teacher (teacher.checkpoint='self_ema') "
                                  "changes every step; its outputs cannot be cached")
            self.teacher_sections = [config.model]
        self.teachers = [common.build_model(t, num_classes) for t in self.teacher_sections]
        self.terms = [Term(i, t, len(self.teachers), config.total_steps) for i, t in enumerate(config.distill.terms)]
        _check_no_label_under_mixing(config, self.terms, len(self.teachers))
        self.needs_taps = any(t.taps("student") != ["logits"] or t.taps("teacher") != ["logits"]
                              for t in self.terms)
        if self.self_ema and self._class_means_terms():
            raise ConfigError(f"{self._class_means_terms()[0].where}.class_means: 'train' needs a fixed teacher; "
                              "with teacher.checkpoint='self_ema' use 'batch'")
        self.connectors = {}
        self._tap_shape_cache = {}  # (id(model), shape, dtype) -> {tap: ShapeDtypeStruct}
        hard = config.distill.hard_augment
        self.hard = hard_augment.AffineAugmentor(hidden=hard.hidden, scale=hard.scale) if hard.enabled else None
        if self.hard is not None and config.distill.teacher_cache:
            raise ConfigError("config key 'distill.teacher_cache': not possible with distill.hard_augment "
                              "(the inputs change every step)")
        if config.distill.teacher_cache:
            from transferlab.tasks.teacher_cache import check_cacheable
            check_cacheable(config)
        elif config.distill.teacher_cache_views:
            raise ConfigError("config key 'distill.teacher_cache_views': set, but distill.teacher_cache is off")
        self.cache_views = int(config.distill.teacher_cache_views) if config.distill.teacher_cache else 0
        combination = config.distill.teacher_combination
        if combination not in COMBINATIONS:
            raise ConfigError(f"config key 'distill.teacher_combination': {combination!r} is not one of "
                              f"{', '.join(COMBINATIONS)}")
        if combination in ("adaptive", "partition") and len(self.teachers) == 1:
            raise ConfigError(f"config key 'distill.teacher_combination': {combination!r} weighs several teachers "
                              "against each other, but this run has one; add extra_teachers (for 'partition' "
                              "the student's own pretrained run) or use 'average'")
        if combination == "weighted" and len(config.distill.teacher_weights) != len(self.teachers):
            raise ConfigError(f"config key 'distill.teacher_weights': needs one weight per teacher "
                              f"({len(self.teachers)}), got {tuple(config.distill.teacher_weights)}")
        for i, section in enumerate(self.teacher_sections):
            if not self.self_ema and not section.checkpoint:
                key = "teacher.checkpoint" if i == 0 else f"extra_teachers[{i - 1}].checkpoint"
                raise ConfigError(f"config key {key!r}: required for task 'kd' (a trained run's workdir, or "
                                  f"{RANDOM_TEACHER!r} for an untrained teacher in smoke tests)")

    # ------------------------------------------------------------------ init

    def _tap_shapes(self, model, images):
        """{tap: ShapeDtypeStruct} of `model` on inputs shaped like `images` (traced once per model and shape:
        `init` sows the same taps as an eval-mode forward)."""
        key = (id(model), tuple(images.shape), str(images.dtype))
        if key not in self._tap_shape_cache:
            def run(x):
                variables = model.init({"params": jax.random.key(0)}, x, train=False, mutable=True)
                return common.flatten_taps(variables["intermediates"])
            self._tap_shape_cache[key] = jax.eval_shape(run, jax.ShapeDtypeStruct(images.shape, images.dtype))
        return self._tap_shape_cache[key]

    def _check_taps(self, term, which, shapes, model_name):
        for tap in term.taps(which):
            if tap not in shapes:
                raise ConfigError(f"{term.where}.{which}_tap: {tap!r} is not a tap of the {which} "
                                  f"({model_name}); available: {', '.join(sorted(shapes))}")

    def init_params(self, rng, images):
        student_rng, connector_rng = jax.random.split(rng)
        params, model_state = common.init_model(self.model, student_rng, images)
        all_params = {"model": params, "connectors": {}}
        all_state = {"model": model_state, "connectors": {}, "memory": {}}
        if self.self_ema:
            all_state["ema"] = {"params": params, "model_state": model_state}
        if self.hard is not None:
            z = jnp.zeros((images.shape[0], self.config.distill.hard_augment.noise_dim), jnp.float32)
            all_params["augmentor"] = self.hard.init(jax.random.fold_in(rng, 7), z)["params"]
        if not self.terms:
            return all_params, all_state
        s_shapes = self._tap_shapes(self.model, images)
        t_shapes = [self._tap_shapes(t, images) for t in self.teachers]
        for n, term in enumerate(self.terms):
            t_index = term.teacher or 0
            self._check_taps(term, "student", s_shapes, self.config.model.name)
            self._check_taps(term, "teacher", t_shapes[t_index], self.teacher_sections[t_index].name)
            s_list = [s_shapes[t].shape for t in term.taps("student")]
            t_list = [t_shapes[t_index][t].shape for t in term.taps("teacher")]
            use_connector = bool(term.connector) and term.connector != "none"
            if term.spec.connector and not use_connector and s_list != t_list:
                raise ConfigError(f"{term.where}: student tap {term.student_tap} {s_list} and teacher tap "
                                  f"{term.teacher_tap} {t_list} differ in shape and 'connector' is 'none' "
                                  f"(default for {term.name!r}: {term.spec.connector!r})")
            key = jax.random.fold_in(connector_rng, n)
            if term.crd is not None:
                self._init_crd(term, key, s_list[0], t_list[0], all_params, all_state)
                continue
            if term.name == "trilateral":
                self._init_ratio_net(term, key, s_list[0], all_params)
                continue
            if use_connector:
                target = t_list if term.spec.multi_tap else t_list[0]
                self._add_term_connector(term, target, s_list, t_list, key, all_params, all_state)
        return all_params, all_state

    def _add_term_connector(self, term, target, s_list, t_list, rng, all_params, all_state):
        """The term's connector from its student tap(s) to `target`; shapes it cannot map are a ConfigError."""
        name = term.connector
        shapes = (f"student tap {term.student_tap} {[tuple(s) for s in s_list]}, teacher tap "
                  f"{term.teacher_tap} {[tuple(t) for t in t_list]}")
        if name in CONV_CONNECTORS and any(len(s) != 4 for s in [*s_list, *t_list]):
            raise ConfigError(f"{term.where}.connector: {name!r} maps feature maps [B, H, W, C], but {shapes}; "
                              "use connector 'linear' for [B, D] vectors or [B, N, D] tokens")
        try:
            self._add_connector(term.key, name, target, s_list, term.spec.multi_tap, rng, all_params, all_state)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{term.where}.connector: {name!r} cannot map {shapes} "
                              f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
        if not term.spec.multi_tap:  # e.g. 'linear' from a vector [B, D] keeps its rank: not a feature map
            module = self.connectors[term.key]
            variables = {"params": all_params["connectors"][term.key], **all_state["connectors"][term.key]}
            out = jax.eval_shape(lambda x: module.apply(variables, x, train=False),
                                 jax.ShapeDtypeStruct(tuple(s_list[0]), jnp.float32)).shape
            if len(out) != len(t_list[0]):
                raise ConfigError(f"{term.where}.connector: {name!r} maps {shapes} to {tuple(out)}, not to the "
                                  "teacher tap's rank; compare taps of the same kind (vectors [B, D], tokens "
                                  "[B, N, D] or feature maps [B, H, W, C])")

    def _add_connector(self, key, name, target, s_list, multi, rng, all_params, all_state):
        module = connector_lib.create_connector(name, target)
        self.connectors[key] = module
        dummy = [jnp.zeros(s, jnp.float32) for s in s_list]
        variables = dict(module.init({"params": rng}, dummy if multi else dummy[0], train=False))
        all_params["connectors"][key] = variables.pop("params", {})
        all_state["connectors"][key] = variables

    def _init_ratio_net(self, term, rng, logits_shape, all_params):
        """TGeo-KD's fusion-ratio network over the trilateral features (7C + 7 inputs)."""
        self.ratio_net = connector_lib.FusionRatioMLP()
        feats = jnp.zeros((logits_shape[0], 7 * logits_shape[-1] + 7), jnp.float32)
        all_params["connectors"][term.key + "_ratio"] = self.ratio_net.init({"params": rng}, feats)["params"]

    def _trilateral_term(self, term, params, model_state, batch, s_logits, t_logits):
        """TGeo-KD (arXiv:2312.15112): per-sample KD/CE fusion ratio from the trilateral geometry, learned in
        the paper's bilevel way, first order in the outer problem: the ratio network gets the gradient of
        the student's cross-entropy on held-out examples after a virtual SGD step (lr
        `trilateral_lookahead_lr`) on the fused loss; the student gets the fused loss with the ratio held
        fixed. The paper scores the look-ahead on a validation set; here (`distill.trilateral_outer`,
        default 'held_out_half') the step is taken on one half of the training batch and scored on the
        other half, so the ratio is rewarded for what generalizes to unseen examples, without a second
        data stream; 'same_batch' steps and scores on the whole batch."""
        phi = params["connectors"][term.key + "_ratio"]
        temperature = term.hparams["temperature"]

        def ratio(phi_, student_logits, labels, teacher_logits):
            feats = logit_losses.trilateral_features(student_logits, teacher_logits, labels, temperature=temperature)
            return self.ratio_net.apply({"params": phi_}, feats)

        fused = term.spec.fn(s_logits, t_logits, {**batch, "fusion_ratio": jax.lax.stop_gradient(
            ratio(phi, s_logits, batch["label"], t_logits))}, **term.hparams)

        theta = jax.lax.stop_gradient(params["model"])
        state = jax.lax.stop_gradient(model_state["model"])
        inner_batch, outer_batch = dict(batch), dict(batch)
        inner_batch["teacher_logits"] = outer_batch["teacher_logits"] = t_logits
        if self.config.distill.trilateral_outer == "held_out_half" and batch["image"].shape[0] >= 2:
            inner_batch, outer_batch = _halves(inner_batch)

        def inner(theta_, phi_):
            logits = common.forward(self.model, theta_, state, inner_batch["image"], train=True)[0]
            r = ratio(phi_, logits, inner_batch["label"], inner_batch["teacher_logits"])
            return term.spec.fn(logits, inner_batch["teacher_logits"], {**inner_batch, "fusion_ratio": r},
                                **term.hparams)

        lr = self.config.distill.trilateral_lookahead_lr
        ahead = jax.tree.map(lambda w, g: w - lr * g, theta, jax.grad(inner)(theta, phi))
        outer = common.cross_entropy(common.forward(self.model, ahead, state, outer_batch["image"], train=True)[0],
                                     common.targets(outer_batch, self.num_classes))
        return fused, outer

    def _init_crd(self, term, rng, s_shape, t_shape, all_params, all_state):
        if not self.num_train_examples:
            raise ConfigError(f"{term.where}: 'crd' needs the train split size (memory bank rows)")
        dim = int(term.crd["embed_dim"])
        k1, k2, k3, k4 = jax.random.split(rng, 4)
        self._add_connector(term.key, "linear", dim, [s_shape], False, k1, all_params, all_state)
        self._add_connector(term.key + "_teacher", "linear", dim, [t_shape], False, k2, all_params, all_state)
        n = self.num_train_examples
        all_state["memory"][term.key] = {"student": relation.crd_init_memory(k3, n, dim),
                                         "teacher": relation.crd_init_memory(k4, n, dim),
                                         "z": -jnp.ones((2,), jnp.float32)}

    def load_frozen(self, mesh, abstract_images):
        """Teachers' variables restored read-only (replicated on `mesh`) from their checkpoints; with
        `distill.teacher_cache`, their cached train-split logits instead of the variables."""
        for term in self.terms:  # a clipped CRD num_negatives is said once per run
            if term.crd is not None and int(term.crd["num_negatives"]) > self.num_train_examples - 1:
                note(f"{term.where}: num_negatives {term.crd['num_negatives']} is more than the "
                     f"{self.num_train_examples - 1} other train examples; using {self.num_train_examples - 1}")
        if self.self_ema:
            return {"teachers": []}
        loaded = [self._load_teacher(i, mesh, abstract_images) for i in range(len(self.teachers))]
        self.frozen_sources = {  # which checkpoint step each teacher came from (a resume must find the same)
            os.path.abspath(section.checkpoint): step for section, (_, step) in zip(self.teacher_sections, loaded)
            if section.checkpoint != RANDOM_TEACHER}
        frozen = {"teachers": [variables for variables, _ in loaded]}
        means = self._class_means(mesh, abstract_images, frozen["teachers"])
        if means:
            frozen["class_means"] = means
        if not self.config.distill.teacher_cache:
            return frozen
        from transferlab.parallel import replicated
        from transferlab.tasks import teacher_cache
        batch = self.config.eval_batch_size or self.config.batch_size
        tables = [teacher_cache.load_or_build(model, variables, section, step, self.config, mesh, batch, taps)
                  for model, section, (variables, step), taps in zip(self.teachers, self.teacher_sections, loaded,
                                                                      self.cached_taps())]
        return {**frozen, "cache": [jax.device_put(t, replicated(mesh)) for t in tables]}

    def _cached_output_shapes(self, model, images) -> dict:
        """{tap: ShapeDtypeStruct} of a cached teacher's outputs on `images`: its taps, and its logits in float32
        (as the cache stores and the step reads them)."""
        logits = jax.ShapeDtypeStruct((images.shape[0], self.num_classes), jnp.float32)
        return {**self._tap_shapes(model, images), "logits": logits}

    def cached_taps(self) -> list[tuple[str, ...]]:
        """Per teacher, the taps a teacher cache holds: its logits, and every other tap a term reads from it."""
        taps = [{"logits"} for _ in self.teachers]
        for term in self.terms:
            taps[term.teacher or 0].update(term.taps("teacher"))
        return [tuple(sorted(t)) for t in taps]

    @property
    def frozen_reads_data(self) -> bool:
        """`load_frozen` runs the teachers over the train split (a teacher cache, ND's class means)."""
        return bool(self.config.distill.teacher_cache) or any(
            self.teacher_sections[t.teacher or 0].get("checkpoint", "") != RANDOM_TEACHER
            for t in self._class_means_terms())

    def abstract_frozen(self, abstract_images):
        """The shapes of what `load_frozen` returns, without reading a checkpoint or the data
        (`train.check_config` traces a whole train step with them)."""
        if self.self_ema:
            return {"teachers": []}
        teachers = []
        for model in self.teachers:
            params, state = jax.eval_shape(lambda x, m=model: common.init_model(m, jax.random.key(0), x),
                                           abstract_images)
            teachers.append({"params": params, "model_state": state})
        frozen = {"teachers": teachers}
        means = self.abstract_class_means(abstract_images)
        if means:
            frozen["class_means"] = means
        if self.config.distill.teacher_cache:
            views = (self.cache_views,) if self.cache_views else ()
            frozen["cache"] = []
            for model, taps in zip(self.teachers, self.cached_taps()):
                shapes = self._cached_output_shapes(model, abstract_images)
                frozen["cache"].append({tap: jax.ShapeDtypeStruct(
                    (self.num_train_examples, *views, *shapes[tap].shape[1:]), jnp.float32) for tap in taps})
        return frozen

    def _class_means_terms(self):
        return [t for t in self.terms if t.class_means == "train"]

    def abstract_class_means(self, abstract_images):
        """{term key: ShapeDtypeStruct [K, ...]} of the class means `load_frozen` provides."""
        out = {}
        for term in self._class_means_terms():
            tap = self._tap_shapes(self.teachers[term.teacher or 0], abstract_images)[term.taps("teacher")[0]]
            out[term.key] = jax.ShapeDtypeStruct((self.num_classes,) + tuple(tap.shape[1:]), jnp.float32)
        return out

    def _class_means(self, mesh, abstract_images, teacher_vars):
        """ND's teacher class means per term (`tasks.class_means`); random teachers (benchmarks, smoke
        tests, no data) get seeded random means of the right shape."""
        from transferlab.parallel import replicated
        from transferlab.tasks.class_means import teacher_class_means
        out = {}
        shapes = self.abstract_class_means(abstract_images)
        for term in self._class_means_terms():
            index = term.teacher or 0
            if self.teacher_sections[index].checkpoint == RANDOM_TEACHER:
                key = jax.random.fold_in(jax.random.key(self.config.seed), 7 + index)
                means = jax.random.normal(key, shapes[term.key].shape, jnp.float32)
            else:
                batch = self.config.eval_batch_size or self.config.batch_size
                means = teacher_class_means(self.teachers[index], teacher_vars[index], term.taps("teacher")[0],
                                            self.config, mesh, batch, self.num_classes)
            out[term.key] = jax.device_put(means, replicated(mesh))
        return out

    def _teacher_target(self, index, mesh, abstract_images):
        """(config key, {'params': {'model': ...}, 'model_state': {'model': ...}} of teacher `index`'s
        abstract variables, replicated on `mesh`)."""
        from transferlab.checkpoint import abstract_with_shardings
        from transferlab.parallel import replicated
        where = "teacher.checkpoint" if index == 0 else f"extra_teachers[{index - 1}].checkpoint"
        params, state = jax.eval_shape(lambda x: common.init_model(self.teachers[index], jax.random.key(0), x),
                                       abstract_images)
        target = {"params": {"model": params}, "model_state": {"model": state}}
        return where, abstract_with_shardings(target, jax.tree.map(lambda _: replicated(mesh), target))

    def _load_teacher(self, index, mesh, abstract_images):
        from transferlab.checkpoint import note_source_data, restore_selected_subtree
        section = self.teacher_sections[index]
        where, target = self._teacher_target(index, mesh, abstract_images)
        if section.checkpoint == RANDOM_TEACHER:
            abstract = {"params": target["params"]["model"], "model_state": target["model_state"]["model"]}
            variables = random_variables(abstract, self.config.seed + 1 + index)
            return jax.device_put(variables, jax.tree.map(lambda x: x.sharding, abstract)), -1
        restored, step = restore_selected_subtree(section.checkpoint, target, where)
        note_source_data(where, section.checkpoint, self.config)
        return {"params": restored["params"]["model"], "model_state": restored["model_state"]["model"]}, step

    def check_checkpoints(self, mesh, abstract_images):
        """The teacher checkpoints that exist already match their teachers' models, checked on their metadata
        alone (no array is read): a study's later arm with a wrong teacher fails before the first arm trains."""
        from transferlab.checkpoint import restore_selected_subtree
        for index, section in enumerate([] if self.self_ema else self.teacher_sections):
            if section.checkpoint != RANDOM_TEACHER and os.path.isdir(os.path.join(section.checkpoint, "checkpoints")):
                where, target = self._teacher_target(index, mesh, abstract_images)
                restore_selected_subtree(section.checkpoint, target, where, read=False)

    # ------------------------------------------------------------------ steps

    @property
    def replays_views(self) -> bool:
        """A teacher cache of replayable views: the trainer augments through `replay_augment`."""
        return bool(self.cache_views)

    def replay_augment(self, rng, batch):
        """Each example shows one of its cached views, drawn at random: the crop and flip the teacher's cached
        outputs were computed on (`augment.replay_views`); `batch['view']` says which."""
        view_B = jax.random.randint(rng, batch["index"].shape, 0, self.cache_views)
        images = augment.replay_views(view_B, batch["index"], batch["image"], self.config.augment.crop_padding,
                                      self.config.augment.flip)
        return {**batch, "image": images, "view": view_B}

    def teacher_variables(self, model_state, frozen):
        """The teachers' variables: restored ones, or the student's EMA for self-distillation."""
        return [model_state["ema"]] if self.self_ema else frozen["teachers"]

    def teacher_outputs(self, teacher_variables, images):
        """[(logits, taps)] for every teacher, under stop_gradient."""
        outs = []
        for model, variables in zip(self.teachers, jax.lax.stop_gradient(teacher_variables)):
            logits, _, taps = common.forward(model, variables["params"], variables["model_state"], images,
                                             train=False, taps=self.needs_taps)
            outs.append(jax.lax.stop_gradient(({**taps, "logits": logits})))
        return outs

    def _teacher_logits(self, teacher_variables, images):
        """[{'logits': ...}] of every teacher on `images` (eval mode; differentiable in `images`)."""
        return [{"logits": common.forward(m, v["params"], v["model_state"], images, train=False)[0]}
                for m, v in zip(self.teachers, teacher_variables)]

    def combined_logits(self, teacher_taps, labels):
        """The teachers' logits combined per `distill.teacher_combination` (one teacher: its logits).
        `labels=None` (evaluation): the label-weighted combinations (adaptive, partition) fall back to the
        average, as weighting by the eval split's own labels would score an oracle, not the teachers."""
        logits = jnp.stack([t["logits"].astype(jnp.float32) for t in teacher_taps])  # [K, B, C]
        if len(teacher_taps) == 1:
            return logits[0]
        combination = self.config.distill.teacher_combination
        if combination == "average" or (labels is None and combination in ("adaptive", "partition")):
            return jnp.mean(logits, axis=0)
        if combination == "weighted":
            w = jnp.asarray(self.config.distill.teacher_weights, jnp.float32)
            return jnp.einsum("k,kbc->bc", w / jnp.sum(w), logits, precision="highest")
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[None, :, None], axis=-1)[..., 0]  # [K, B]
        if combination == "partition":
            w = jax.nn.one_hot(jnp.argmin(ce, axis=0), len(teacher_taps), axis=0)
        else:
            w = jax.nn.softmax(-ce, axis=0)
        return jnp.einsum("kb,kbc->bc", w, logits, precision="highest")  # float32 on GPU/TPU too

    def _hard_augment(self, params, model_state, frozen, batch, rng):
        """HARD (arXiv:2305.14890): the batch the student trains on, a `fraction` of it warped by the learned
        augmentor (constants for the student's own loss), and the augmentor's objective, which only the
        augmentor's params see:

          consistency_weight * KL(t(x) || t(x_A))  -  KL(t(x_A) || s(x_A))        (temperature 1)
          + saturation_weight * mean(d^2)                    (d: the warp's pre-tanh deviations)

        so the augmentor looks for warps where teacher and student disagree (gradients through both models'
        responses to the warp, neither model's weights) while the teacher still predicts what it does on x."""
        images = batch["image"]
        z = jax.random.normal(jax.random.fold_in(rng, 104729), (images.shape[0],
                                                               self.config.distill.hard_augment.noise_dim))
        theta, deviation = self.hard.apply({"params": params["augmentor"]}, z)
        warped = hard_augment.warp(images, theta)
        teachers = jax.lax.stop_gradient(self.teacher_variables(model_state, frozen))

        clean = jax.lax.stop_gradient(self.combined_logits(self._teacher_logits(teachers, images), batch["label"]))
        t_warped = self.combined_logits(self._teacher_logits(teachers, warped), batch["label"])
        s_warped = common.forward(self.model, jax.lax.stop_gradient(params["model"]),
                                  jax.lax.stop_gradient(model_state["model"]), warped, train=False)[0]
        kl = losses.get("kd").fn
        disagreement = kl(s_warped, t_warped, batch, temperature=1.0)
        consistency = kl(t_warped, clean, batch, temperature=1.0)
        saturation = jnp.mean(jnp.square(deviation))
        hard = self.config.distill.hard_augment
        objective = hard.consistency_weight * consistency - disagreement + hard.saturation_weight * saturation
        metrics = {"loss/hard_disagreement": disagreement, "loss/hard_teacher_consistency": consistency,
                   "loss/hard_saturation": saturation}
        # the student sees fraction * B (rounded half up, at least one) of the batch warped, the others as they
        # came (which ones: random)
        count = max(1, int(self.config.distill.hard_augment.fraction * images.shape[0] + 0.5))
        order = jax.random.uniform(jax.random.fold_in(rng, 104723), (images.shape[0],))
        chosen = jnp.argsort(jnp.argsort(order)) < count
        shown = jnp.where(chosen[:, None, None, None], jax.lax.stop_gradient(warped), images)
        return {**batch, "image": shown}, objective, metrics

    def loss_fn(self, params, model_state, frozen, batch, rng, step):
        augmentor_objective = None
        if self.hard is not None:
            batch, augmentor_objective, hard_metrics = self._hard_augment(params, model_state, frozen, batch, rng)
        student_images = batch["image"]
        if "cache" in frozen:  # float32 tables, read back in each tap's own dtype (exact for bfloat16)
            rows = (batch["index"], batch["view"]) if "view" in batch else batch["index"]
            teacher_taps = []
            for model, tables in zip(self.teachers, frozen["cache"]):
                shapes = self._cached_output_shapes(model, batch["image"])
                teacher_taps.append({tap: jax.lax.stop_gradient(table[rows].astype(shapes[tap].dtype))
                                     for tap, table in tables.items()})
        else:
            teacher_taps = self.teacher_outputs(self.teacher_variables(model_state, frozen), batch["image"])
            student_images = _after(student_images, [t["logits"] for t in teacher_taps])
        t_logits = self.combined_logits(teacher_taps, batch["label"])
        s_logits, new_model_state, s_taps = common.forward(
            self.model, params["model"], model_state["model"], student_images, train=True, taps=self.needs_taps)
        s_taps = {**s_taps, "logits": s_logits}
        new_state = {"model": new_model_state, "connectors": dict(model_state["connectors"]),
                     "memory": dict(model_state["memory"])}
        if self.self_ema:
            decay = self.config.distill.ema_decay
            new_state["ema"] = jax.lax.stop_gradient(jax.tree.map(
                lambda e, x: decay * e + (1.0 - decay) * x, model_state["ema"],
                {"params": params["model"], "model_state": new_model_state}))
        ce = common.cross_entropy(s_logits, common.targets(batch, self.num_classes))
        total = self.config.distill.ce_weight * ce
        metrics = {"loss/ce": ce,
                   "accuracy": common.train_accuracy(s_logits, batch["label"], batch.get("label_soft")),
                   "teacher_agreement": common.train_accuracy(s_logits, jnp.argmax(t_logits, -1))}
        for n, term in enumerate(self.terms):
            source = teacher_taps[term.teacher] if term.teacher is not None else teacher_taps[0]
            student = [s_taps[t] for t in term.taps("student")]
            teacher_in = [source[t] for t in term.taps("teacher")]
            if term.teacher is None and term.taps("teacher") == ["logits"]:
                teacher_in = [t_logits]
            with term.naming_errors(student, teacher_in):  # a loss's own shape errors name the term
                if term.crd is not None:
                    value = self._crd_term(term, params, model_state, new_state, student[0], teacher_in[0], batch,
                                           jax.random.fold_in(rng, n))
                elif term.name == "trilateral":
                    value, outer = self._trilateral_term(term, params, model_state, batch, student[0], teacher_in[0])
                    total = total + outer  # only the ratio network has a gradient here
                    metrics[f"loss/{term.key}_ratio_lookahead_ce"] = outer
                else:
                    if term.key in self.connectors:
                        student, new_state["connectors"][term.key] = self._connect(
                            term.key, params, model_state, student, term.spec.multi_tap)
                    if not term.spec.multi_tap:
                        student, teacher_in = student[0], teacher_in[0]
                    if term.standardize_logits:  # logit standardization as a plug-in, arXiv:2403.01427
                        student, teacher_in = logit_losses.standardize(student), logit_losses.standardize(teacher_in)
                    # a fresh key per term and step for losses that sample (dkpp's permutation)
                    term_batch = batch if rng is None else {**batch, "rng": jax.random.fold_in(rng, 7919 + n)}
                    hparams = term.hparams
                    if term.class_means == "train":
                        hparams = {**hparams, "class_means": frozen["class_means"][term.key]}
                    value = term.spec.fn(student, teacher_in, term_batch, **hparams)
            weight = term.weight_at(step)
            total = total + weight * value
            metrics[f"loss/{term.key}_{term.name}"] = value
            if term.scheduled:
                metrics[f"weight/{term.key}_{term.name}"] = weight
        metrics["loss/total"] = total  # the student's loss
        if augmentor_objective is not None:  # (no gradient to the student: its params are constants in it)
            total = total + augmentor_objective
            metrics.update(hard_metrics, **{"loss/hard_augmentor_objective": augmentor_objective})
        return total, (new_state, metrics)

    def _connect(self, key, params, model_state, student, multi_tap):
        module = self.connectors[key]
        state = model_state["connectors"][key]
        inputs = student if multi_tap else student[0]
        variables = {"params": params["connectors"][key], **state}
        if "batch_stats" in state:
            out, updates = module.apply(variables, inputs, train=True, mutable=["batch_stats"])
            state = {**state, **updates}
        else:
            out = module.apply(variables, inputs, train=True)
        return (list(out) if multi_tap else [out]), state

    def _crd_term(self, term, params, model_state, new_state, student, teacher, batch, rng):
        """CRD with the memory banks of `model_state`; writes the updated banks into `new_state`."""
        s_emb = self._connect(term.key, params, model_state, [student], False)[0][0]
        t_emb = self._connect(term.key + "_teacher", params, model_state, [teacher], False)[0][0]
        memory = model_state["memory"][term.key]
        n = self.num_train_examples
        negatives = min(int(term.crd["num_negatives"]), n - 1)
        index = batch["index"].astype(jnp.int32)
        extra = {"crd_memory_student": memory["student"], "crd_memory_teacher": memory["teacher"],
                 "crd_contrast_idx": relation.crd_sample_indices(rng, index, n, negatives)}
        z_batch = jnp.stack(relation.crd_normalizers(s_emb, t_emb, {**batch, **extra},
                                                     temperature=term.hparams["temperature"]))
        z = jnp.where(memory["z"] > 0, memory["z"], z_batch)  # fixed on the first step, as the reference
        value = term.spec.fn(s_emb, t_emb, {**batch, **extra, "crd_z": (z[0], z[1])}, **term.hparams)
        momentum = float(term.crd["memory_momentum"])
        unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
        new_state["memory"][term.key] = {
            "student": relation.crd_update_memory(memory["student"], unit(s_emb), index, momentum),
            "teacher": relation.crd_update_memory(memory["teacher"], unit(t_emb), index, momentum),
            "z": jax.lax.stop_gradient(z)}
        return value

    def eval_fn(self, params, model_state, frozen, batch):
        logits, _, _ = common.forward(self.model, params["model"], model_state["model"], batch["image"], train=False)
        sums = common.classification_sums(logits, batch["label"], batch["mask"])
        teacher_taps = self._teacher_logits(self.teacher_variables(model_state, frozen), batch["image"])
        t_logits = self.combined_logits(teacher_taps, None)
        mask = batch["mask"].astype(jnp.float32)
        sums["teacher_agreement"] = jnp.sum((jnp.argmax(logits, -1) == jnp.argmax(t_logits, -1)) * mask)
        sums["teacher_accuracy"] = common.classification_sums(t_logits, batch["label"], batch["mask"])["accuracy"]
        return sums


def _check_no_label_under_mixing(config, terms, num_teachers) -> None:
    """With mixup/cutmix an image mixes two classes, so a method that reads the hard class id (DKD's target
    class, CWTM's CE, ND's class means, TGeo-KD's CE, the adaptive/partition teacher weights) has none
    to read: a ConfigError rather than silently using the first image's label."""
    mixing = [k for k in ("mixup_alpha", "cutmix_alpha") if config.augment[k] > 0]
    if not mixing:
        return
    users = [f"{t.where} ({t.name!r})" for t in terms if t.spec.reads_label]
    combination = config.distill.teacher_combination
    if num_teachers > 1 and combination in ("adaptive", "partition"):
        users.append(f"distill.teacher_combination={combination!r}")
    if users:
        raise ConfigError(f"config key 'augment.{mixing[0]}': {users[0]} reads each image's class label, which "
                          "mixup/cutmix mixes; use a method without labels (e.g. 'kd', 'dist') or turn mixing off")


def _primary_teacher(config):
    """`teacher`, or the student's own architecture when `teacher.name` is empty (born-again)."""
    if config.teacher.name:
        return config.teacher
    section = model_section(config.model.name)
    section.dtype, section.kwargs = config.model.dtype, config.model.kwargs
    section.checkpoint = config.teacher.checkpoint
    return section


def _teacher_section(raw, index):
    """An `extra_teachers` entry as a model section (name, dtype, kwargs, checkpoint)."""
    raw = dict(raw)
    unknown = set(raw) - {"name", "dtype", "kwargs", "checkpoint"}
    if unknown or "name" not in raw:
        raise ConfigError(f"extra_teachers[{index}]: expected keys name, checkpoint, dtype, kwargs; got {sorted(raw)}")
    section = model_section(raw["name"])
    section.dtype = raw.get("dtype", "float32")
    section.kwargs = dict(raw.get("kwargs", {}))
    section.checkpoint = raw.get("checkpoint", "")
    return section


def _halves(batch: dict) -> tuple[dict, dict]:
    """Even- and odd-position examples of a batch (an odd last example is left out). Interleaved rather
    than first/second half: with the batch sharded in contiguous blocks, each device keeps its share of
    both halves, so splitting moves no data between devices."""
    size = batch["image"].shape[0]
    n = size // 2

    def half(i):
        return {k: v[:2 * n].reshape(n, 2, *v.shape[1:])[:, i]
                if getattr(v, "ndim", 0) >= 1 and v.shape[0] == size else v for k, v in batch.items()}

    return half(0), half(1)


def selected_step(workdir: str, ckpt) -> int | None:
    """The step a finished run selected (results.json), else its latest checkpoint."""
    path = os.path.join(workdir, "results.json")
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                results = json.load(f)
            step = results.get("selected_step") if isinstance(results, dict) else None
            if not isinstance(results, dict) or not isinstance(step, (int, type(None))):
                raise ValueError("not a results object")
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: unreadable ({type(e).__name__}), so the step that run selected is unknown; "
                              "rerun that run's command to rewrite it") from None
        if step is not None and step not in ckpt.manager.all_steps():
            raise ConfigError(f"{path}: that run selected step {step}, but {ckpt.directory}/{step} is gone "
                              f"(steps kept: {sorted(ckpt.manager.all_steps())})")
        if step is not None:
            return int(step)
    return ckpt.latest_step()

"""Config loading, command-line overrides and validation.

A config file defines `get_config(arg=None) -> ConfigDict` (big_vision style:
`--config experiments/kd/quickstart.py:teacher=lenet5`). It only needs the
keys that differ from `defaults()`: every key it sets must exist there, so a
typo is caught before any compute. `load()` returns the merged, validated
config; every failure is a `ConfigError` naming the key and what was expected.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import inspect
import json
import math
import os
import re

import ml_collections

from transferlab.errors import ConfigError, unknown_name

TASKS = ("classify", "kd", "dml", "sla_sd")
OPTIMIZERS = ("sgd", "adamw", "adafactor")
SCHEDULES = ("constant", "cosine", "step", "linear")
SELECTIONS = ("last", "best")
SELECTION_METRICS = (r"accuracy|top5_accuracy|teacher_agreement|ensemble_accuracy|peer\d+_accuracy"
                     r"|aggregated_accuracy|joint_accuracy")
DTYPES = ("float32", "bfloat16")
MESH_AXES = ("data", "fsdp")
# Keys of a distill.terms entry that are not loss hparams.
TERM_KEYS = ("name", "weight", "student_tap", "teacher_tap", "connector", "warmup_steps", "warmup_shape",
             "weight_schedule", "teacher",
             "standardize_logits", "embed_dim", "num_negatives", "memory_momentum")
# Sections whose contents are free-form (checked by the component that owns them).
FREE_FORM = ("model.kwargs", "teacher.kwargs", "study.arms", "study.ensembles", "distill.terms", "sharding_rules", "extra_teachers",
             "dml.peers")


def model_section(name: str = "mlp") -> ml_collections.ConfigDict:
    """A model: registry name, compute dtype and constructor keyword arguments."""
    return ml_collections.ConfigDict({
        "name": name,  # any of transferlab.models.names()
        "dtype": "float32",  # compute dtype: float32 or bfloat16 (params stay float32)
        "kwargs": ml_collections.ConfigDict(),  # extra constructor arguments, e.g. hidden_sizes=(128,) (mlp)
    })


def defaults() -> ml_collections.ConfigDict:
    """Every key a config may set, with its default and meaning."""
    c = ml_collections.ConfigDict()
    c.task = "classify"  # classify (plain supervised) or kd (student distilled from a frozen teacher)
    c.seed = 0  # seeds params, data order and augmentation
    c.total_steps = 1000  # optimizer steps
    c.batch_size = 128  # global batch size, split over the data and fsdp mesh axes
    c.eval_batch_size = 0  # 0: same as batch_size
    c.log_every_steps = 50  # train metrics to metrics.jsonl / TensorBoard / console
    c.eval_every_steps = 200  # validation-split evaluation (0: only at the end)
    c.checkpoint_every_steps = 200  # async Orbax save of the full train state (0: only at the end)
    c.keep_checkpoints = 2  # how many of the latest checkpoints to keep
    c.mesh_shape = "data=-1,fsdp=1"  # device mesh; -1 takes the remaining devices
    c.sharding_rules = ()  # ((regex over param path, 'replicate'|'fsdp'), ...); fsdp>1 default: 'fsdp'
    c.selection = "last"  # test metrics of the last step, or of the best step on validation
    c.selection_metric = "accuracy"  # validation metric used when selection == 'best' (higher is better)
    # JAX persistent compilation cache, set by the CLI for the whole process ('' = off; a relative path is
    # under --workdir): runs that compile the same programs (a study's seeds, a resumed run) compile once
    c.xla_cache_dir = ""

    c.dataset = ml_collections.ConfigDict({
        "name": "mnist5k",  # offline builders (digits, mnist5k, fashion_mnist_deb) or any prepared tfds name
        "data_dir": "",  # '' -> $TFDS_DATA_DIR or ~/tensorflow_datasets
        # Each split is a name, a slice or a sum in tfds' syntax ('train[:90%]', 'train[45000:]', 'train+test'):
        # e.g. a validation split held out of train for a dataset without one (CIFAR-100)
        "train_split": "train",
        "eval_split": "validation",  # used for periodic eval and model selection
        "test_split": "test",  # evaluated once at the end, never used for selection
        "worker_count": 0,  # grain worker processes (0: in the main process)
    })
    c.augment = ml_collections.ConfigDict({
        "crop_padding": 0,  # pad-and-crop; 0 disables
        "flip": False,  # random horizontal flip
        "mixup_alpha": 0.0,  # 0 disables
        "cutmix_alpha": 0.0,  # 0 disables
    })
    c.model = model_section()

    c.optimizer = ml_collections.ConfigDict({
        "name": "sgd",  # sgd, adamw, adafactor
        "learning_rate": 0.05,  # peak learning rate
        "momentum": 0.9,  # sgd momentum (0 disables)
        "nesterov": False,
        "b1": 0.9,  # adam betas
        "b2": 0.999,
        "eps": 1e-8,
        "weight_decay": 5e-4,  # L2 for sgd (added to the gradient), decoupled for adamw/adafactor
        "decay_norms_and_biases": False,  # False: no weight decay on BN/LayerNorm params and biases
        "clip_grad_norm": 0.0,  # global-norm clipping; 0 disables
        "accumulate_steps": 1,  # gradient accumulation: one update every k micro-steps
        "freeze": "",  # regex over param paths ('a/b/kernel') that stay fixed
    })
    c.schedule = ml_collections.ConfigDict({
        "name": "cosine",  # constant, cosine, step, linear
        "warmup_steps": 0,  # linear warmup from 0
        "boundaries": (),  # step decay: steps (int) or fractions of total_steps (float < 1)
        "decay_factor": 0.1,  # step decay multiplier
        "end_factor": 0.0,  # cosine/linear end value as a fraction of the peak
    })

    c.init_checkpoint = ""  # workdir of a finished run whose params (and BN stats) initialize the model
    c.teacher = model_section("")  # kd: the frozen teacher architecture ('' = the student's, born-again)
    c.teacher.checkpoint = ""  # kd: workdir of a trained run, restored read-only; 'self_ema' (an EMA of the
    #                            student, see distill.ema_decay); 'random' (untrained: smoke tests, benchmarks)
    c.extra_teachers = ()  # kd, multi-teacher: ({'name', 'checkpoint', 'kwargs', 'dtype'}, ...)

    c.distill = ml_collections.ConfigDict({
        "ce_weight": 1.0,  # weight of the hard-label cross-entropy
        # ({'name': 'kd', 'weight': 1.0, 'temperature': 4.0}, ...). Besides the loss's hparams a term takes
        # weight, warmup_steps (a ramp from 0; warmup_shape 'linear' or 'sigmoid', the mean teacher's),
        # weight_schedule (the weight's decay after the warm-up, with the `schedule` section's keys and meaning:
        # {'name': 'cosine', 'end_factor': 0.1}), student_tap / teacher_tap, connector, teacher (index), and
        # standardize_logits (z-score both logits first, arXiv:2403.01427, e.g. DKD+LS; logits taps only).
        "terms": (),
        "teacher_combination": "average",  # multi-teacher logits: average, weighted, adaptive, partition
        "teacher_weights": (),  # 'weighted': one weight per teacher (teacher first, then extra_teachers)
        # cache the teachers' train-split outputs (logits, the taps terms read) in the data dir (fixed inputs)
        "teacher_cache": False,
        # teacher_cache with crops/flips: K replayable augmented views per example, cached once; each step
        # each example shows the student one of them, drawn at random (0: no augmentation, one fixed view)
        "teacher_cache_views": 0,
        "ema_decay": 0.999,  # teacher.checkpoint='self_ema': decay of the student's EMA teacher
        "trilateral_lookahead_lr": 0.05,  # 'trilateral' term: virtual SGD step of the ratio network's look-ahead
        # 'trilateral' term's outer (validation) objective: 'held_out_half' = the look-ahead steps on one half
        # of the batch and is scored on the other half; 'same_batch' = stepped and scored on the whole batch
        "trilateral_outer": "held_out_half",
        "hard_augment": ml_collections.ConfigDict({  # HARD learned hard augmentations, arXiv:2305.14890
            "enabled": False,
            "scale": 0.3,  # max deviation of the affine warp from the identity (normalized coordinates)
            "hidden": 32,  # augmentor MLP width
            "noise_dim": 8,  # per-sample noise fed to the augmentor
            "consistency_weight": 1.0,  # keeps the teacher's prediction on the warped image
            # share of each batch the student sees warped (the rest as it comes): with 1.0 an augmentor stuck at
            # warps the teacher itself misreads leaves the student no clean image to learn from
            "fraction": 0.5,
            # weight of the mean squared pre-tanh deviation in the augmentor's objective: without it the
            # augmentor can push tanh into saturation, where no gradient brings its warps back
            "saturation_weight": 0.1,
        }),
    })

    c.dml = ml_collections.ConfigDict({  # task 'dml': deep mutual learning, arXiv:1706.00384
        "num_students": 2,  # students trained together (model + peers)
        "peers": (),  # ({'name': ..., 'kwargs': {...}}, ...) for students 1..; default: copies of `model`
        "kl_weight": 1.0,  # weight of each student's mimicry (KL to its peers)
        "temperature": 1.0,  # softmax temperature of the mimicry KL (x T^2)
    })

    c.sla = ml_collections.ConfigDict({  # task 'sla_sd': label augmentation + self-distillation, arXiv:1910.05872
        # rotation (4 copies: 0/90/180/270 degrees), color_permutation (6 RGB orders) or rotation_color (all 24)
        "transform": "rotation",
        "temperature": 1.0,  # of the self-distillation KL (x T^2)
        "joint_weight": 1.0,  # CE of the joint (class, transformation) head over all copies
        "single_weight": 1.0,  # CE of the model's own head on the untransformed image
        "distill_weight": 1.0,  # KL from the aggregated joint prediction to the single head
    })

    c.study = ml_collections.ConfigDict({
        "seeds": (),  # non-empty: run every arm for each seed and write a results table
        # ({'name': ..., 'overrides': {'dotted.key': value}, 'seeds': (0,)}, ...); '{workdir}' and '{seed}'
        # in a value (nested too) become the study's workdir and the run's seed
        "arms": (),
        "ensembles": (),  # ({'name': ..., 'arms': (arm names)}, ...): per-seed ensembles evaluated at the end
        "title": "",  # results.md's heading (markdown), written above the table
        "description": "",  # results.md's paragraphs between the heading and the table: setup, selection rule, ...
    })
    return c


# --------------------------------------------------------------------------- loading


def load_file(spec: str) -> ml_collections.ConfigDict:
    """Runs `get_config(arg)` of `path[:arg]` and returns its ConfigDict."""
    path, _, arg = spec.partition(":")
    for i in (i for i, ch in enumerate(spec) if ch == ":"):  # a ':' may also be part of the path
        if os.path.isfile(spec[:i]):
            path, arg = spec[:i], spec[i + 1:]
            break
    else:
        if os.path.isfile(spec):
            path, arg = spec, ""
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no such file {path!r} (FILE or FILE:ARG)")
    loader = importlib.machinery.SourceFileLoader("_transferlab_config", path)  # (any file name: a .txt too)
    module_spec = importlib.util.spec_from_file_location("_transferlab_config", path, loader=loader)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:  # the user's file (sys.exit() in it too): report where, in one line
        raise ConfigError(f"--config {path}: cannot execute it: {type(e).__name__}: {e}") from e
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"--config {path}: defines no get_config(arg=None) function")
    takes_arg = bool(inspect.signature(get_config).parameters)
    if arg and not takes_arg:
        raise ConfigError(f"--config {path}: get_config() takes no argument but ':{arg}' was given")
    parsed_before = _PARSE_ARG_CALLS[0]
    config = _call_get_config(get_config, spec, path, arg or None, takes_arg)
    if arg and _PARSE_ARG_CALLS[0] == parsed_before and _ignores_its_arg(get_config, config):
        raise ConfigError(f"--config {spec}: the argument {arg!r} changes nothing (get_config returns the same "
                          "config without it, or with any other; a config file reads its arguments with "
                          "transferlab.config.parse_arg(arg, allowed=...))")
    return config


def _call_get_config(get_config, spec: str, path: str, arg, takes_arg: bool) -> ml_collections.ConfigDict:
    try:
        config = get_config(arg) if takes_arg else get_config()
    except ConfigError:
        raise
    except (Exception, SystemExit) as e:  # noqa: BLE001  (the user's code; sys.exit() in it too)
        raise ConfigError(f"--config {spec}: get_config failed: {type(e).__name__}: {e}") from e
    if not isinstance(config, (ml_collections.ConfigDict, dict)):
        raise ConfigError(f"--config {path}: get_config must return a ConfigDict, got {type(config).__name__}")
    if isinstance(config, dict):
        _check_plain_keys(config, path)
        return ml_collections.ConfigDict(config)
    return config


def _check_plain_keys(tree: dict, path: str, where: str = "") -> None:
    """A dict from get_config becomes a ConfigDict: its keys must be strings without dots."""
    for key, value in tree.items():
        if not isinstance(key, str) or "." in key or not key:
            raise ConfigError(f"--config {path}: key {where}{key!r} of the returned dict: keys are non-empty "
                              "strings without dots (nest a dict for a section: {'optimizer': {'learning_rate': ..}})")
        if isinstance(value, dict):
            _check_plain_keys(value, path, f"{where}{key}.")


def _ignores_its_arg(get_config, config) -> bool:
    """A file that does not parse its argument through `parse_arg` and returns the same config without it
    and with a made-up one: it ignores its argument. (A file that reads it itself fails on the made-up
    argument or returns another config, also when given its default value.)"""
    try:
        others = [get_config(None), get_config("transferlab-probe=1")]
        return all(isinstance(other, (ml_collections.ConfigDict, dict)) and
                   ml_collections.ConfigDict(other).to_dict() == config.to_dict() for other in others)
    except (Exception, SystemExit):  # noqa: BLE001  (it needs a real argument: it reads it)
        return False


_PARSE_ARG_CALLS = [0]  # how often config files called parse_arg: a file that never does may ignore its argument


def parse_arg(arg: str | None, allowed=None) -> dict:
    """'a=1,b=x' -> {'a': '1', 'b': 'x'} for config files' `get_config(arg)`; a key not in `allowed`
    (when given) is a ConfigError listing them."""
    _PARSE_ARG_CALLS[0] += 1
    out = {}
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"config argument {item!r}: expected key=value")
        if allowed is not None and key.strip() not in allowed:
            expected = f"expected one of {', '.join(allowed)}" if allowed else "this config file takes no arguments"
            raise ConfigError(f"config argument {key.strip()!r}: {expected}")
        out[key.strip()] = value.strip()
    return out


MAX_SEEDS = 1000  # per study (or arm): more is a typo (seeds=1000000000 exhausted the memory building them)


def int_arg(args: dict, key: str, default: int, minimum: int = 1, maximum: int | None = None) -> int:
    """Config-file argument `key` (from `parse_arg`) as an int in [`minimum`, `maximum`], else a ConfigError
    naming it (`key` 'seeds': at most MAX_SEEDS unless `maximum` says otherwise)."""
    raw = args.get(key, default)
    maximum = MAX_SEEDS if maximum is None and key == "seeds" else maximum
    try:
        value = int(str(raw).strip())
    except ValueError:
        value = None
    if value is None or value < minimum or (maximum is not None and value > maximum):
        expected = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
        raise ConfigError(f"config argument {key}={raw}: expected {expected}")
    return value


def _is_free_form(path: str) -> bool:
    return any(path == f or path.startswith(f + ".") for f in FREE_FORM)


def merge(base: ml_collections.ConfigDict, update, prefix: str = "") -> None:
    """Copies `update` into `base`; a key missing from `base` is an error naming it."""
    for key, value in update.items():
        path = f"{prefix}{key}"
        if key not in base:
            allowed = ", ".join(sorted(base.keys())) or "(none)"
            where = (f"allowed keys here: {allowed}" if base.keys()
                     else f"{prefix[:-1]!r} takes no keys here")
            raise ConfigError(f"unknown config key {path!r}; {where}")
        if isinstance(base[key], ml_collections.ConfigDict) and not _is_free_form(path):
            if not isinstance(value, (dict, ml_collections.ConfigDict)):
                raise ConfigError(f"config key {path!r} is a section; got {value!r}")
            merge(base[key], value, path + ".")
        elif _is_free_form(path):
            try:
                base[key] = _plain_entries(value)
            except (TypeError, ValueError) as e:  # ml_collections keeps a field's type (a dict for a tuple)
                raise ConfigError(f"config key {path!r}: expected {type(base[key]).__name__}, got {value!r}") from e
        else:
            base[key] = _coerce(path, base[key], value)


def _plain_entries(value):
    """A free-form list whose entries are ConfigDicts (natural in a config file: `distill.terms =
    (ml_collections.ConfigDict({...}),)`) as plain dicts, as the rest of the library reads them."""
    if isinstance(value, (tuple, list)):
        return type(value)(v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v for v in value)
    return value


def _coerce(path: str, default, value):
    """Checks `value` against the type of the default; ints may become floats."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, (tuple, list)):
        if isinstance(value, (tuple, list)):
            return tuple(value)
    else:
        return value
    raise ConfigError(f"config key {path!r}: expected {type(default).__name__}, got {value!r}")


def parse_override(text: str) -> tuple[str, str]:
    """'--config.a.b=3' (or 'a.b=3') -> ('a.b', '3')."""
    body = text[len("--config."):] if text.startswith("--config.") else text
    key, sep, value = body.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected --config.KEY=VALUE")
    return key, value


def apply_override(config: ml_collections.ConfigDict, key: str, raw, parse_strings: bool = True) -> None:
    """Sets dotted `key` from a command-line string (or a Python value: `parse_strings=False` takes a string
    as a string, as a study arm's overrides, written in Python, mean it)."""
    if not isinstance(key, str) or not key:
        raise ConfigError(f"override key {key!r}: expected a dotted config key such as 'optimizer.learning_rate'")
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(f"unknown config key {'.'.join(parts[:i + 1])!r} in override {key!r}")
        node = node[part]
    leaf = parts[-1]
    free = _is_free_form(key) and key not in FREE_FORM
    if not isinstance(node, ml_collections.ConfigDict) or (leaf not in node and not free):
        if not isinstance(node, ml_collections.ConfigDict):  # inside a list or a value: set it whole
            parent = ".".join(parts[:-1])
            raise ConfigError(f"unknown config key {key!r}: {parent!r} is a {type(node).__name__}, not a section; "
                              f"set it whole (--config.{parent}=...)")
        raise ConfigError(f"unknown config key {key!r}; allowed keys here: {', '.join(sorted(node.keys()))}")
    value = _parse_literal(raw) if isinstance(raw, str) and parse_strings else raw
    if leaf in node and isinstance(node[leaf], str) and isinstance(raw, str):
        value = raw  # strings are taken verbatim
    if free or _is_free_form(key):
        try:
            node[leaf] = _plain_entries(value)
        except (TypeError, ValueError) as e:  # ml_collections keeps a field's type
            kind = type(node[leaf]).__name__
            hint = " (not a valid Python literal)" if isinstance(value, str) and isinstance(raw, str) else ""
            raise ConfigError(f"config key {key!r}: expected {kind}, got {raw!r}{hint}") from e
    elif isinstance(node[leaf], ml_collections.ConfigDict):
        raise ConfigError(f"config key {key!r} is a section; override its fields instead")
    else:
        node[leaf] = _coerce(key, node[leaf], value)


def _parse_literal(raw: str):
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        return raw


def load(spec: str, overrides=()) -> ml_collections.ConfigDict:
    """defaults() <- config file <- overrides, then `validate`."""
    config = defaults()
    merge(config, load_file(spec))
    keys = []
    for text in overrides:
        key, raw = parse_override(text)
        apply_override(config, key, raw)
        keys.append(key)
    _check_study_overrides(config, keys)
    validate(config)
    return config


def _check_study_overrides(config, keys) -> None:
    """A command-line override that a study would silently overrule (an arm sets the same key, or the
    study's seeds replace `seed`) is a ConfigError."""
    arms = [dict(a) for a in config.study.arms if isinstance(a, dict)]
    for key in keys:
        if key == "seed" and arms and (config.study.seeds or any(a.get("seeds") for a in arms)):
            raise ConfigError("override 'seed': a study's runs take their seeds from study.seeds (and its arms' "
                              "seeds); override study.seeds instead")
        for arm in arms:
            for set_by_arm in dict(arm.get("overrides", {})):
                if set_by_arm == key or set_by_arm.startswith(key + ".") or key.startswith(set_by_arm + "."):
                    raise ConfigError(f"override {key!r}: study arm {arm.get('name')!r} sets {set_by_arm!r} "
                                      "itself and would overrule it; change it in the config file (or through "
                                      "the file's arguments, e.g. quickstart.py:steps=100)")


def from_dict(update, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """Builds a validated config in Python (tests, notebooks): defaults <- update <- overrides."""
    config = defaults()
    merge(config, update)
    for key, value in (overrides or {}).items():
        apply_override(config, key, value)
    validate(config)
    return config


# --------------------------------------------------------------------------- validation


def parse_mesh_shape(text: str) -> dict[str, int]:
    """'data=-1,fsdp=2' -> {'data': -1, 'fsdp': 2}, checked for names and values."""
    shape = {}
    for item in filter(None, text.replace(" ", "").split(",")):
        name, sep, size = item.partition("=")
        if not sep or name not in MESH_AXES:
            raise ConfigError(f"mesh_shape {text!r}: expected axes from {MESH_AXES} as name=size")
        try:
            shape[name] = int(size)
        except ValueError:
            raise ConfigError(f"mesh_shape {text!r}: size of {name!r} must be an integer") from None
        if shape[name] == 0 or shape[name] < -1:
            raise ConfigError(f"mesh_shape {text!r}: size of {name!r} must be positive or -1")
    if list(shape.values()).count(-1) > 1:
        raise ConfigError(f"mesh_shape {text!r}: at most one axis may be -1")
    return {axis: shape.get(axis, 1) for axis in MESH_AXES}


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"config key {key!r}: {value!r} is not one of {', '.join(allowed)}")


def value_at(config, key: str):
    """The value at dotted `key` ('optimizer.momentum')."""
    value = config
    for part in key.split("."):
        value = value[part]
    return value


def _positive(config, *keys, allow_zero=False) -> None:
    for key in keys:
        value = value_at(config, key)
        if value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"config key {key!r} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks names and values that need no compute (registries, ranges, regexes)."""
    from transferlab import data, losses  # registries; imported lazily

    _choice("task", config.task, TASKS)
    _check_finite(to_plain(config))
    _choice("selection", config.selection, SELECTIONS)
    _choice("optimizer.name", config.optimizer.name, OPTIMIZERS)
    _choice("schedule.name", config.schedule.name, SCHEDULES)
    _choice("sla.transform", config.sla.transform, ("rotation", "color_permutation", "rotation_color"))
    _choice("distill.trilateral_outer", config.distill.trilateral_outer, ("held_out_half", "same_batch"))
    _positive(config, "sla.temperature")
    _positive(config, "sla.joint_weight", "sla.single_weight", "sla.distill_weight", allow_zero=True)
    _positive(config, "total_steps", "batch_size", "log_every_steps", "keep_checkpoints",
              "optimizer.accumulate_steps")
    _positive(config, "eval_every_steps", "checkpoint_every_steps", "eval_batch_size",
              "optimizer.learning_rate", "optimizer.weight_decay", "optimizer.clip_grad_norm",
              "schedule.warmup_steps", "augment.crop_padding", "augment.mixup_alpha",
              "augment.cutmix_alpha", allow_zero=True)
    _positive(config, "dml.temperature", "distill.trilateral_lookahead_lr", "distill.hard_augment.scale",
              "distill.hard_augment.hidden", "distill.hard_augment.noise_dim")
    _positive(config, "distill.ce_weight", "dml.kl_weight", "distill.hard_augment.consistency_weight",
              "distill.hard_augment.saturation_weight", allow_zero=True)
    if config.total_steps >= 2 ** 31:
        raise ConfigError(f"config key 'total_steps': {config.total_steps} does not fit the int32 step counter "
                          "(at most 2**31 - 1)")
    if not 0 <= config.seed < 2 ** 32:
        raise ConfigError(f"config key 'seed': expected an integer in [0, 2**32), got {config.seed}")
    _positive(config, "dataset.worker_count", allow_zero=True)
    for key in ("train_split", "eval_split"):
        if not config.dataset[key]:
            raise ConfigError(f"config key 'dataset.{key}': must name a split (e.g. 'train', 'validation')")
    for key in ("optimizer.momentum", "optimizer.b1", "optimizer.b2"):
        value = value_at(config, key)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"config key {key!r} must be in [0, 1), got {value}")
    _positive(config, "optimizer.eps")
    check_schedule("schedule", config.schedule, config.total_steps)
    # (an eval split sharing examples with test_split is refused by the Trainer, which knows the split sizes)
    if config.selection == "best" and "test" in data.split_names(config.dataset.eval_split):
        raise ConfigError(f"config key 'dataset.eval_split': {config.dataset.eval_split!r} reads the 'test' split, "
                          "and selection='best' would select the model on test data; use a validation split (or "
                          "one held out of train, e.g. 'train[90%:]')")
    if config.task != "kd" and not config.study.arms:  # (a study's arms are validated with their overrides)
        for key, unused in (("distill.terms", config.distill.terms), ("teacher.checkpoint", config.teacher.checkpoint),
                            ("extra_teachers", config.extra_teachers)):
            if unused:
                raise ConfigError(f"config key {key!r} is set but task is {config.task!r}, which has no teacher; "
                                  "set task='kd' to distil")
    if config.task == "dml":
        if config.dml.num_students < 2:
            raise ConfigError(f"config key 'dml.num_students': mutual learning needs at least 2 students, got "
                              f"{config.dml.num_students}")
        for i, peer in enumerate(config.dml.peers):
            if not isinstance(peer, dict) or "name" not in peer:
                raise ConfigError(f"dml.peers[{i}]: expected a model section like {{'name': 'resnet8'}}, got {peer!r}")
            check_model_section(f"dml.peers[{i}]", peer)
        if len(config.dml.peers) + 1 > config.dml.num_students:
            raise ConfigError(f"config key 'dml.num_students': {config.dml.num_students} students, but model plus "
                              f"{len(config.dml.peers)} dml.peers are {len(config.dml.peers) + 1}; set "
                              f"dml.num_students={len(config.dml.peers) + 1}")
    if not 0.0 < config.distill.hard_augment.fraction <= 1.0:
        raise ConfigError("config key 'distill.hard_augment.fraction' must be in (0, 1], got "
                          f"{config.distill.hard_augment.fraction}")
    if not 0.0 <= config.distill.ema_decay <= 1.0:
        raise ConfigError(f"config key 'distill.ema_decay' must be in [0, 1], got {config.distill.ema_decay}")
    weights = config.distill.teacher_weights
    if weights and (not all(isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w < float("inf")
                            for w in weights) or sum(weights) <= 0):
        raise ConfigError(f"config key 'distill.teacher_weights': expected numbers >= 0 with a positive sum, "
                          f"got {tuple(weights)}")
    parse_mesh_shape(config.mesh_shape)
    if not re.fullmatch(SELECTION_METRICS, config.selection_metric):
        raise ConfigError(f"config key 'selection_metric': {config.selection_metric!r} is not a higher-is-better "
                          "eval metric; expected accuracy, top5_accuracy, teacher_agreement (kd), "
                          "ensemble_accuracy or peerK_accuracy (dml), "
                          "aggregated_accuracy or joint_accuracy (sla_sd)")
    if config.optimizer.freeze:
        _regex("optimizer.freeze", config.optimizer.freeze)
    for i, rule in enumerate(config.sharding_rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and rule[1] in ("replicate", "fsdp")):
            raise ConfigError(f"sharding_rules[{i}]: expected (regex, 'replicate'|'fsdp'), got {rule!r}")
        _regex(f"sharding_rules[{i}]", rule[0])
    known = set(data.offline_names()) | set(_tfds_names())
    base = data.base_name(config.dataset.name)
    if base not in known:  # or a dataset of the user's own, prepared with tfds elsewhere and copied here
        root = data.resolve_data_dir(config.dataset.data_dir or None)
        if not (base and (root / base).is_dir()):
            raise ConfigError(f"config key 'dataset.name': unknown dataset {config.dataset.name!r}; expected an "
                              f"offline dataset ({', '.join(data.offline_names())}), a tfds dataset name, or a "
                              f"dataset prepared under {root}")
    check_model_section("model", config.model)
    if config.task == "kd" and config.teacher.checkpoint != "self_ema":
        if config.teacher.name:
            check_model_section("teacher", config.teacher)
        else:  # (the student's architecture, born-again)
            _choice("teacher.dtype", config.teacher.dtype, DTYPES)
        for i, extra in enumerate(config.extra_teachers):
            if not isinstance(extra, dict):
                raise ConfigError(f"extra_teachers[{i}]: expected {{'name': ..., 'checkpoint': ...}}, got {extra!r}")
            check_model_section(f"extra_teachers[{i}]", extra)
        if config.distill.teacher_weights and config.distill.teacher_combination != "weighted":
            raise ConfigError(f"config key 'distill.teacher_weights' is set but teacher_combination is "
                              f"{config.distill.teacher_combination!r}; set teacher_combination='weighted'")
        if not config.distill.terms and config.distill.ce_weight == 0:
            raise ConfigError("distill: no loss terms and ce_weight == 0: nothing to train")
        if config.distill.ce_weight == 0 and all(isinstance(t, dict) and dict(t).get("weight", 1.0) == 0
                                                 for t in config.distill.terms):
            raise ConfigError("distill: ce_weight == 0 and every term's weight is 0: nothing to train")
        for i, term in enumerate(config.distill.terms):
            if not isinstance(term, dict):
                raise ConfigError(f"distill.terms[{i}]: expected a dict like {{'name': 'kd', 'weight': 1.0}}, "
                                  f"got {term!r}")
            term = dict(term)
            if "name" not in term:
                raise ConfigError(f"distill.terms[{i}]: missing 'name'")
            name = term.pop("name")
            if name not in losses.names():
                raise unknown_name(f"loss (distill.terms[{i}].name)", name, losses.names())
            for key in TERM_KEYS:
                term.pop(key, None)
            try:
                losses.resolve_hparams(name, term)
            except ConfigError as e:
                raise ConfigError(f"distill.terms[{i}]: {e}") from None
    if not config.study.arms:
        _check_sections_used(config)
    # (and the names that mark a single run's workdir, which the CLI refuses to run a study in)
    _check_study(config.study, reserved={"results.json", "results.md", config.xla_cache_dir, "checkpoints",
                                         "config.json", "study.json"})


def _check_seeds(where: str, seeds) -> None:
    if (not isinstance(seeds, (tuple, list))
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise ConfigError(f"{where}: seeds must be a list of ints >= 0, got {seeds!r}")
    if len(seeds) > MAX_SEEDS:
        raise ConfigError(f"{where}: {len(seeds)} seeds; at most {MAX_SEEDS}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: seeds {tuple(seeds)!r} repeat a seed")


def _check_run_name(where: str, name, taken: set, reserved: set) -> None:
    """Arms and ensembles are directories of the study's workdir: plain names, each used once, none the
    study's own files (results.json, results.md, the compilation cache) nor a single run's marks."""
    if not isinstance(name, str) or not re.fullmatch(r"[\w.+=-]+", name) or name in (".", ".."):
        raise ConfigError(f"{where}: name {name!r} must be a plain directory name (letters, digits, _ . + = -)")
    if name in taken:
        raise ConfigError(f"{where}: name {name!r} is used by an earlier arm or ensemble")
    if name in reserved:
        raise ConfigError(f"{where}: name {name!r} is taken by the study's own files ({', '.join(sorted(reserved))})")
    taken.add(name)


def _check_study(study, reserved: set) -> None:
    """study.seeds, arms and ensembles: well-formed, names usable as directories, nothing silently ignored."""
    _check_seeds("study", study.seeds)
    reserved = {r for r in reserved if r}
    names = set()
    for i, arm in enumerate(study.arms):
        if not isinstance(arm, dict) or "name" not in arm or not set(arm) <= {"name", "overrides", "seeds"}:
            raise ConfigError(f"study.arms[{i}]: expected a dict with name, overrides, seeds; got {arm!r}")
        name = arm["name"]
        _check_run_name(f"study.arms[{i}]", name, names, reserved)
        _check_seeds(f"study.arms[{i}] ({name})", arm.get("seeds", ()))
        overrides = arm.get("overrides", {})
        if not isinstance(overrides, dict):
            raise ConfigError(f"study.arms[{i}] ({name}): overrides must be a dict of dotted keys, got {overrides!r}")
        for key in overrides:
            if not isinstance(key, str) or not key:
                raise ConfigError(f"study.arms[{i}] ({name}): override key {key!r}: expected a dotted config key "
                                  "such as 'optimizer.learning_rate'")
            if key == "seed":
                raise ConfigError(f"study.arms[{i}] ({name}): overrides 'seed', which the study sets for each of its "
                                  "runs; give the arm 'seeds' instead")
            if str(key) == "study" or str(key).startswith("study."):
                raise ConfigError(f"study.arms[{i}] ({name}): overrides {key!r}; an arm's run is not a study")
    arms = set(names)
    for i, ens in enumerate(study.ensembles):
        if (not isinstance(ens, dict) or set(ens) != {"name", "arms"} or not isinstance(ens["arms"], (tuple, list))
                or not ens["arms"] or not set(ens["arms"]) <= arms):
            raise ConfigError(f"study.ensembles[{i}]: expected {{'name': ..., 'arms': (arm names)}} with at least "
                              f"one arm from {sorted(arms)}; got {ens!r}")
        _check_run_name(f"study.ensembles[{i}]", ens["name"], names, reserved)


# section -> the tasks that read it; elsewhere a changed key would be silently ignored
TASK_SECTIONS = {"distill": ("kd",), "teacher": ("kd",), "dml": ("dml",), "sla": ("sla_sd",)}


def _check_sections_used(config) -> None:
    """A key changed from its default in a section the task never reads, or in `teacher` where the teacher is
    the student's own model (born-again, self_ema), is a ConfigError naming it."""
    base = defaults()
    for section, tasks in TASK_SECTIONS.items():
        given = _flat(to_plain(config[section]), section + ".")
        default = _flat(to_plain(base[section]), section + ".")
        changed = [k for k in given if given[k] != default.get(k, given[k]) or (k not in default and given[k])]
        if config.task not in tasks and changed:
            raise ConfigError(f"config key {changed[0]!r} is set but task is {config.task!r}, which does not use "
                              f"the {section!r} section (used by task {' or '.join(map(repr, tasks))})")
    if config.task == "kd" and (not config.teacher.name or config.teacher.checkpoint == "self_ema"):
        own = ("teacher.checkpoint='self_ema' (an EMA of the student)" if config.teacher.checkpoint == "self_ema"
               else "teacher.name is '' (born-again: the student's own architecture)")
        keys = (("teacher.name", config.teacher.name), ("teacher.kwargs", dict(config.teacher.kwargs)),
                ("teacher.dtype", config.teacher.dtype != "float32"))
        for key, value in keys:
            if value:
                raise ConfigError(f"config key {key!r} is set but {own}: the teacher takes the student's model "
                                  "name, kwargs and dtype; unset it")


FLOAT32_MAX = 3.4028234663852886e38


def _check_finite(tree, path: str = "") -> None:
    """Every float in the config (hparams of terms included) must be finite."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            _check_finite(value, f"{path}.{key}" if path else str(key))
    elif isinstance(tree, (tuple, list)):
        for i, value in enumerate(tree):
            _check_finite(value, f"{path}[{i}]")
    elif isinstance(tree, float) and not math.isfinite(tree):
        raise ConfigError(f"config key {path!r}: expected a finite number, got {tree}")
    elif isinstance(tree, float) and abs(tree) > FLOAT32_MAX:  # (the train step computes in float32: inf)
        raise ConfigError(f"config key {path!r}: {tree} is beyond float32's range (±{FLOAT32_MAX:.4g})")


def check_schedule(where: str, section, total_steps: int) -> None:
    """A `schedule`-like section (the learning rate's, or a loss term's `weight_schedule` at `where`): a known
    name, decay_factor > 0, end_factor >= 0, warm-up within the run, boundaries only for 'step', each a step
    before total_steps or a fraction of it."""
    _choice(f"{where}.name", section.name, SCHEDULES)
    for key, allow_zero in (("decay_factor", False), ("end_factor", True), ("warmup_steps", True)):
        value = section[key]
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0
                or (value == 0 and not allow_zero)):
            raise ConfigError(f"config key '{where}.{key}' must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    if section.warmup_steps > total_steps:
        raise ConfigError(f"config key '{where}.warmup_steps': {section.warmup_steps} is more than "
                          f"total_steps {total_steps}")
    if section.boundaries and section.name != "step":
        raise ConfigError(f"config key '{where}.boundaries' is set but {where}.name is "
                          f"{section.name!r}; boundaries are for the 'step' schedule")
    for b in section.boundaries:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or b <= 0 or (isinstance(b, float) and b >= 1):
            raise ConfigError(f"config key '{where}.boundaries': {b!r} is neither a step (int >= 1) nor a "
                              "fraction of total_steps (float in (0, 1))")
        if isinstance(b, int) and b >= total_steps:
            raise ConfigError(f"config key '{where}.boundaries': step {b} is not before total_steps "
                              f"{total_steps}, so it would never apply")


def check_model_section(section: str, model) -> None:
    """A `model`-like section (`model`, `teacher`, an extra teacher, a DML peer; a ConfigDict or a dict): a
    registered name, a known dtype (default float32), arguments the model takes."""
    from transferlab import models
    name, dtype = dict(model).get("name"), dict(model).get("dtype", "float32")
    if name not in models.names():
        raise unknown_name(f"model ({section}.name)", name, models.names())
    _choice(f"{section}.dtype", dtype, DTYPES)
    _check_model_kwargs(section, model)


def _check_model_kwargs(section: str, model) -> None:
    """Constructing a linen module is cheap and checks its kwargs (no params are made)."""
    from transferlab import models
    model = dict(model)
    kwargs = model.get("kwargs", {})
    if not isinstance(kwargs, (dict, ml_collections.ConfigDict)):
        raise ConfigError(f"config key '{section}.kwargs': expected a dict of the model's arguments, got {kwargs!r}")
    try:
        models.create(model["name"], num_classes=10, **dict(kwargs))
    except ConfigError as e:
        raise ConfigError(f"config key '{section}.kwargs': {e}") from None


def _tfds_names() -> list[str]:
    import tensorflow_datasets as tfds
    return tfds.list_builders(with_community_datasets=False)


def _regex(key: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"config key {key!r}: invalid regex {pattern!r}: {e}") from None


# Keys that may differ between a run and its resume (or a study's finished run and its rerun) without
# changing what is trained: bookkeeping, where the data and caches live, how the devices are laid out.
NOT_COMPARED = ("study", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "mesh_shape",
                "eval_batch_size", "xla_cache_dir", "dataset.data_dir", "dataset.worker_count")

# Keys added with a default that changed what a run trains: a saved run that lacks one (it predates the key) ran
# with the value given here, wherever the switch (second) was on; so resuming it under the new default is a
# difference, not a silent change of recipe. key -> (the value before the key existed, the switch).
ADDED_WITH_NEW_BEHAVIOUR = {
    "distill.hard_augment.fraction": (1.0, "distill.hard_augment.enabled"),  # 2026-11-28: all images warped
    "distill.hard_augment.saturation_weight": (0.0, "distill.hard_augment.enabled"),  # 2026-11-28: no penalty
}


def _flat(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def first_difference(saved: dict, config, run_dir: str | None = None) -> str | None:
    """'key: saved A, now B' for the first key whose value in `saved` (a run's config.json) differs from
    `config`'s, or None. Keys in NOT_COMPARED are ignored, and so are keys of the fixed sections that only
    one side has (added to `defaults()` since); a key inside a free-form section (`model.kwargs`, ...) that
    only one side sets is a difference (`hidden_sizes` given now, the model's default before).

    With `run_dir` (where that run is now), a teacher or init checkpoint that moved along with the run is
    the same one: a study directory copied from a pod, or renamed, still resumes and reports."""
    now = _same_paths(_flat(json.loads(json.dumps(to_plain(config), default=str))))
    saved_cwd = saved.get("_cwd") if isinstance(saved.get("_cwd"), str) else None  # (recorded since 2026-11-28)
    before = _same_paths(_flat({k: v for k, v in saved.items() if not k.startswith("_")}), saved_cwd)
    if run_dir is not None:
        _follow_moved_paths(before, now, saved.get("_run_dir"), os.path.abspath(run_dir))
    for key, (value_then, switch) in ADDED_WITH_NEW_BEHAVIOUR.items():
        if key not in before and before.get(switch):
            before[key] = value_then
    unset = object()
    for key in sorted(set(now) | set(before)):
        if any(key == skip or key.startswith(skip + ".") for skip in NOT_COMPARED):
            continue
        if (key not in now or key not in before) and not _is_free_form(key):
            continue
        was, is_ = before.get(key, unset), now.get(key, unset)
        if was != is_:
            return f"{key}: saved {_short_or_unset(was, unset)}, now {_short_or_unset(is_, unset)}"
    return None


# Values that name a run directory (a teacher's, an init checkpoint's) unless one of these words.
_PATH_KEYS = ("teacher.checkpoint", "init_checkpoint")
_NOT_PATHS = ("", "random", "self_ema")


def _same_paths(flat: dict, cwd: str | None = None) -> dict:
    """`flat` with run-directory values made absolute (relative ones from `cwd`, default the current
    directory) and normal ('runs/t/' and '/home/me/runs/t' from /home/me are one teacher), also each extra
    teacher's `checkpoint`."""
    def norm(path):
        if not isinstance(path, str) or path in _NOT_PATHS:
            return path
        return os.path.normpath(os.path.join(cwd, path)) if cwd else os.path.abspath(path)
    out = dict(flat)
    for key in _PATH_KEYS:
        if key in out:
            out[key] = norm(out[key])
    if isinstance(out.get("extra_teachers"), list):
        out["extra_teachers"] = [{**t, "checkpoint": norm(t["checkpoint"])} if isinstance(t, dict)
                                 and "checkpoint" in t else t for t in out["extra_teachers"]]
    return out


def _moved_along(saved_path: str, now_path: str, saved_run_dir, run_dir: str) -> bool:
    """Whether `saved_path` (absolute, recorded by a run then in `saved_run_dir`) is `now_path` after the
    run moved to `run_dir`: the same path relative to the run, the run did move, and nothing is left at
    `saved_path` (a teacher still there is another one than `now_path`'s). Runs that did not record their
    directory (before 2026-11-28) are taken to have moved with their whole study: `saved_path` ends with
    the part of `now_path` below the closest directory it shares with `run_dir`."""
    def depth(path):
        return len([p for p in path.split(os.sep) if p])
    if os.path.exists(saved_path) or (isinstance(saved_run_dir, str) and saved_run_dir == run_dir):
        return False
    relative = os.path.relpath(now_path, run_dir)
    parts = relative.split(os.sep)
    tail = [p for p in parts if p != os.pardir]
    ups = len(parts) - len(tail)
    if not tail or not 0 < ups < depth(run_dir):  # (the shared directory must be one below the root)
        return False
    if isinstance(saved_run_dir, str):
        return os.path.relpath(saved_path, saved_run_dir) == relative and ups < depth(saved_run_dir)
    return depth(saved_path) > len(tail) and saved_path.split(os.sep)[-len(tail):] == tail


def _follow_moved_paths(before: dict, now: dict, saved_run_dir, run_dir: str) -> None:
    """In `before`, each run-directory value that is `now`'s after the run moved becomes `now`'s."""
    def same(was, is_):
        return (isinstance(was, str) and isinstance(is_, str) and was not in _NOT_PATHS and is_ not in _NOT_PATHS
                and _moved_along(was, is_, saved_run_dir, run_dir))
    for key in _PATH_KEYS:
        if key in before and key in now and same(before[key], now[key]):
            before[key] = now[key]
    was, is_ = before.get("extra_teachers"), now.get("extra_teachers")
    if isinstance(was, list) and isinstance(is_, list) and len(was) == len(is_):
        before["extra_teachers"] = [
            {**w, "checkpoint": i["checkpoint"]} if isinstance(w, dict) and isinstance(i, dict)
            and same(w.get("checkpoint"), i.get("checkpoint")) else w for w, i in zip(was, is_)]


def _short_or_unset(value, unset) -> str:
    return "unset (the default)" if value is unset else _short(value)


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def to_plain(config) -> dict:
    """A JSON-ready copy of a ConfigDict."""
    return ml_collections.ConfigDict(config).to_dict() if not isinstance(config, dict) else config

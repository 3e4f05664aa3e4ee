"""Optimizers and learning-rate schedules from `config.optimizer` / `config.schedule`.

SGD adds L2 weight decay to the gradient before momentum (as PyTorch's SGD,
which the CIFAR KD recipes use); AdamW and Adafactor decay decoupled. Norm
scales and biases (any 1-D parameter) are not decayed unless
`decay_norms_and_biases`. Parameters matching `optimizer.freeze` get zero
updates. Gradient accumulation is done by the trainer (micro-batches inside
one jitted step), so one call of the optimizer is always one update.
"""

from __future__ import annotations

import re

import jax
import optax

from transferlab.errors import ConfigError
from transferlab.parallel import path_str


def make_schedule(config) -> optax.Schedule:
    """The learning rate's schedule (`config.schedule`, peak `optimizer.learning_rate`)."""
    return schedule_from(config.schedule, config.optimizer.learning_rate, config.total_steps)


def schedule_from(section, peak: float, total_steps: int) -> optax.Schedule:
    """Warmup (linear from 0) followed by constant / cosine / step / linear decay of `peak` by step
    `total_steps`; `section` has a `schedule` section's keys (name, warmup_steps, boundaries: steps or
    fractions of total_steps, decay_factor, end_factor). The learning rate's and a loss term's weight's."""
    s, peak, total = section, float(peak), total_steps
    warmup = min(s.warmup_steps, total)
    decay_steps = max(total - warmup, 1)
    if s.name == "constant":
        main = optax.constant_schedule(peak)
    elif s.name == "cosine":
        main = optax.cosine_decay_schedule(peak, decay_steps, alpha=s.end_factor)
    elif s.name == "linear":
        main = optax.linear_schedule(peak, peak * s.end_factor, decay_steps)
    else:  # step
        scales = {}  # boundaries that land on one step (5 and 0.25 of 20; several inside the warm-up) all apply
        for b in s.boundaries:
            at = max((int(round(b * total)) if isinstance(b, float) and b < 1 else int(b)) - warmup, 0)
            scales[at] = scales.get(at, 1.0) * s.decay_factor
        main = optax.piecewise_constant_schedule(peak, scales)
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def decay_mask(params, decay_norms_and_biases: bool = False):
    """True for leaves that get weight decay: matrices/kernels, not 1-D scales and biases."""
    return jax.tree.map(lambda p: decay_norms_and_biases or p.ndim > 1, params)


def frozen_labels(params, pattern: str):
    """'frozen' for leaves whose path matches `pattern`, else 'trained'."""
    regex = re.compile(pattern) if pattern else None
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if regex and regex.search(path_str(path)) else "trained", params)


def make_optimizer(config, params) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax transformation for `params` and its learning-rate schedule."""
    o = config.optimizer
    schedule = make_schedule(config)
    mask = lambda p: decay_mask(p, o.decay_norms_and_biases)  # noqa: E731 (callable: works under freeze)
    if o.name == "sgd":
        parts = [optax.add_decayed_weights(o.weight_decay, mask)] if o.weight_decay else []
        parts.append(optax.sgd(schedule, momentum=o.momentum or None, nesterov=o.nesterov))
        tx = optax.chain(*parts)
    elif o.name == "adamw":
        tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask)
    else:  # adafactor
        tx = optax.adafactor(schedule, weight_decay_rate=o.weight_decay or None, weight_decay_mask=mask)
    if o.clip_grad_norm:
        tx = optax.chain(optax.clip_by_global_norm(o.clip_grad_norm), tx)
    if o.freeze:
        labels = frozen_labels(params, o.freeze)
        if "frozen" not in jax.tree.leaves(labels):  # a typo would silently train everything
            paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
            raise ConfigError(f"config key 'optimizer.freeze': {o.freeze!r} matches no parameter; paths look like "
                              f"{', '.join(paths[:3])}")
        if "trained" not in jax.tree.leaves(labels):
            raise ConfigError(f"config key 'optimizer.freeze': {o.freeze!r} matches every parameter; nothing would "
                              "train")
        tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule

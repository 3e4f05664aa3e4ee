"""Pieces every task shares: model construction, forward passes, cross-entropy and top-k."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from transferlab import models

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(section, num_classes: int):
    """A linen module from a `model`/`teacher` config section."""
    return models.create(section.name, num_classes=num_classes, dtype=DTYPES[section.dtype],
                         **dict(section.kwargs))


def init_model(model, rng, images):
    """(params, model_state) of `model` for inputs shaped like `images`."""
    variables = dict(model.init({"params": rng}, images, train=False))
    params = variables.pop("params")
    variables.pop("intermediates", None)
    return params, variables


def forward(model, params, model_state, images, train: bool, taps: bool = False):
    """Runs the model; returns (logits, new_model_state, intermediates or {})."""
    mutable = (["batch_stats"] if train and "batch_stats" in model_state else []) + (["intermediates"] if taps else [])
    variables = {"params": params, **model_state}
    if not mutable:
        return model.apply(variables, images, train=train), model_state, {}
    logits, updates = model.apply(variables, images, train=train, mutable=mutable)
    updates = dict(updates)
    intermediates = updates.pop("intermediates", {})
    new_state = {**model_state, **updates} if train else model_state
    return logits, new_state, flatten_taps(intermediates)


def flatten_taps(intermediates) -> dict:
    """{'stage1': array, ...} from flax's sown {'stage1': (array,)} (nested module names joined by '/')."""
    out = {}
    for path, value in jax.tree_util.tree_flatten_with_path(
            intermediates, is_leaf=lambda x: isinstance(x, tuple))[0]:
        names = [str(getattr(k, "key", k)) for k in path]
        out["/".join(names)] = value[0] if isinstance(value, tuple) and len(value) == 1 else value
    return out


def targets(batch, num_classes: int):
    """Soft targets: `label_soft` from mixup/cutmix when present, else one-hot labels."""
    if "label_soft" in batch:
        return batch["label_soft"]
    return jax.nn.one_hot(batch["label"], num_classes)


def cross_entropy(logits, soft_targets):
    """Mean cross-entropy against (possibly soft) targets."""
    return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), soft_targets))


def classification_sums(logits, labels, mask) -> dict:
    """Masked sums for eval: loss, top-1 and top-5 correct, and the example count."""
    logits = logits.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    k = min(5, logits.shape[-1])
    top_k = jax.lax.top_k(logits, k)[1]
    top1 = (top_k[:, 0] == labels).astype(jnp.float32)
    top5 = jnp.any(top_k == labels[:, None], axis=-1).astype(jnp.float32)
    return {"loss": jnp.sum(loss * mask), "accuracy": jnp.sum(top1 * mask),
            "top5_accuracy": jnp.sum(top5 * mask), "count": jnp.sum(mask)}


def train_accuracy(logits, labels, soft_labels=None):
    """Top-1 accuracy against `labels`; under mixup/cutmix (`soft_labels`, [B, K]) the target weight of the
    predicted class (lam for the first image's class, 1 - lam for the second's; mixup, arXiv:1710.09412)."""
    predicted = jnp.argmax(logits, -1)
    if soft_labels is not None:
        return jnp.mean(jnp.take_along_axis(soft_labels.astype(jnp.float32), predicted[:, None], axis=-1))
    return jnp.mean((predicted == labels).astype(jnp.float32))

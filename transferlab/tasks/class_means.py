"""The teacher's class-mean features over the training split, for the ND loss.

ND ("Improving Knowledge Distillation via Regularizing Feature Norm and
Direction", arXiv:2305.17007) aligns each student feature with the direction of
its class's mean teacher feature, the mean taken over the whole training set with
the frozen teacher before the student trains. This computes those means once per
run (un-augmented train images, teacher in eval mode, float64 accumulation on the
host), for a `nd` term with `class_means: 'train'` (the KD task's default).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from transferlab import data, parallel
from transferlab.errors import UserError
from transferlab.tasks import common


def _host(x):
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True) if jax.process_count() > 1
                      else jax.device_get(x))


def teacher_class_means(model, variables, tap: str, config, mesh, batch_size: int, num_classes: int) -> np.ndarray:
    """[K, ...] float32: the mean of the teacher's `tap` over the train examples of each class.

    UserError if a class has no training example (its direction would be undefined).
    """

    def forward(v, x):
        logits, _, taps = common.forward(model, v["params"], v["model_state"], x, train=False, taps=True)
        return {**taps, "logits": logits}[tap].astype(jnp.float32)

    forward = jax.jit(forward)
    sums, counts = None, np.zeros((num_classes,), np.int64)
    for local in data.eval_batches(config.dataset.name, config.dataset.train_split, batch_size,
                                   data_dir=config.dataset.data_dir or None,
                                   process_index=jax.process_index(), process_count=jax.process_count()):
        batch = parallel.global_batch(mesh, local)
        feats = _host(forward(variables, batch["image"])).astype(np.float64)
        labels, mask = _host(batch["label"]), _host(batch["mask"]).astype(bool)
        if sums is None:
            sums = np.zeros((num_classes,) + feats.shape[1:], np.float64)
        np.add.at(sums, labels[mask], feats[mask])
        counts += np.bincount(labels[mask], minlength=num_classes)
    if sums is None or (counts == 0).any():
        missing = [] if sums is None else np.flatnonzero(counts == 0).tolist()
        raise UserError(f"nd class_means='train': no training examples of classes {missing or 'any'} in "
                        f"{config.dataset.name}:{config.dataset.train_split}")
    return (sums / counts.reshape((-1,) + (1,) * (sums.ndim - 1))).astype(np.float32)

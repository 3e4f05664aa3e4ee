"""Teacher-output caching: teacher logits computed once over the train split, stored in the
data directory, and looked up by example index instead of running the teacher each step.

Valid only when the student sees the same fixed inputs the cache was made from,
so it requires augmentation off (no crop, flip, mixup or cutmix) and logits-only
distillation terms. Files live at
`<data_dir>/transferlab_teacher_cache/<dataset>-<split>-<key>.npy`, where the key
hashes the teacher's architecture, checkpoint directory, selected step and weights
(`weights_fingerprint`: a teacher retrained in the same directory gets a new file);
they are written atomically and reused by later runs. On creation and on reuse the cached
rows of the first batch are checked against a live teacher forward (the same jitted
function, so a bfloat16 teacher agrees too: a stale or misordered file does not).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from transferlab import data, parallel
from transferlab.errors import ConfigError, UserError
from transferlab.tasks import common

AGREEMENT_ATOL = 1e-4


def check_cacheable(config, terms) -> None:
    augment = config.augment
    if augment.crop_padding or augment.flip or augment.mixup_alpha or augment.cutmix_alpha:
        raise ConfigError("config key 'distill.teacher_cache': teacher outputs can only be cached for fixed "
                          "inputs; turn augmentation off (augment.crop_padding=0, flip=False, mixup/cutmix 0)")
    for term in terms:
        if term.taps("teacher") != ["logits"]:
            raise ConfigError(f"config key 'distill.teacher_cache': {term.where} taps teacher "
                              f"{term.teacher_tap!r}; only logits are cached")


def weights_fingerprint(variables) -> str:
    """A digest of the bytes of the teacher's params and statistics (gathered to every process when the
    arrays are sharded over several), so equal weights give the same file on any mesh."""
    digest = hashlib.sha1()
    for x in jax.tree.leaves(variables):
        digest.update(np.ascontiguousarray(_host(x)).tobytes())
    return digest.hexdigest()[:16]


def cache_path(config, section, step, split, weights: str) -> str:
    key = json.dumps({"name": section.name, "kwargs": dict(section.kwargs), "dtype": section.dtype,
                      "checkpoint": os.path.abspath(section.checkpoint), "step": step, "weights": weights,
                      "split": split}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    root = data.resolve_data_dir(config.dataset.data_dir or None) / "transferlab_teacher_cache"
    readable = re.sub(r"[^\w.-]", "_", f"{config.dataset.name}-{split}")  # a slice 'train[:90%]' too
    return str(root / f"{readable}-{digest}.npy")


@functools.lru_cache(maxsize=None)
def _teacher_forward(model):
    """The jitted float32-logits forward the table is made with (and checked against: one jitted function,
    compiled once)."""
    return jax.jit(lambda v, x: common.forward(model, v["params"], v["model_state"], x, train=False)[0]
                   .astype(jnp.float32))


def teacher_logits_table(model, variables, config, mesh, batch_size) -> np.ndarray:
    """[N, C] teacher logits of every example of the train split, in index order."""
    split = config.dataset.train_split
    forward = _teacher_forward(model)
    rows = {}
    for local in data.eval_batches(config.dataset.name, split, batch_size, data_dir=config.dataset.data_dir or None,
                                   process_index=jax.process_index(), process_count=jax.process_count()):
        batch = parallel.global_batch(mesh, local)
        logits, index, mask = _host(forward(variables, batch["image"])), _host(batch["index"]), _host(batch["mask"])
        for i, row in zip(index[mask], logits[mask]):
            rows[int(i)] = row
    return np.stack([rows[i] for i in range(len(rows))])


def _host(x):
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True) if jax.process_count() > 1
                      else jax.device_get(x))


def load_or_build(model, variables, section, step, config, mesh, batch_size) -> np.ndarray:
    path = cache_path(config, section, step, config.dataset.train_split, weights_fingerprint(variables))
    if os.path.exists(path):
        cached = _usable(path, model, variables, config, mesh, batch_size)
        if cached is not None:
            return cached
        # damaged (a truncated or replaced file) or stale: built again below
    _check_writable(os.path.dirname(path))  # before the teacher's pass over the whole train split
    table = teacher_logits_table(model, variables, config, mesh, batch_size)
    verify(table, model, variables, config, mesh, batch_size)
    if jax.process_index() == 0:
        tmp = path + f".tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.save(f, table)
        os.replace(tmp, path)
    return table


def _check_writable(directory: str) -> None:
    """`directory` exists (made if need be) and takes a new file (tried: a read-only mount or an immutable
    directory passes os.access as root); else a one-line UserError naming it, on every process (process 0
    writes the cache; the others would wait for it in the teacher pass's collectives)."""
    problem = ""
    if jax.process_index() == 0:
        probe = os.path.join(directory, f".probe{os.getpid()}")
        try:
            os.makedirs(directory, exist_ok=True)
            with open(probe, "wb"):
                pass
            os.remove(probe)
        except OSError as e:
            problem = f"cannot write the cache in {directory} ({e.strerror or e})"
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        if int(multihost_utils.broadcast_one_to_all(np.int32(bool(problem)))) and not problem:
            problem = "process 0 cannot write the cache in its dataset.data_dir"
    if problem:
        raise UserError(f"config key 'distill.teacher_cache': {problem}; make dataset.data_dir writable, or set "
                        "distill.teacher_cache=False")


def _usable(path, model, variables, config, mesh, batch_size):
    """The cached table at `path` if it reads, has one row per train example and agrees with the live
    teacher on the first batch; else None."""
    try:
        table = np.load(path)
        rows = len(data.get_source(config.dataset.name, config.dataset.train_split, config.dataset.data_dir or None))
        if table.ndim != 2 or table.shape[0] != rows or not np.all(np.isfinite(table)):
            return None
        verify(table, model, variables, config, mesh, batch_size)
    except (OSError, ValueError, EOFError, IndexError, UserError):
        return None
    return table


def verify(table, model, variables, config, mesh, batch_size) -> float:
    """Max |cached - live| teacher logits on the first train batch; UserError if they disagree."""
    first = next(iter(data.eval_batches(config.dataset.name, config.dataset.train_split, batch_size,
                                        data_dir=config.dataset.data_dir or None)))
    batch = parallel.global_batch(mesh, first) if jax.process_count() == 1 else None
    if batch is None:
        return 0.0
    live = _host(_teacher_forward(model)(variables, batch["image"]))
    mask = np.asarray(first["mask"])
    diff = float(np.max(np.abs(table[np.asarray(first["index"])[mask]] - live[mask])))
    if diff > AGREEMENT_ATOL * max(1.0, float(np.max(np.abs(live[mask])))):
        raise UserError(f"config key 'distill.teacher_cache': the cached teacher logits disagree with the live "
                        f"teacher on the first train batch (max |diff| {diff:.3g}); set "
                        "distill.teacher_cache=False and report it")
    return diff

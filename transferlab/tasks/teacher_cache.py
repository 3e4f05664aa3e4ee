"""Teacher-output caching: teacher logits computed once over the train split, stored in the
data directory, and looked up by example index instead of running the teacher each step.

Valid only when the student sees the inputs the cache was made from: fixed inputs
(augmentation off), or, with `distill.teacher_cache_views = K`, K replayable
crop/flip views of each example (`augment.replay_views`: view v of example i is
the same image in every run; each step shows each example one view drawn at
random, whose cached logits are looked up by (index, view), as FKD's stored
crops, arXiv:2112.01528). Mixup and CutMix mix pairs of examples, which no table
of per-example outputs can replay: refused. Every teacher tap a term reads is
cached (logits, and feature taps such as 'stage2' or 'features': each a table of
N x tap size float32 numbers, held on every device, so mind large feature maps).
Files (one per teacher and tap: [N, ...], or [N, K, ...] with views) live at
`<data_dir>/transferlab_teacher_cache/<dataset>-<split>-<key>.npy`, where the key
hashes the tap, the teacher's architecture, checkpoint directory, selected step and weights
(`weights_fingerprint`: a teacher retrained in the same directory gets a new file);
they are written atomically and reused by later runs. On creation and on reuse the cached
rows of the first batch are checked against a live teacher forward (the same jitted
function, so a bfloat16 teacher passes too: a stale or misordered file does not).
A table is stored in float32 and read back in the tap's own dtype (exact for bfloat16).
The tables come from the cache's own compiled forward, not the train step's: a
float32 teacher's agree with the in-step forward to ~1e-6; a bfloat16 teacher's may
differ from it by rounding (one bfloat16 step), as two programs of one model may.
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
from transferlab.data import augment
from transferlab.errors import ConfigError, UserError
from transferlab.tasks import common

AGREEMENT_ATOL = 1e-4


def check_cacheable(config) -> None:
    augment, views = config.augment, config.distill.teacher_cache_views
    if isinstance(views, bool) or not isinstance(views, int) or views < 0:
        raise ConfigError(f"config key 'distill.teacher_cache_views': expected an int >= 0, got {views!r}")
    if augment.mixup_alpha or augment.cutmix_alpha:
        raise ConfigError("config key 'distill.teacher_cache': mixup and cutmix mix pairs of examples, which a "
                          "cache of each example's teacher outputs cannot replay; set augment.mixup_alpha and "
                          "cutmix_alpha to 0")
    if views and not (augment.crop_padding or augment.flip):
        raise ConfigError(f"config key 'distill.teacher_cache_views': {views} views of un-augmented images are one "
                          "image; set augment.crop_padding or augment.flip, or teacher_cache_views=0")
    if not views and (augment.crop_padding or augment.flip):
        raise ConfigError("config key 'distill.teacher_cache': teacher outputs can only be cached for fixed or "
                          "replayable inputs; set distill.teacher_cache_views (e.g. 8 replayable crop/flip views "
                          "per example), or turn augmentation off (augment.crop_padding=0, flip=False)")


def _views(config) -> tuple[int, int, bool]:
    """(views, crop_padding, flip) of the cached views; views 0: the fixed un-augmented inputs."""
    views = int(config.distill.teacher_cache_views)
    return (views, int(config.augment.crop_padding), bool(config.augment.flip)) if views else (0, 0, False)


def weights_fingerprint(variables) -> str:
    """A digest of the bytes of the teacher's params and statistics (gathered to every process when the
    arrays are sharded over several), so equal weights give the same file on any mesh."""
    digest = hashlib.sha1()
    for x in jax.tree.leaves(variables):
        digest.update(np.ascontiguousarray(_host(x)).tobytes())
    return digest.hexdigest()[:16]


def cache_path(config, section, step, split, weights: str, tap: str = "logits") -> str:
    fields = {"name": section.name, "kwargs": dict(section.kwargs), "dtype": section.dtype,
              "checkpoint": os.path.abspath(section.checkpoint), "step": step, "weights": weights, "split": split}
    if tap != "logits":  # (the logits' file keeps the name it had before taps were cached)
        fields["tap"] = tap
    views, padding, flip = _views(config)
    if views:  # (a cache of the fixed inputs keeps its name)
        fields.update(views=views, crop_padding=padding, flip=flip, view_seed=augment.VIEW_SEED)
    key = json.dumps(fields, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    root = data.resolve_data_dir(config.dataset.data_dir or None) / "transferlab_teacher_cache"
    readable = re.sub(r"[^\w.-]", "_", f"{config.dataset.name}-{split}")  # a slice 'train[:90%]' too
    return str(root / f"{readable}-{digest}.npy")


@functools.lru_cache(maxsize=None)
def _teacher_forward(model, taps: tuple[str, ...] = ("logits",), views: tuple[int, int, bool] = (0, 0, False)):
    """The jitted forward the tables are made with (and checked against: one jitted function, compiled
    once): {tap: float32 output} on the images as given, or on view `view` of each (`augment.replay_views`)."""
    _, padding, flip = views

    def forward(variables, images, index, view):
        if views[0]:
            images = augment.replay_views(jnp.full(index.shape, view, jnp.int32), index, images, padding, flip)
        logits, _, outputs = common.forward(model, variables["params"], variables["model_state"], images,
                                            train=False, taps=taps != ("logits",))
        outputs = {**outputs, "logits": logits}
        return {tap: outputs[tap].astype(jnp.float32) for tap in taps}
    return jax.jit(forward)


def teacher_tables(model, variables, config, mesh, batch_size, taps=("logits",), keep=None) -> dict:
    """{tap: [N, ...]} teacher outputs on every example of the train split, in index order; [N, K, ...]
    with K views. The forward computes `taps`; the tables of `keep` (default: all of them) are returned."""
    split = config.dataset.train_split
    views = _views(config)
    forward = _teacher_forward(model, tuple(taps), views)
    rows = {tap: {} for tap in (taps if keep is None else keep)}
    for local in data.eval_batches(config.dataset.name, split, batch_size, data_dir=config.dataset.data_dir or None,
                                   process_index=jax.process_index(), process_count=jax.process_count()):
        batch = parallel.global_batch(mesh, local)
        index, mask = _host(batch["index"]), _host(batch["mask"])
        per_view = [forward(variables, batch["image"], batch["index"], v) for v in range(max(views[0], 1))]
        for tap in rows:
            outputs = [_host(out[tap]) for out in per_view]
            outputs = np.stack(outputs, axis=1) if views[0] else outputs[0]
            for i, row in zip(index[mask], outputs[mask]):
                rows[tap][int(i)] = row
    return {tap: np.stack([by_index[i] for i in range(len(by_index))]) for tap, by_index in rows.items()}


def _host(x):
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True) if jax.process_count() > 1
                      else jax.device_get(x))


def load_or_build(model, variables, section, step, config, mesh, batch_size, taps=("logits",)) -> dict:
    """{tap: table} of one teacher: read where a usable file exists, else computed (in one pass over the
    train split for every missing tap), checked and written. Every table is made and checked with one
    jitted forward computing all of `taps` (another program could round a bfloat16 teacher differently)."""
    taps = tuple(taps)
    weights = weights_fingerprint(variables)
    paths = {tap: cache_path(config, section, step, config.dataset.train_split, weights, tap) for tap in taps}
    tables = {}
    for tap, path in paths.items():
        if os.path.exists(path):  # a damaged (truncated, replaced) or stale file is built again below
            if (table := _usable(path, tap, model, variables, config, mesh, batch_size, taps)) is not None:
                tables[tap] = table
    missing = tuple(tap for tap in taps if tap not in tables)
    if not missing:
        return tables
    _check_writable(os.path.dirname(paths[missing[0]]))  # before the teacher's pass over the whole train split
    built = teacher_tables(model, variables, config, mesh, batch_size, taps, keep=missing)
    for tap, table in built.items():
        verify(table, model, variables, config, mesh, batch_size, tap, taps)
        if jax.process_index() == 0:
            tmp = paths[tap] + f".tmp{os.getpid()}"
            with open(tmp, "wb") as f:
                np.save(f, table)
            os.replace(tmp, paths[tap])
    return {**tables, **built}


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


def _usable(path, tap, model, variables, config, mesh, batch_size, taps):
    """The cached table of `tap` at `path` if it reads, has one row per train example and agrees with the
    live teacher on the first batch; else None."""
    try:
        table = np.load(path)
        rows = len(data.get_source(config.dataset.name, config.dataset.train_split, config.dataset.data_dir or None))
        views = _views(config)[0]
        expected = (rows, views) if views else (rows,)
        if table.shape[:len(expected)] != expected or not np.all(np.isfinite(table)):
            return None
        verify(table, model, variables, config, mesh, batch_size, tap, taps)
    except (OSError, ValueError, EOFError, IndexError, UserError):
        return None
    return table


def verify(table, model, variables, config, mesh, batch_size, tap="logits", taps=None) -> float:
    """Max |cached - live| teacher outputs (of `tap`, computed by the forward of `taps`, default just `tap`)
    on the first train batch; UserError if they disagree (a stale, misordered or wrongly shaped table)."""
    first = next(iter(data.eval_batches(config.dataset.name, config.dataset.train_split, batch_size,
                                        data_dir=config.dataset.data_dir or None)))
    batch = parallel.global_batch(mesh, first) if jax.process_count() == 1 else None
    if batch is None:
        return 0.0
    views = _views(config)
    index, mask = np.asarray(first["index"]), np.asarray(first["mask"])
    diff = 0.0
    forward = _teacher_forward(model, tuple(taps or (tap,)), views)
    for view in sorted({0, max(views[0] - 1, 0)}):  # the first and the last view
        live = _host(forward(variables, batch["image"], batch["index"], view)[tap])
        cached = table[index[mask], view] if views[0] else table[index[mask]]
        if cached.shape != live[mask].shape:
            raise UserError(f"config key 'distill.teacher_cache': the cached teacher {tap!r} has rows of shape "
                            f"{cached.shape[1:]}, the teacher's are {live.shape[1:]}")
        diff = max(diff, float(np.max(np.abs(cached - live[mask]))))
    if diff > AGREEMENT_ATOL * max(1.0, float(np.max(np.abs(live[mask])))):
        raise UserError(f"config key 'distill.teacher_cache': the cached teacher {tap!r} disagrees with the live "
                        f"teacher on the first train batch (max |diff| {diff:.3g}); set "
                        "distill.teacher_cache=False and report it")
    return diff

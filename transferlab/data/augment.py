"""Batch augmentations in pure JAX, run on device inside the jitted train step.

Every op takes an explicit PRNG key and a whole batch (images `x_BHWC`), is
jit-compatible (Python-level arguments such as `padding` and `alpha` are
static), and runs on a batch sharded across devices: under Auto sharding as
plain jnp ops, and under Explicit sharding (`jax.make_mesh` default axis
types) by drawing per-example randomness and gathering with the batch's own
sharding, so results equal the unsharded ones. Mixup (1710.09412) and CutMix (1905.04899) pair each example with a
random permutation of the batch and return soft labels that sum to 1.

`replay_views(view_B, index_B, x_BHWC, padding, flip)` crops and flips each example
as view `view` of example `index` always is (its key depends on nothing else): the
teacher cache's replayable views (`tasks/teacher_cache.py`).

`apply(key, batch, config)` composes them from a small mapping:

    crop_padding  int    pad-and-random-crop by this many pixels (0 = off)
    flip          bool   random horizontal flip
    mixup_alpha   float  Beta(alpha, alpha) mixup (0 = off)
    cutmix_alpha  float  Beta(alpha, alpha) CutMix (0 = off); with both on,
                         each batch uses one of the two, chosen at random
    num_classes   int    needed for the soft labels when mixup/cutmix is on
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from transferlab.errors import ConfigError

CONFIG_KEYS = ("crop_padding", "flip", "mixup_alpha", "cutmix_alpha", "num_classes")


def _explicit_sharding(x):
    """x's sharding when its batch dim is sharded over Explicit mesh axes, else None."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if not spec or spec[0] is None:
        return None
    return sharding


def _per_example_sharding(x, ndim: int):
    """Sharding for a per-example array of rank `ndim` laid out like x's batch dim."""
    sharding = _explicit_sharding(x)
    if sharding is None:
        return None
    return jax.sharding.NamedSharding(sharding.mesh, P(sharding.spec[0], *([None] * (ndim - 1))))


def _take_batch(x, perm_B):
    """x[perm_B] along the batch dim, keeping x's sharding."""
    sharding = _explicit_sharding(x)
    if sharding is None:
        return x[perm_B]
    spec = P(sharding.spec[0], *([None] * (x.ndim - 1)))
    return x.at[perm_B].get(out_sharding=jax.sharding.NamedSharding(sharding.mesh, spec))


def random_crop(key, x_BHWC, padding: int):
    """Zero-pads H and W by `padding` and crops back at a random offset per example."""
    if padding == 0:
        return x_BHWC
    b, h, w, c = x_BHWC.shape
    padded = jnp.pad(x_BHWC, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets_B2 = jax.random.randint(key, (b, 2), 0, 2 * padding + 1,
                                    out_sharding=_per_example_sharding(x_BHWC, 2))

    def crop(image_HWC, offset_2):
        return jax.lax.dynamic_slice(image_HWC, (offset_2[0], offset_2[1], 0), (h, w, c))

    return jax.vmap(crop)(padded, offsets_B2)


def random_flip(key, x_BHWC):
    """Flips each example left-right with probability 1/2."""
    flip_B = jax.random.bernoulli(key, 0.5, (x_BHWC.shape[0],),
                                  out_sharding=_per_example_sharding(x_BHWC, 1))
    return jnp.where(flip_B[:, None, None, None], x_BHWC[:, :, ::-1, :], x_BHWC)


VIEW_SEED = 0  # the replayable views' keys: the same images for every run and seed


def view_keys(view_B, index_B):
    """[B] PRNG keys of view `view_B[i]` of example `index_B[i]`."""
    base = jax.random.key(VIEW_SEED)
    return jax.vmap(lambda v, i: jax.random.fold_in(jax.random.fold_in(base, v), i))(view_B, index_B)


def replay_views(view_B, index_B, x_BHWC, padding: int, flip: bool):
    """Pad-and-crop (by `padding`) and flip (if `flip`) each example as its (view, index) key says: view v
    of example i is the same image whenever and wherever it is drawn, so a teacher's outputs on it can be
    computed once (as in FKD's stored crops, arXiv:2112.01528)."""
    _, h, w, c = x_BHWC.shape

    def one(key, image_HWC):
        key_crop, key_flip = jax.random.split(key)
        if padding:
            padded = jnp.pad(image_HWC, ((padding, padding), (padding, padding), (0, 0)))
            offset_2 = jax.random.randint(key_crop, (2,), 0, 2 * padding + 1)
            image_HWC = jax.lax.dynamic_slice(padded, (offset_2[0], offset_2[1], 0), (h, w, c))
        if flip:
            image_HWC = jnp.where(jax.random.bernoulli(key_flip, 0.5), image_HWC[:, ::-1, :], image_HWC)
        return image_HWC

    return jax.vmap(one)(view_keys(view_B, index_B), x_BHWC)


def _mix_weight(key, alpha: float, dtype):
    """One Beta(alpha, alpha) draw for the whole batch."""
    return jax.random.beta(key, alpha, alpha).astype(dtype)


def mixup(key, x_BHWC, y_BK, alpha: float):
    """Mixup: lam * x + (1 - lam) * x[perm], same for the (one-hot or soft) labels y_BK."""
    key_lam, key_perm = jax.random.split(key)
    lam = _mix_weight(key_lam, alpha, x_BHWC.dtype)
    perm_B = jax.random.permutation(key_perm, x_BHWC.shape[0])
    x_mixed = lam * x_BHWC + (1 - lam) * _take_batch(x_BHWC, perm_B)
    lam_y = lam.astype(y_BK.dtype)
    y_mixed = lam_y * y_BK + (1 - lam_y) * _take_batch(y_BK, perm_B)
    return x_mixed, y_mixed


def cutmix(key, x_BHWC, y_BK, alpha: float):
    """CutMix: paste a random box of x[perm] (area ~ 1 - lam) into x; labels by pasted area."""
    key_lam, key_perm, key_y, key_x = jax.random.split(key, 4)
    b, h, w, _ = x_BHWC.shape
    lam = _mix_weight(key_lam, alpha, jnp.float32)
    cut = jnp.sqrt(1.0 - lam)
    cut_h, cut_w = jnp.round(h * cut).astype(jnp.int32), jnp.round(w * cut).astype(jnp.int32)
    center_y = jax.random.randint(key_y, (), 0, h)
    center_x = jax.random.randint(key_x, (), 0, w)
    y0, y1 = jnp.clip(center_y - cut_h // 2, 0, h), jnp.clip(center_y + cut_h - cut_h // 2, 0, h)
    x0, x1 = jnp.clip(center_x - cut_w // 2, 0, w), jnp.clip(center_x + cut_w - cut_w // 2, 0, w)
    rows_H = jnp.arange(h)
    cols_W = jnp.arange(w)
    box_HW = ((rows_H >= y0) & (rows_H < y1))[:, None] & ((cols_W >= x0) & (cols_W < x1))[None, :]
    perm_B = jax.random.permutation(key_perm, b)
    x_mixed = jnp.where(box_HW[None, :, :, None], _take_batch(x_BHWC, perm_B), x_BHWC)
    kept = 1.0 - box_HW.sum() / (h * w)  # the exact area kept after clipping
    kept = kept.astype(y_BK.dtype)
    return x_mixed, kept * y_BK + (1 - kept) * _take_batch(y_BK, perm_B)


def _get(config, key, default):
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return default if value is None else value


def check_config(config) -> None:
    """Raises ConfigError on an unknown key or a bad value in an augmentation config."""
    keys = config.keys() if hasattr(config, "keys") else ()
    for key in keys:
        if key not in CONFIG_KEYS:
            raise ConfigError(f"unknown augmentation key {key!r}; expected one of: "
                              f"{', '.join(CONFIG_KEYS)}")
    padding = _get(config, "crop_padding", 0)
    if not isinstance(padding, int) or isinstance(padding, bool) or padding < 0:
        raise ConfigError(f"crop_padding must be an integer >= 0, got {padding!r}")
    for key in ("mixup_alpha", "cutmix_alpha"):
        alpha = _get(config, key, 0.0)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0:
            raise ConfigError(f"{key} must be a number >= 0 (0 = off), got {alpha!r}")
    mixing = _get(config, "mixup_alpha", 0.0) > 0 or _get(config, "cutmix_alpha", 0.0) > 0
    num_classes = _get(config, "num_classes", None)
    if mixing and (not isinstance(num_classes, int) or num_classes < 1):
        raise ConfigError(f"num_classes must be a positive integer when mixup/cutmix is on, "
                          f"got {num_classes!r}")


def apply(key, batch, config):
    """Augments `batch` ({'image': [B,H,W,C], 'label': int [B], ...}) as `config` says.

    Returns a new dict; when mixup or cutmix is on it adds 'label_soft'
    (float32 [B, num_classes]) and keeps the hard 'label' of the unmixed image.
    """
    check_config(config)
    key_crop, key_flip, key_mix, key_choice = jax.random.split(key, 4)
    out = dict(batch)
    images = batch["image"]
    padding = _get(config, "crop_padding", 0)
    if padding:
        images = random_crop(key_crop, images, padding)
    if _get(config, "flip", False):
        images = random_flip(key_flip, images)
    mixup_alpha = float(_get(config, "mixup_alpha", 0.0))
    cutmix_alpha = float(_get(config, "cutmix_alpha", 0.0))
    if mixup_alpha or cutmix_alpha:
        onehot_BK = jax.nn.one_hot(batch["label"], _get(config, "num_classes", None),
                                   dtype=jnp.float32)
        if mixup_alpha and cutmix_alpha:
            x_mix, y_mix = mixup(key_mix, images, onehot_BK, mixup_alpha)
            x_cut, y_cut = cutmix(key_mix, images, onehot_BK, cutmix_alpha)
            use_cutmix = jax.random.bernoulli(key_choice, 0.5)
            images = jnp.where(use_cutmix, x_cut, x_mix)
            out["label_soft"] = jnp.where(use_cutmix, y_cut, y_mix)
        elif mixup_alpha:
            images, out["label_soft"] = mixup(key_mix, images, onehot_BK, mixup_alpha)
        else:
            images, out["label_soft"] = cutmix(key_mix, images, onehot_BK, cutmix_alpha)
    out["image"] = images
    return out

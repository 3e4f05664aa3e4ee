"""Checksums of a train state's arrays, saved with each checkpoint and verified when it is restored.

Orbax/TensorStore store array bytes without a checksum of their own: a bit flipped on disk after a save
restored silently, and the run went on (or a KD run distilled from a damaged teacher) with different
numbers. `digests(tree)` gives, per leaf, two wrapping uint32 sums of the array's bit patterns (plain, and
weighted by odd position factors): integer sums are exact in any order, so the digest is the same whatever
the mesh or sharding the array is saved from or restored onto, and any single flipped bit changes it.
Computed on the devices in one jitted program (no host copy of the state); the result is replicated.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _words(x) -> jax.Array:
    """The array's bits as a flat uint32 vector (8-byte items: two words each)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).ravel()
    size = x.dtype.itemsize
    if size in (4, 8):  # (8-byte items: a trailing axis of 2 words)
        return lax.bitcast_convert_type(x, jnp.uint32).ravel()
    unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
    return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).ravel()


def _digest(x) -> jax.Array:
    words = _words(x)
    factors = 2 * lax.iota(jnp.uint32, words.size) + 1
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * factors, dtype=jnp.uint32)])


@functools.lru_cache(maxsize=None)
def _digest_fn():
    return jax.jit(lambda leaves: [_digest(x) for x in leaves])


def digests(tree) -> dict[str, str]:
    """{leaf path (jax keystr): 16 hex digits} of every array leaf of `tree`."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    values = _digest_fn()([jnp.asarray(x) if not isinstance(x, jax.Array) else x for _, x in flat])
    out = {}
    for (path, _), value in zip(flat, values):
        local = np.asarray(value.addressable_shards[0].data)  # (replicated: every process holds it)
        out[jax.tree_util.keystr(path)] = f"{int(local[0]):08x}{int(local[1]):08x}"
    return out


def first_mismatch(tree, saved: dict) -> str | None:
    """The path of the first leaf of `tree` whose digest differs from `saved`'s (leaves `saved` does not
    list are not compared: a checkpoint from before checksums, a subtree), or None."""
    if not isinstance(saved, dict) or not saved:
        return None
    for path, digest in digests(tree).items():
        if path in saved and saved[path] != digest:
            return path
    return None

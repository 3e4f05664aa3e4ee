"""Checkpoint checksums (transferlab/checksum.py): any flipped bit is found, whatever the sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import needs_devices
from transferlab import checksum, parallel


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32, jnp.uint8, jnp.bool_])
def test_every_single_bit_flip_changes_the_digest(dtype):
    x = np.asarray(jax.random.normal(jax.random.key(0), (5, 3)) > 0 if dtype == jnp.bool_ else
                   jax.random.normal(jax.random.key(0), (5, 3)) * 100).astype(dtype)
    tree = {"a": {"w": jnp.asarray(x)}, "step": jnp.int32(7)}
    saved = checksum.digests(tree)
    assert set(saved) == {"['a']['w']", "['step']"} and checksum.first_mismatch(tree, saved) is None
    raw = np.frombuffer(np.asarray(x).tobytes(), np.uint8).copy()
    for byte in range(raw.size):
        for bit in range(8 if dtype != jnp.bool_ else 1):
            flipped = raw.copy()
            flipped[byte] ^= 1 << bit
            damaged = {"a": {"w": jnp.asarray(np.frombuffer(flipped.tobytes(), x.dtype).reshape(x.shape))},
                       "step": jnp.int32(7)}
            assert checksum.first_mismatch(damaged, saved) == "['a']['w']", (byte, bit)
    # two values swapped: the plain sum is the same, the position-weighted one is not
    swapped = np.asarray(x).copy().ravel()
    swapped[[0, 1]] = swapped[[1, 0]]
    if swapped[0] != swapped[1]:
        assert checksum.first_mismatch({"a": {"w": jnp.asarray(swapped.reshape(x.shape))}}, saved) == "['a']['w']"
    assert checksum.first_mismatch(tree, {}) is None and checksum.first_mismatch(tree, None) is None


@needs_devices(8)
def test_the_digest_does_not_depend_on_the_sharding():
    x = jax.random.normal(jax.random.key(1), (16, 12))
    mesh = parallel.make_mesh("data=4,fsdp=2", jax.devices()[:8])
    sharded = jax.device_put(x, NamedSharding(mesh, P("data", "fsdp")))
    key = jax.random.key(3)
    assert checksum.digests({"x": sharded, "k": key}) == checksum.digests({"x": x, "k": key})


def test_a_damaged_checkpoint_of_another_run_is_not_advised_a_resume(tmp_path):
    """A teacher's, init checkpoint's or export's damaged step: moving it away (the resume hint) only made the
    next command fail on the run's selected step (audit); the error says what to do about that run instead."""
    from transferlab import checkpoint
    ckpt = checkpoint.Checkpointer(str(tmp_path / "run"))
    ckpt.save(1, {"w": jnp.ones(3)}, {})
    ckpt.save(2, {"w": jnp.ones(3)}, {})
    ckpt.wait()
    damage = RuntimeError("its array ['w'] does not match the checksum saved with it")
    assert "to resume from step 1 instead, move" in str(ckpt._unreadable(2, damage))
    other = str(ckpt._unreadable(2, damage, resuming=False))
    assert "resume" not in other and "that run's files are damaged: restore them from a copy, or train" in other
    ckpt.close()

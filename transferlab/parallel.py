"""Device mesh, batch sharding and regex sharding rules for parameters.

The mesh has two axes: `data` (pure data parallelism) and `fsdp` (data
parallelism whose parameters and optimizer state are also split). The batch is
split over both. Parameters are replicated unless a rule in
`config.sharding_rules` (regex over the leaf path, first match wins) says
`fsdp`, which shards a leaf's largest dimension divisible by the fsdp size
(as big_vision's `fsdp` rule); with fsdp > 1 and no rules, every leaf gets
`fsdp`.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from transferlab.config import parse_mesh_shape
from transferlab.errors import ConfigError

BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_shape: str, devices=None) -> Mesh:
    """Builds the ('data', 'fsdp') mesh from 'data=-1,fsdp=1' over all (or the given) devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = parse_mesh_shape(mesh_shape)
    known = int(np.prod([s for s in shape.values() if s != -1]))
    if len(devices) % known:
        raise ConfigError(f"mesh_shape {mesh_shape!r} needs a multiple of {known} devices, have {len(devices)}")
    sizes = tuple(len(devices) // known if s == -1 else s for s in shape.values())
    if int(np.prod(sizes)) != len(devices):
        raise ConfigError(f"mesh_shape {mesh_shape!r} gives {int(np.prod(sizes))} devices, have {len(devices)}")
    grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, tuple(shape), axis_types=(AxisType.Auto,) * len(sizes))


def batch_size_per_device_check(mesh: Mesh, batch_size: int, key: str = "batch_size") -> None:
    """The global batch must split evenly over the batch axes and over processes."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % n:
        raise ConfigError(f"config key {key!r}: {batch_size} is not divisible by the {n} devices of the "
                          f"data x fsdp mesh axes ({dict(mesh.shape)})")
    if batch_size % jax.process_count():
        raise ConfigError(f"config key {key!r}: {batch_size} is not divisible by {jax.process_count()} processes")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def path_str(path) -> str:
    """A pytree key path as 'a/b/c'."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _fsdp_spec(shape, fsdp_size: int) -> P:
    if fsdp_size == 1 or not shape:
        return P()
    for dim in np.argsort(shape)[::-1]:
        if shape[dim] % fsdp_size == 0 and shape[dim] >= fsdp_size:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def tree_shardings(mesh: Mesh, abstract_tree, rules=()):
    """NamedShardings for every leaf of `abstract_tree` (arrays or ShapeDtypeStructs)."""
    fsdp_size = mesh.shape["fsdp"]
    rules = list(rules) or ([(".*", "fsdp")] if fsdp_size > 1 else [])
    compiled = [(re.compile(pattern), rule) for pattern, rule in rules]

    def one(path, leaf):
        name = path_str(path)
        shape = tuple(getattr(leaf, "shape", ()))
        for pattern, rule in compiled:
            if pattern.search(name):
                return NamedSharding(mesh, _fsdp_spec(shape, fsdp_size) if rule == "fsdp" else P())
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, abstract_tree)


def global_batch(mesh: Mesh, local_batch: dict) -> dict:
    """Places this process's slice of a batch into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}

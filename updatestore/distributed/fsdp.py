"""FSDP2 (``fully_shard``): parameters are DTensors sharded on dim 0; each rank records its own part.

A DTensor sharded ``Shard(0)`` over a 1-D mesh of ``W`` ranks splits dim 0 as ``torch.chunk``
does: ``c = ceil(d0 / W)`` rows per rank, the last ranks possibly fewer or none. Each rank's
local shard is therefore one contiguous flat range of the parameter, which is what a part
of a sharded store holds (FORMAT.md, "Parts").
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import ConfigError

__all__ = ["is_sharded", "local_tensor", "shard_ranges", "local_range", "plan_parts", "check_parts"]


def is_sharded(p: Any) -> bool:
    """Whether ``p`` is a DTensor (FSDP2's sharded parameter); without importing DTensor's module."""
    return hasattr(p, "to_local") and hasattr(p, "placements")


def local_tensor(p: Any) -> torch.Tensor:
    """The rank-local shard of a DTensor (a view: in-place optimizer updates show), or ``p`` itself."""
    return p.to_local() if is_sharded(p) else p


def shard_ranges(shape: tuple[int, ...], world: int) -> list[tuple[int, int]]:
    """Flat ``[start, stop)`` of every rank's shard of a parameter of ``shape`` split on dim 0.

    >>> shard_ranges((7, 5), 3)
    [(0, 15), (15, 30), (30, 35)]
    """
    rows = shape[0] if shape else 1
    per_row = math.prod(shape[1:]) if shape else 1
    c = -(-rows // world)
    return [(min(r * c, rows) * per_row, min((r + 1) * c, rows) * per_row) for r in range(world)]


def _check_placement(name: str, p: Any, world: int) -> int:
    """The mesh rank of this process for ``p``, or a ``ConfigError`` for layouts not recorded yet."""
    from torch.distributed.tensor import Shard

    mesh, places = p.device_mesh, tuple(p.placements)
    if mesh.ndim != 1 or mesh.size() != world or len(places) != 1 or not (isinstance(places[0], Shard)
                                                                          and places[0].dim == 0):
        raise ConfigError(
            f"parameter {name!r} is a DTensor with placements {tuple(p.placements)} on a {mesh.ndim}-D mesh of "
            f"{mesh.size()} ranks; a sharded store records FSDP2's layout (Shard(0) over a 1-D mesh of all "
            f"{world} ranks). HSDP and tensor parallelism are not supported yet")
    return mesh.get_local_rank()


def local_range(name: str, p: Any, world: int | None = None) -> tuple[int, int]:
    """Flat ``[start, stop)`` of the entries of ``p`` this rank holds (all of them for a plain tensor);
    ``world`` defaults to the size of the parameter's mesh.

    >>> local_range("fc.weight", torch.zeros(3, 2))
    (0, 6)
    """
    if not is_sharded(p):
        return 0, p.numel()
    world = p.device_mesh.size() if world is None else world
    rank = _check_placement(name, p, world)
    start, stop = shard_ranges(tuple(p.shape), world)[rank]
    if stop - start != p.to_local().numel():
        raise ConfigError(f"parameter {name!r}: this rank's shard holds {p.to_local().numel()} entries, but "
                          f"Shard(0) over {world} ranks gives {stop - start}; an unsupported sharding")
    return start, stop


def plan_parts(params: list[tuple[str, Any]], world: int) -> dict[str, list[tuple[int, int, int]]]:
    """Per parameter, ``(rank, offset, numel)`` of each non-empty part: a DTensor's shards, or one part
    recorded by rank 0 for a plain (replicated) parameter."""
    out = {}
    for name, p in params:
        if is_sharded(p):
            _check_placement(name, p, world)
            out[name] = [(r, a, b - a) for r, (a, b) in enumerate(shard_ranges(tuple(p.shape), world)) if b > a]
        else:
            out[name] = [(0, 0, p.numel())]
    return out


def check_parts(parts: Any, pairs: list[tuple[Any, Any]], rank: int, world: int, where: str) -> None:
    """This rank holds exactly the parts of a sharded store (``parts``: its stored specs) that it would
    record for ``pairs`` (recorded parameter, model parameter): the model is sharded as at creation."""
    for spec, p in pairs:
        mine = [s for s in parts if s.part[0] == spec.name and s.part[2] == rank]
        a, b = local_range(spec.name, p, world)
        want = (mine[0].part[1], mine[0].part[1] + mine[0].numel) if mine else None
        # no part here: an empty shard, or a replicated (plain) parameter, which rank 0 records
        if (a, b) != want and not (want is None and (a == b or not is_sharded(p))):
            raise ConfigError(
                f"parameter {spec.name!r}: rank {rank} holds its entries {a}..{b}, but store {where} records "
                + (f"entries {want[0]}..{want[1]}" if want else "none") + " on this rank; shard the model as when "
                "the store was created (fully_shard over the same ranks)")

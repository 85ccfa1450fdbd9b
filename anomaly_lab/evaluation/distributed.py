"""Metrics computed once: every process's CPU data gathered to rank 0, the result broadcast to all.

CPU tensors travel through gloo: the default process group when it is gloo (`trainer=ddp_cpu`), else
a gloo group over the same processes, made once per default group (NCCL moves only device tensors).
Without an initialised process group (one process) the data stays where it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from anomaly_lab.errors import AnomalyLabError

T = TypeVar("T")
_gloo_groups: dict[int, Any] = {}


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _cpu_group() -> Any:
    if dist.get_backend() == "gloo":
        return None
    key = id(dist.group.WORLD)
    if key not in _gloo_groups:
        _gloo_groups[key] = dist.new_group(backend="gloo")
    return _gloo_groups[key]


def gather_to_rank_zero(tensors: list[Tensor], info: Any = None) -> list[tuple[list[Tensor], Any]]:
    """On rank 0: each process's ``(tensors, info)`` in rank order, its own first; elsewhere [].

    ``tensors``: CPU tensors of any shapes and dtypes; ``info``: any small picklable object. Every
    process must call it (a collective). Rank 0 holds all the tensors, the others only their own.
    """
    if not distributed():
        return [(tensors, info)]
    group, rank, world_size = _cpu_group(), dist.get_rank(), dist.get_world_size()
    layouts = [(t.shape, t.dtype) for t in tensors]
    everyone = [None] * world_size if rank == 0 else None
    dist.gather_object((layouts, info), everyone, dst=0, group=group)
    if rank != 0:
        for tensor in tensors:
            dist.send(tensor.contiguous(), dst=0, group=group)
        return []
    gathered = [(tensors, info)]
    for source in range(1, world_size):
        source_layouts, source_info = everyone[source]
        received = [torch.empty(shape, dtype=dtype) for shape, dtype in source_layouts]
        for tensor in received:
            dist.recv(tensor, src=source, group=group)
        gathered.append((received, source_info))
    return gathered


def on_rank_zero(compute: Callable[[], T]) -> T:
    """Run ``compute`` on rank 0 only; every process returns its result, or raises its `AnomalyLabError`.

    Every process must call it (a collective), so that a user error stops all of them alike.
    """
    if not distributed():
        return compute()
    outcome: Any = None
    if dist.get_rank() == 0:
        try:
            outcome = compute()
        except AnomalyLabError as error:
            outcome = error
    box = [outcome]
    dist.broadcast_object_list(box, src=0, group=_cpu_group())
    if isinstance(box[0], AnomalyLabError):
        raise box[0]
    return box[0]

"""Distributed marking: which process marks which unit, and how the processes agree (torch.distributed).

``torchrun --nproc_per_node=N -m radioactive mark ...`` starts N processes and sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` (and the rendezvous variables) in each; :func:`from_env` joins them
into one process group (gloo for CPU marking, nccl for CUDA, each rank on ``cuda:LOCAL_RANK``) only
when those variables are set and ``WORLD_SIZE > 1``; otherwise it returns :data:`SINGLE`.

A run's fixed units (:func:`radioactive.marking.plan.plan_units`) are dealt out round-robin: unit n
goes to rank ``n % WORLD_SIZE``. Since a unit's bytes depend only on the unit (its images, seeds and
batch composition) and on the CPU thread count (``MarkingConfig.threads``, the same in every process),
the released copy and record equal a single-process run's byte for byte. Every rank journals its units
in its own part beside the record; rank 0 opens the run, and, once every rank is done, merges the parts
and writes the record (:mod:`radioactive.marking.resume`). The output and the record must therefore be on
a filesystem all ranks share.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from ..errors import RadioactiveError

T = TypeVar("T")
TIMEOUT_S = 6 * 3600
"""How long a rank waits for the others at a synchronisation point (seconds): rank 0 alone verifies the
files of a resumed run, and the ranks finish their last units at different times."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in a (possibly one-process) marking run.

    Attributes:
        rank: this process's rank, 0..world_size-1 (rank 0 opens the run and writes the record).
        world_size: number of processes.
        local_rank: rank within its node (selects the GPU, ``cuda:local_rank``).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def owns(self, unit: int) -> bool:
        """Whether unit number ``unit`` is this rank's (round-robin: ``unit % world_size == rank``)."""
        return unit % self.world_size == self.rank

    def device(self, device: str) -> str:
        """The torch device of this rank: ``cuda`` becomes ``cuda:local_rank`` in a distributed run."""
        if self.distributed and torch.device(device).type == "cuda":
            return f"cuda:{self.local_rank}"
        return device

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (any picklable object; the others pass a placeholder)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def step(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` on this rank; if it fails on any rank, fail on every rank, so none is left waiting.

        The failing rank re-raises its own exception; the others raise :class:`RadioactiveError` naming the
        first failed rank and its message. Also a barrier: no rank returns before all have run ``fn``.
        """
        if not self.distributed:
            return fn()
        err: BaseException | None = None
        out = None
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 (reported to the other ranks, then re-raised)
            err = e
        errors = [None] * self.world_size
        dist.all_gather_object(errors, None if err is None else str(err) or type(err).__name__)
        if err is not None:
            raise err
        for r, msg in enumerate(errors):
            if msg is not None:
                raise RadioactiveError(f"rank {r} failed while {what}: {msg}")
        return out


SINGLE = Ranks()
"""A run in one process (no process group)."""


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise RadioactiveError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None


def from_env(device: str = "cpu", timeout_s: float = TIMEOUT_S) -> Ranks:
    """This process's :class:`Ranks` from the variables torchrun sets; joins the process group if needed.

    Args:
        device: the marking device (``cpu``: gloo backend; ``cuda``: nccl, rank on ``cuda:LOCAL_RANK``).
        timeout_s: the process group's timeout (seconds).

    Returns:
        :data:`SINGLE` when ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` are not all set or ``WORLD_SIZE`` is 1;
        otherwise the rank, with the default process group initialised (reused if already initialised).

    Raises:
        RadioactiveError: malformed variables, or more local ranks than GPUs on this node.
    """
    if not all(v in os.environ for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return SINGLE
    ranks = Ranks(_env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK"))
    if not 0 <= ranks.rank < ranks.world_size:
        raise RadioactiveError(f"RANK={ranks.rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={ranks.world_size})")
    if not ranks.distributed:
        return SINGLE
    cuda = torch.device(device).type == "cuda"
    if cuda:
        if ranks.local_rank >= torch.cuda.device_count():
            raise RadioactiveError(f"LOCAL_RANK={ranks.local_rank} but this node has {torch.cuda.device_count()} "
                                   "GPUs: start at most one process per GPU (torchrun --nproc_per_node)")
        torch.cuda.set_device(ranks.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": torch.device("cuda", ranks.local_rank)} if cuda else {}))
    return ranks


def shutdown() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

"""Index-range sharding for `generate`, under torchrun (one process per rank) or by hand.

Sample i is a pure function of (weights, seed, i), so a dataset can be cut into contiguous ranges
of positions, each written by its own process, and put back together with nothing but
concatenation: ``export.merge``. Under torchrun every rank writes its range as a shard inside
rank 0's temp folder; a gloo process group (CPU objects only, whatever the device) carries the
temp path and every rank's outcome, and rank 0 merges only when all ranks succeeded.
Multi-node runs use the usual torchrun rendezvous and need --out on a filesystem all nodes share.
"""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from typing import Any

# A rank may finish its range long before the slowest one: collectives must wait that long. A rank
# that dies is handled by torchrun, which stops the others (SIGTERM → the usual cleanup).
COLLECTIVE_TIMEOUT = _dt.timedelta(days=7)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized: bool = False  # whether this module created the process group (and must destroy it)

    def positions(self, total: int) -> range:
        """This rank's contiguous slice of dataset positions [0, total)."""
        return range(self.rank * total // self.world, (self.rank + 1) * total // self.world)

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: Any) -> list:
        if self.world == 1:
            return [obj]
        import torch.distributed as td

        out: list = [None] * self.world
        td.all_gather_object(out, obj)
        return out


def from_env() -> Dist:
    """Dist of this process: torchrun's RANK / WORLD_SIZE / LOCAL_RANK, else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Dist()
    import torch.distributed as td

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    created = False
    if not td.is_initialized():
        td.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
        created = True
    return Dist(rank, world, local, created)


def close(d: Dist, sync: bool = True) -> None:
    """Leave the process group. ``sync``: every rank went through the same collectives, so meet at a
    barrier first — a rank tearing gloo down while a peer still talks to it can abort at exit
    ("terminate called without an active exception"). Not after Ctrl-C/SIGTERM: peers may be gone."""
    if not d.initialized:
        return
    import torch.distributed as td

    if sync:
        try:
            td.monitored_barrier(timeout=_dt.timedelta(seconds=120))
        except RuntimeError:  # a peer is gone or stuck: nothing left to wait for
            pass
    td.destroy_process_group()

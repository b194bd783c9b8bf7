"""One training run over several processes: torch.distributed, launched by torchrun (docs/design.md §8).

    python -m flows.train                                   # one process (the default)
    torchrun --nproc_per_node 8 -m flows.train              # 8 ranks on one node (or train.nproc_per_node: 8)
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m flows.train

`init_distributed` is the one place that says where a process stands: it returns the rank, the world size and the
device (gloo on CPUs, NCCL on GPUs, each rank on its own GPU). A round is data parallel: its prompts are split
over the ranks (all K completions of a prompt on one rank, so group baselines stay local), each rank samples and
scores its share, and `all_gather` gives every rank the round's whole tables in the order one process would have
made them; the update is DDP (or FSDP) over each rank's rows, with the loss normalised by the round's global row
or token count. Rank 0 alone writes files, logs to MLflow and reports to Prefect.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import polars as pl

from stages.runtime import launched_by_torchrun


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "gloo" | "nccl" | None (one process)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int) -> list[int]:
        """This rank's share of n items (prompts): every world_size-th, starting at its rank."""
        return list(range(self.rank, n, self.world_size))

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def _device(self):
        import torch

        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def gather_rows(self, df: pl.DataFrame, order: list[str]) -> pl.DataFrame:
        """Every rank's rows of a round table, on every rank, in the order one process makes them: by the prompt's
        position in the round (`order`: the round's prompt ids), then `sample_idx`."""
        if not self.enabled:
            return df
        parts = [p for p in self.all_gather(df) if p.height]
        if not parts:
            return df
        pos = pl.DataFrame({"prompt_id": order, "_pos": list(range(len(order)))})
        return (pl.concat(parts, how="vertical_relaxed").join(pos, on="prompt_id", how="left")
                .sort("_pos", "sample_idx").drop("_pos"))


SINGLE = Dist()


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> tuple[Dist, str]:
    """(where this process stands, its device string). One process when not launched by torchrun.

    `timeout_s` bounds every collective: if a rank dies, the others stop within it (torchrun usually stops them
    sooner, when it sees the dead worker)."""
    import torch

    if not launched_by_torchrun():
        return SINGLE, device
    import torch.distributed as dist

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank, world, local, backend), (f"cuda:{local}" if cuda else "cpu")

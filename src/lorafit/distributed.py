"""Data-parallel training on torch.distributed, started by an existing launcher.

    torchrun --nproc_per_node 2 -m lorafit train CONFIG --out RUN              # one machine, 2 processes
    accelerate launch --num_processes 2 -m lorafit train CONFIG --out RUN      # the same through Accelerate

The launcher starts one process per device and sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR and MASTER_PORT; lorafit joins the process group (NCCL on CUDA, gloo on CPU) and trains
with DistributedDataParallel. Every process builds the same global length-grouped batches and takes
its own slice of each one; its loss is the *sum* over its slice times WORLD_SIZE / global batch size
(with train.class_weights: the class-weighted sum over the slice, times WORLD_SIZE / the global batch's
summed weights), so DDP's gradient average is exactly the gradient of the global batch's mean loss, whatever the
slice sizes. One optimiser step therefore sees the same gradient as a single process with the same
batch size, up to float summation order (and dropout masks, which differ per process). Validation
and test batches are split over the processes and their logits gathered, so every process takes the
same early-stopping decision; only rank 0 writes to the run folder.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .errors import UserError

__all__ = ["World"]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer (set by torchrun/accelerate)") from None


@dataclass(frozen=True)
class World:
    """This process's place among the training processes; size 1 is plain single-process training."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @classmethod
    def from_env(cls) -> "World":
        size = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        if size < 1 or not 0 <= rank < size:
            raise UserError(f"RANK={rank} and WORLD_SIZE={size} do not fit: start lorafit with torchrun or accelerate launch")
        return cls(rank, size, _env_int("LOCAL_RANK", 0), _env_int("LOCAL_WORLD_SIZE", size))

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- setup ------------------------------------------------------------------------------------
    def join(self, device: torch.device) -> torch.device:
        """Join the process group; on CUDA each process takes GPU LOCAL_RANK. Returns the device to use."""
        if not self.active:
            return device
        import torch.distributed as dist

        if device.type == "cuda":
            if self.local_rank >= torch.cuda.device_count():
                raise UserError(f"LOCAL_RANK {self.local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                                "start one process per GPU (--nproc_per_node)")
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        elif device.type != "cpu":
            raise UserError(f"data-parallel training runs on CUDA (NCCL) or CPU (gloo), not {device.type}")
        if not dist.is_initialized():
            for key in ("MASTER_ADDR", "MASTER_PORT"):
                if key not in os.environ:
                    raise UserError(f"WORLD_SIZE={self.size} but {key} is not set: start lorafit with torchrun or accelerate launch")
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=self.rank, world_size=self.size,
                                    timeout=datetime.timedelta(minutes=30))
        return device

    def threads(self) -> int | None:
        """CPU threads per process when train.threads is unset: the cores shared by the local processes."""
        if not self.active:
            return None
        return max(1, (os.cpu_count() or 1) // self.local_size)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The module to call for training forward passes (DDP averages the gradients in backward)."""
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def leave(self, together: bool) -> None:
        """Leave the process group (again: nothing). `together`: every process is here, past its last
        collective (a finished run, right after the test logits are gathered; a stop all of them agreed
        on), so they meet at a barrier and destroy the group at once, as torch.distributed's shutdown
        notes ask. Otherwise (an error in one process) nobody waits for processes that may never come,
        nor destroys a group whose collectives may be in flight: the process exits, and the launcher
        stops the rest."""
        if not self.active:
            return
        import torch.distributed as dist

        if together and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    # -- per step ---------------------------------------------------------------------------------
    def shard(self, batch: list[int], step_weight: float | None = None) -> tuple[list[int], float]:
        """This process's slice of a global batch and the weight of its summed loss.

        The weight is WORLD_SIZE / step_weight, step_weight being the total weight of the examples of
        all the batches one optimiser step accumulates: their number (default this batch's), or with
        class weights the sum of their w_y, which the summed loss then holds as w_y * loss per example.
        After DDP's average every example of the step weighs 1 / step_weight (w_y / step_weight).
        Slices are contiguous runs of the (length-grouped) batch, so they stay similar in length. A
        process whose slice would be empty (a last batch smaller than WORLD_SIZE) takes one example
        with weight 0: it still joins the gradient all-reduce but adds nothing.
        """
        step_weight = step_weight or len(batch)
        if not self.active:
            return batch, 1.0 / step_weight
        bounds = np.linspace(0, len(batch), self.size + 1).round().astype(int)
        mine = batch[bounds[self.rank]:bounds[self.rank + 1]]
        if not mine:
            return batch[:1], 0.0
        return mine, self.size / step_weight

    def gather_objects(self, obj: object) -> list:
        """Every process's `obj`, in rank order (a one-item list for one process)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        objects: list = [None] * self.size
        dist.all_gather_object(objects, obj)
        return objects

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the processes (a no-op for one)."""
        if not self.active:
            return values
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64)
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor)
        return tensor.cpu().tolist()

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def gather_rows(self, part: np.ndarray, index: np.ndarray, total: int) -> np.ndarray:
        """Every process's rows `part` (for its examples `index`) assembled into one (total, ...) array."""
        if not self.active:
            return part
        import torch.distributed as dist

        parts: list = [None] * self.size
        dist.all_gather_object(parts, (index, part))
        width = next(p.shape[1:] for i, p in parts if len(i))
        out = np.zeros((total, *width), dtype=np.float32)
        for i, p in parts:
            out[i] = p
        return out

    def my_examples(self, lengths: list[int]) -> np.ndarray:
        """The examples this process evaluates: every size-th one in length order, so work is even."""
        order = np.argsort(np.asarray(lengths), kind="stable")
        return np.sort(order[self.rank::self.size])

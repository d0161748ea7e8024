"""Several processes, one model: the lm, generator and classifier stages under ``torchrun``.

    torchrun --nproc_per_node 8 -m training --preset gpu --data-dir ../shared/data   # 8 GPUs, one host
    torchrun --nproc_per_node 2 -m training --preset tiny --data-dir ../shared/data  # 2 CPU processes (gloo)

Plain data parallelism (DDP): every rank builds the same model from the same seed and walks the
same global batches; each rank computes the loss on its slice of every batch (``shard``) and DDP
averages the gradients, so one step sees the same global batch as one process does and the
config's ``batch_size`` keeps its meaning. Only rank 0 writes artifacts, the manifest and the
reports; the other ranks wait for it at ``barrier()`` between stages. Without torchrun (no
``WORLD_SIZE`` in the environment) every function here is a no-op for one process.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

log = logging.getLogger(__name__)


def world_size() -> int:
    return torch.distributed.get_world_size() if _active() else 1


def rank() -> int:
    return torch.distributed.get_rank() if _active() else 0


def is_main() -> bool:
    return rank() == 0


def _active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def init_from_env(device: str) -> None:
    """Join the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``...):
    NCCL when the config's device resolves to CUDA, else gloo. One GPU per rank (``LOCAL_RANK``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or _active():
        return
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    log.info("distributed: rank %d of %d (%s)", rank(), world_size(), "nccl" if cuda else "gloo")


def barrier() -> None:
    if _active():
        torch.distributed.barrier()


def shutdown() -> None:
    if _active():
        torch.distributed.destroy_process_group()


def shard(batch: np.ndarray | torch.Tensor):
    """This rank's slice of a global batch (strided, so slices differ in size by at most one)."""
    part = batch[rank() :: world_size()]
    return np.ascontiguousarray(part) if isinstance(part, np.ndarray) else part


def for_backward(loss: torch.Tensor, local_rows: int, global_rows: int) -> torch.Tensor:
    """A slice's mean loss rescaled so that DDP's average over ranks is the global batch's mean, also
    when the slices differ in size (the last, shorter batch of a bucket)."""
    return loss * (local_rows * world_size() / global_rows) if _active() else loss


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model DDP-wrapped when several ranks train (gradients averaged in backward), else itself."""
    if not _active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def broadcast_int(value: int) -> int:
    """Rank 0's ``value`` on every rank (a decision all ranks must share, such as a cut plan)."""
    if not _active():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.broadcast(t, src=0)
    return int(t[0])


def mean(value: float, weight: float = 1.0) -> float:
    """A per-rank value (a slice's loss) averaged over ranks, weighted by ``weight`` (its rows)."""
    if not _active():
        return value
    t = torch.tensor([value * weight, weight], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return float(t[0] / t[1])

"""Data-parallel training across processes (``torchrun``): process group set-up and the collectives we need.

Under ``torchrun --nproc_per_node=N`` every process trains a replica of the model on its share of each global
batch; DistributedDataParallel averages the gradients, and the quantizer sums its codebook statistics across
processes with the helpers below, so every replica keeps the same codebook. Outside torchrun (or with one
process) every helper is a no-op, and training runs exactly as before.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank: from the process group, else from torchrun's RANK variable (0 outside torchrun)."""
    return dist.get_rank() if active() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True in the process that validates, writes the run folder and prints (rank 0)."""
    return rank() == 0


def launched() -> bool:
    """True when started by torchrun (or another launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def cuda_index() -> int:
    """This process's GPU under torchrun (LOCAL_RANK); RuntimeError when the node has fewer GPUs than that."""
    local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local >= count:
        raise RuntimeError(f"process {local} of this node has no GPU of its own: the node has {count} visible "
                           f"GPU{'s' * (count != 1)}; start at most {count} processes per node "
                           f"(torchrun --nproc_per_node={count}) or train with --device cpu")
    return local


@contextlib.contextmanager
def process_group(device_pref: str) -> Iterator[None]:
    """Join the process group torchrun describes in the environment (nccl on CUDA, gloo on CPU) for the
    duration of the block; a no-op when not launched with several processes or already initialised."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        yield
        return
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; run with one process")
    cuda = device_pref != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(cuda_index())
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """This process's device: cuda:LOCAL_RANK for a CUDA run under torchrun, else `device` unchanged."""
    if active() and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` in DistributedDataParallel when data-parallel, else `model` itself.

    Buffers are synced from rank 0 once, not at every forward: the quantizer keeps its codebook in step itself
    (`replica_divergence` checks that it does).
    """
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   **no_buffer_sync(DistributedDataParallel))


def no_buffer_sync(ddp: type) -> dict[str, bool]:
    """The DistributedDataParallel option that stops its buffer broadcast at every forward: forward_sync_buffers
    in the newest torch, broadcast_buffers before (both still sync once, when the wrapper is built)."""
    name = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else "broadcast_buffers"
    return {name: False}


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all processes, in place; returns it."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every process's rows (n_r, D), concatenated in rank order: (sum n_r, D), the same on every process."""
    if not active():
        return rows
    sizes = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([len(rows)], device=rows.device))
    sizes = [int(s) for s in sizes]
    padded = rows.new_zeros((max(sizes), *rows.shape[1:]))
    padded[:len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_agree(ok: bool) -> bool:
    """True only if `ok` is True in every process (a collective: every process must call it)."""
    if not active():
        return ok
    flag = torch.tensor([int(ok)], device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def main_first(main: Callable[[], T], others: Callable[[], T] | None = None) -> T:
    """Run `main` on rank 0, then `others` (default: `main`) on the other processes, e.g. to claim a run folder or
    build a data cache once. When rank 0 fails, it raises its error and the others raise RuntimeError."""
    if not active():
        return main()
    if is_main():
        try:
            result = main()
        except BaseException:
            all_agree(False)
            raise
        all_agree(True)
        return result
    if not all_agree(True):
        raise RuntimeError("rank 0 failed (its error is in its output); stopping this process too")
    return (others or main)()


def broadcast_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's values of `tensor`, in place on every process; returns it."""
    if active():
        dist.broadcast(tensor, src=0)
    return tensor


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` (any picklable value), on every process."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


@torch.no_grad()
def replica_divergence(module: torch.nn.Module) -> float:
    """The largest absolute difference between any process's parameters and buffers and rank 0's (0.0 when all
    replicas are identical, and always with one process)."""
    if not active():
        return 0.0
    worst = torch.zeros(1, dtype=torch.float64, device=next(module.parameters()).device)
    for tensor in [*module.parameters(), *module.buffers()]:
        reference = tensor.detach().clone()
        dist.broadcast(reference, src=0)
        diff = (tensor.detach().double() - reference.double()).abs().max() if tensor.numel() else worst.new_zeros(())
        worst = torch.maximum(worst, diff.reshape(1))
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst.item())

"""Data-parallel helpers on ``torch.distributed``: devices, process groups, gathers that keep gradients.

One process runs per device, started by ``torchrun`` (which sets ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE``). :func:`init_distributed` joins that group (NCCL on GPUs, gloo on CPUs) or, without
``torchrun``, returns a single-process context, so the same code runs either way::

    torchrun --nproc_per_node 4 -m sbmoe.cli train --model ... --data ... --output ...

Training uses these pieces for an exact data-parallel step: each process encodes its slice of the
global batch, :func:`all_gather_with_grad` collects every process's document embeddings (the
gradient flows back to the process that made them), and torch's DistributedDataParallel
(:func:`data_parallel`) averages the gradients, so ``N`` processes with batch ``B`` take the same
step as one process with batch ``N*B``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from sbmoe.core.errors import UsageError
from sbmoe.core.runtime import resolve_device

T = TypeVar("T")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a data-parallel job.

    Attributes:
        rank: This process's index among all processes (0 writes files and logs).
        world_size: Number of processes (1 when not distributed).
        local_rank: Index among the processes of this machine (selects its GPU).
        device: Where this process computes.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_distributed(self) -> bool:
        """More than one process: collectives are needed."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The process that writes files, logs and progress bars."""
        return self.rank == 0

    # ------------------------------------------------------------------------------- collectives
    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.is_distributed:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def broadcast_object(self, value: T) -> T:
        """Rank 0's ``value`` on every process (picklable objects; tensors travel on the CPU)."""
        if not self.is_distributed:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self._object_device())
        return box[0]

    def all_gather_object(self, value: T) -> list[T]:
        """Every process's ``value``, in rank order, on every process."""
        if not self.is_distributed:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of ``values`` over all processes."""
        if not self.is_distributed:
            return [float(v) for v in values]
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def run_on_main(self, function: Callable[[], T]) -> T:
        """Call ``function`` on rank 0 only and hand its result (or its exception) to every process.

        For file reads and checks that only rank 0 can be sure to see (nodes need not share a disk):
        if rank 0 fails, every process raises instead of waiting forever in the next collective.
        """
        outcome: tuple[bool, Any] = (True, None)
        if self.is_main:
            try:
                outcome = (True, function())
            except Exception as error:  # handed to every process, then raised everywhere
                outcome = (False, error)
        ok, value = self.broadcast_object(outcome)
        if not ok:
            raise value if isinstance(value, BaseException) else RuntimeError(str(value))
        return value

    def _object_device(self) -> torch.device:
        # NCCL moves pickled objects through the GPU; gloo through the CPU.
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def init_distributed(
    device: str | torch.device | None = "auto", timeout_minutes: float = 30
) -> DistributedContext:
    """Join the process group that ``torchrun`` set up, or describe a single process.

    Idempotent: a group that already exists is reused. NCCL is used when the processes run on GPUs,
    gloo otherwise.

    Args:
        device: ``auto`` (this process's GPU, else the CPU), or an explicit device.
        timeout_minutes: How long a collective may wait for the slowest process.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if not dist.is_available() or (world_size <= 1 and not dist.is_initialized()):
        return DistributedContext(device=resolve_device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        names_gpu = device is not None and device != "auto" and torch.device(device).index is not None
        if not names_gpu:  # "auto" or "cuda": one GPU per process of this machine
            resolved = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if resolved.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=resolved if resolved.type == "cuda" else None,
        )
    return DistributedContext(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=resolved
    )


def shutdown() -> None:
    """Leave the process group (if any); call once at the end of a ``torchrun`` job."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_session(device: str | torch.device | None = "auto") -> Iterator[DistributedContext]:
    """:func:`init_distributed` for the duration of a block; leaves a group only if it created it."""
    created = dist.is_available() and not dist.is_initialized()
    context = init_distributed(device)
    try:
        yield context
    finally:
        if created and context.is_distributed:
            shutdown()


# --------------------------------------------------------------------------------------- gradients
class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every process's rows; backward sums the gradient over processes and keeps ours."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, sizes: tuple[int, ...], rank: int) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        longest = max(sizes)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # Every process's loss may depend on our rows: their gradients add up.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def all_gather_with_grad(
    tensor: torch.Tensor, sizes: Sequence[int], context: DistributedContext
) -> torch.Tensor:
    """Rows of ``tensor`` from every process, concatenated in rank order, differentiable.

    Args:
        tensor: This process's rows, ``(sizes[rank], ...)``; same trailing shape on every process.
        sizes: Rows held by each process (every process knows them: they follow from the batch).
        context: The process group description.

    Returns:
        ``(sum(sizes), ...)``. Its gradient reaches each process's own rows, summed over the losses
        of all processes (the usual all-gather trick for in-batch negatives across devices).
    """
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) != context.world_size or tensor.shape[0] != sizes[context.rank]:
        raise UsageError(f"rank {context.rank} holds {tensor.shape[0]} rows, sizes say {sizes}")
    if not context.is_distributed:
        return tensor
    return _AllGatherWithGrad.apply(tensor.contiguous(), sizes, context.rank)


def all_gather_tensor(
    tensor: torch.Tensor, sizes: Sequence[int], context: DistributedContext
) -> torch.Tensor:
    """Like :func:`all_gather_with_grad`, without gradient (indices, masks)."""
    with torch.no_grad():
        return all_gather_with_grad(tensor.detach(), sizes, context)


def data_parallel(module: torch.nn.Module, context: DistributedContext) -> torch.nn.Module:
    """``module`` under DistributedDataParallel when several processes train; ``module`` itself otherwise.

    DDP starts every process from rank 0's parameters and averages the gradients in ``backward``.
    ``find_unused_parameters``: parameters that require gradients may get none in a step (the gate
    under ``paper`` gating, the noise network without noisy gating); DDP leaves their gradients at
    ``None`` when no process used them, and counts them as zero where some did. Buffers (constant
    position ids) are not broadcast: that would add a collective to every forward pass, no-grad ones
    included, whose number differs between processes under gradient caching.
    """
    if not context.is_distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        module,
        device_ids=[context.device] if context.device.type == "cuda" else None,
        find_unused_parameters=True,
        broadcast_buffers=False,
    )


def no_sync(module: torch.nn.Module) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` (backward accumulates, does not average) for a wrapped module; else a no-op."""
    from torch.nn.parallel import DistributedDataParallel

    return module.no_sync() if isinstance(module, DistributedDataParallel) else contextlib.nullcontext()


def broadcast_module(module: torch.nn.Module, context: DistributedContext) -> None:
    """Copy rank 0's parameters and buffers into every process's ``module``."""
    if not context.is_distributed:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


# ---------------------------------------------------------------------------------------- sharding
def shard_bounds(count: int, shard: int, num_shards: int) -> tuple[int, int]:
    """``(start, stop)`` of contiguous shard ``shard`` of ``num_shards`` over ``count`` items.

    Shard sizes differ by at most one, the first shards taking the extra items; concatenating the
    shards in order gives the items in their original order.
    """
    check_shard(shard, num_shards)
    base, extra = divmod(count, num_shards)
    start = shard * base + min(shard, extra)
    return start, start + base + (1 if shard < extra else 0)


def parse_shard(text: str, flag: str = "--shard") -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)``: the ``I``-th (from 0) of ``N`` parts, ``0 <= I < N``.

    Raises:
        UsageError: naming ``flag`` and saying what ``I/N`` means.
    """
    try:
        index_text, count_text = text.strip().split("/")
        index, count = int(index_text), int(count_text)
    except (ValueError, AttributeError):
        raise UsageError(f"{flag} {text!r} is not I/N; {_SHARD_MEANING}") from None
    return check_shard(index, count, flag)


_SHARD_MEANING = "I/N means part I of N, counted from 0, so 0 <= I < N (e.g. 0/4 ... 3/4)"


def check_shard(index: int, count: int, flag: str = "shard") -> tuple[int, int]:
    """``(index, count)`` when ``0 <= index < count``, else a UsageError naming ``flag``."""
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"{flag} {index}/{count} is invalid; {_SHARD_MEANING}")
    return index, count

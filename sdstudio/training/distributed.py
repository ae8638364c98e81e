"""Data-parallel training under ``torchrun``: every process (rank) holds the whole model and computes the loss
of its own rows of each global batch; the gradients are averaged across ranks before the optimizer step, so
every rank takes the same step and the weights stay identical (what PyTorch's ``DistributedDataParallel``
computes; done here by hand because the methods' loss closures call submodules, not a wrapper's forward).

How to run (one machine, two processes; gloo on CPUs, NCCL when the model is on CUDA, one GPU per process)::

    torchrun --nproc_per_node 2 $(which sdstudio) train embedding --data DATA --out RUN --batch 2 ...

Several machines: the same command on each, with ``--nnodes N --nproc_per_node P --rdzv-backend c10d
--rdzv-endpoint HOST:PORT --rdzv-id JOB`` (``HOST`` one of them, reachable from all). The data folder must
hold the same images on every node (checked before training). The run folder (``--out``) belongs on a
filesystem every node sees (NFS, a cluster filesystem): every rank reads ``train_state.pt`` to resume, and
DreamBooth's class images, which rank 0 makes. On node-local disks a new run still trains, but only rank 0's
node gets the files (``run.json``, ``train_state.pt``, ``log.jsonl``, ``loss.png``, the results; each node
keeps its own ``latents/`` cache), and resuming it is refused with a clear error.

Each run function (``train_embedding``, ``train_lora``, ``train_hypernetwork``, ``train_dreambooth``, ``train_finetune``)
gets its :class:`Shard` from :func:`shard_from_env` with its model's device, which starts the process group
on first use; a caller may start it earlier (so that ``cuda`` means the GPU of ``LOCAL_RANK`` when it loads
the model) and use :func:`is_main` to show progress and print results on rank 0 only.

Semantics (kohya's and diffusers' ``--train_batch_size``): ``--batch`` is per process; the global batch is
``batch * world``. A run on ``world`` processes at ``--batch b`` gives the weights of one process at
``--batch world * b`` (within float rounding): every random draw is made for the global batch on every rank
(all ranks hold the same generator, seeded alike) and each rank keeps its rows (:class:`Rows`); the batches
and epochs are the global ones, and a bucket's short last batch is split unevenly with weights that keep
the mean exact; the per-sample views and captions come from per-slot generators, so rank ``r`` draws global
slots ``r * b ... r * b + b - 1``. Two exceptions: hypernetwork dropout masks (drawn per rank from torch's
own generator) are alike in distribution only; and a parameter whose exact gradient is zero (a key bias,
which softmax ignores) gets rounding noise, which differs with how the batch is split and which AdamW scales
up to steps of about the learning rate, so such weights agree only to about that.

Only rank 0 writes files; the others wait at a barrier. The functions here keep no state of their own:
what a process knows about the group is what ``torch.distributed`` holds (or, before it starts, the
environment ``torchrun`` sets: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from sdstudio.errors import SdStudioError

log = logging.getLogger(__name__)

__all__ = [
    "ALONE",
    "Rows",
    "Shard",
    "all_reduce_gradients",
    "broadcast_parameters",
    "current_shard",
    "is_main",
    "launched",
    "leave",
    "shard_from_env",
    "shutdown",
]

# Rank 0 alone writes checkpoints and makes DreamBooth's class images while the others wait at a barrier;
# torchrun stops every rank when one fails, so a long timeout does not hide a crash.
TIMEOUT = timedelta(hours=3)
BUCKET_BYTES = 64 * 2**20  # gradients are averaged in flat buckets of at most this size (DDP uses 25 MiB)
T = TypeVar("T")


@dataclass(frozen=True)
class Rows:
    """One rank's rows of a global batch of ``total`` rows: their indices in it, and each row's loss weight.

    The weights make "each rank's mean loss, averaged over the ranks" equal the global batch's mean loss
    also when the batch does not split evenly (a bucket's last, short batch): a real row weighs
    ``world * len(index) / total`` (1 when the batch splits evenly); a rank left without rows computes row 0
    at weight 0, so every rank still runs the same collectives with a finite loss."""

    total: int
    index: tuple[int, ...]
    weight: tuple[float, ...]

    @classmethod
    def whole(cls, total: int) -> Rows:
        """All rows at weight 1: one process."""
        return cls(total, tuple(range(total)), (1.0,) * total)

    @property
    def weighted(self) -> bool:
        """Whether any weight differs from 1 (then losses are multiplied by them)."""
        return any(w != 1.0 for w in self.weight)

    def take(self, x: Tensor) -> Tensor:
        """This rank's rows of a tensor drawn for the whole batch. [total, ...] -> [len(index), ...]"""
        if x.shape[0] != self.total:
            raise ValueError(f"a batch of {x.shape[0]} rows, expected {self.total}")
        if self.index == tuple(range(self.total)):
            return x
        return x[torch.tensor(self.index, device=x.device)]

    def weigh(self, losses: Tensor) -> Tensor:
        """Per-sample losses [len(index)] times the rows' weights."""
        if not self.weighted:
            return losses
        return losses * torch.tensor(self.weight, dtype=losses.dtype, device=losses.device)


@dataclass(frozen=True)
class Shard:
    """This process's place in the data-parallel group: ``rank`` of ``world`` processes (0 of 1: alone).

    Its collectives run on the default process group and do nothing when ``world`` is 1."""

    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise SdStudioError(
                f"rank {self.rank} of {self.world} processes: the rank must be 0 .. world - 1"
            )

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the one that writes files (and shows progress)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def rows(self, total: int) -> Rows:
        """This rank's rows of a global batch of ``total`` rows: a contiguous block, from
        ``ceil(rank * total / world)`` up to ``ceil((rank + 1) * total / world)`` (``rank * b ...`` for a full
        batch of ``world * b``; the first ranks get the rows of a short one)."""
        if self.world == 1:
            return Rows.whole(total)
        start, stop = -(-self.rank * total // self.world), -(-(self.rank + 1) * total // self.world)
        if stop == start:
            return Rows(total, (0,), (0.0,))
        weight = self.world * (stop - start) / total
        return Rows(total, tuple(range(start, stop)), (weight,) * (stop - start))

    def barrier(self) -> None:
        """Wait until every rank is here."""
        if self.distributed:
            dist.barrier()

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` (any picklable object) on every rank."""
        if not self.distributed:
            return value
        box: list[object] = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]  # type: ignore[return-value]

    def on_main(self, work: Callable[[], T]) -> T:
        """``work()`` on rank 0 while the others wait; its result on every rank, or its ``SdStudioError``
        raised on every rank (any other exception stops rank 0, and torchrun then stops the others)."""
        if not self.distributed:
            return work()
        answer: tuple[object, str | None] = (None, None)
        if self.main:
            try:
                answer = (work(), None)
            except SdStudioError as e:
                answer = (None, str(e))
        result, error = self.broadcast(answer)
        if error is not None:
            raise SdStudioError(error)
        return result  # type: ignore[return-value]

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        out: list[object] = [None] * self.world
        dist.all_gather_object(out, value)
        return out  # type: ignore[return-value]

    def check_same(self, value: object, what: str, fix: str) -> None:
        """Raise (on every rank alike) unless ``value`` is the same on every rank. ``what`` names it,
        ``fix`` says what to do."""
        values = self.gather(value)
        differ = [r for r, v in enumerate(values) if v != values[0]]
        if differ:
            raise SdStudioError(f"rank {differ[0]} of {self.world} has other {what} than rank 0; {fix}")

    def mean(self, value: float, device: torch.device | str = "cpu") -> float:
        """The mean of a number over the ranks (``device``: where the backend reduces; CUDA for NCCL)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item()) / self.world


ALONE = Shard()  # one process: rank 0 of 1 (an immutable value, the default of every ``shard`` argument)


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None or not value.strip().lstrip("-").isdigit():
        raise SdStudioError(
            f"WORLD_SIZE is {os.environ.get('WORLD_SIZE')} but {name} is {value!r}: start distributed runs "
            "with torchrun (it sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)"
        )
    return int(value)


def current_shard() -> Shard:
    """This process's place without starting anything: the process group's if one is running, else what
    torchrun's ``RANK`` / ``WORLD_SIZE`` say (0 of 1 without them)."""
    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size())
    try:
        return Shard(int(os.environ.get("RANK", "0")), max(1, int(os.environ.get("WORLD_SIZE", "1"))))
    except (ValueError, SdStudioError):
        return ALONE


def is_main() -> bool:
    """Whether this process is rank 0 (or alone): the one that should show progress and print results."""
    return current_shard().main


def _check_backend(device: torch.device) -> None:
    backend = str(dist.get_backend()).lower()
    wanted = "nccl" if device.type == "cuda" else "gloo"
    if wanted not in backend:
        raise SdStudioError(
            f"the process group runs {backend}, but the model is on {device}, which needs {wanted}"
        )


def shard_from_env(device: torch.device | str = "cpu") -> Shard:
    """This process's :class:`Shard`, starting the default process group on the first call when torchrun
    launched several processes (``WORLD_SIZE`` > 1): gloo for a model on the CPU, NCCL for one on CUDA (the
    current GPU set to ``LOCAL_RANK``: one GPU per process). Shard(0, 1) without torchrun. A running group
    (started here or by the caller) is used as it is. Settings that cannot work raise ``SdStudioError``."""
    device = torch.device(device)
    if dist.is_available() and dist.is_initialized():
        _check_backend(device)
        return Shard(dist.get_rank(), dist.get_world_size())
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise SdStudioError(f"WORLD_SIZE {os.environ['WORLD_SIZE']!r}: not a number") from None
    if world <= 1:
        return ALONE
    if not dist.is_available():
        raise SdStudioError("WORLD_SIZE > 1, but this PyTorch build has no torch.distributed")
    rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise SdStudioError(
                f"WORLD_SIZE is {world} but {name} is not set: start distributed runs with torchrun"
            )
    shard = Shard(rank, world)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if local >= count:
            raise SdStudioError(
                f"LOCAL_RANK {local}, but this machine has {count} GPU(s): one process per GPU "
                f"(--nproc_per_node {max(count, 1)} at most)"
            )
        if device.index is not None and device.index != local:
            raise SdStudioError(
                f"rank {rank} (LOCAL_RANK {local}) has its model on {device}: each process trains on the GPU "
                f"of its LOCAL_RANK (cuda:{local}); load the model on the current device (cuda) after "
                "shard_from_env('cuda') has set it"
            )
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", rank=rank, world_size=world, timeout=TIMEOUT,
                                device_id=torch.device("cuda", local))  # fmt: skip
    elif device.type == "cpu":
        if not dist.is_gloo_available():
            raise SdStudioError("training on CPUs in several processes needs gloo, which this PyTorch lacks")
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=TIMEOUT)
    else:
        raise SdStudioError(f"distributed training runs on CPUs (gloo) or CUDA GPUs (NCCL), not on {device}")
    log.info("rank %d of %d (%s)", rank, world, dist.get_backend())
    return shard


def shutdown() -> None:
    """End the process group, if one runs (at the end of a training command): every rank reaches a barrier
    first, so that no rank tears its gloo connections down while another still uses them (which aborts the
    other process at exit: "terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def launched() -> bool:
    """Whether this process is one rank of a torchrun launch (``TORCHELASTIC_RUN_ID`` or ``WORLD_SIZE`` > 1)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def leave(code: int) -> NoReturn:
    """End a rank's process with ``code`` once its work is written: a barrier (no rank leaves while another
    still talks to it), flush, then ``os._exit``, without destroying the process group and without the
    interpreter's finalization. Destroying gloo's C++ threads there can abort the process after every file
    is written (a clean-clone CI run saw rank 0 die with "terminate called without an active exception"
    after ``shutdown``'s barrier), which torchrun reports as a failed run."""
    try:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more to say
                pass
        os._exit(code)


def _buckets(tensors: Sequence[Tensor], limit: int) -> list[list[Tensor]]:
    """Consecutive tensors grouped by (device, dtype), each group at most ``limit`` bytes (or one tensor)."""
    groups: dict[tuple[torch.device, torch.dtype], list[list[Tensor]]] = {}
    sizes: dict[tuple[torch.device, torch.dtype], int] = {}
    for t in tensors:
        key = (t.device, t.dtype)
        nbytes = t.numel() * t.element_size()
        runs = groups.setdefault(key, [[]])
        if runs[-1] and sizes[key] + nbytes > limit:
            runs.append([])
            sizes[key] = 0
        runs[-1].append(t)
        sizes[key] = sizes.get(key, 0) + nbytes
    return [run for runs in groups.values() for run in runs]


def _unflatten(flat: Tensor, bucket: Sequence[Tensor]) -> None:
    """Copy the consecutive pieces of ``flat`` back into the tensors it was made of."""
    offset = 0
    for t in bucket:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


@torch.no_grad()
def all_reduce_gradients(params: Sequence[torch.nn.Parameter], shard: Shard) -> None:
    """Average the gradients of ``params`` over the ranks, in place (what DDP's reducer computes). A
    parameter that has no gradient on any rank keeps none (AdamW then skips it, as it would alone); one with
    a gradient on some rank counts zeros on the others. Flat buckets per device and dtype, reduced
    concurrently."""
    if not shard.distributed or not params:
        return
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    reduced = [p for p, h in zip(params, has.tolist()) if h]
    for p in reduced:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in reduced]
    pending = []
    for bucket in _buckets(grads, BUCKET_BYTES):  # type: ignore[arg-type]
        flat = torch.cat([g.reshape(-1) for g in bucket])
        pending.append((bucket, flat, dist.all_reduce(flat, async_op=True)))
    for bucket, flat, work in pending:
        work.wait()
        _unflatten(flat.div_(shard.world), bucket)


@torch.no_grad()
def broadcast_parameters(params: Sequence[torch.nn.Parameter], shard: Shard) -> None:
    """Rank 0's values of ``params`` on every rank, in place (what DDP does when it wraps a module)."""
    if not shard.distributed:
        return
    for bucket in _buckets([p.data for p in params], BUCKET_BYTES):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.broadcast(flat, src=0)
        _unflatten(flat, bucket)

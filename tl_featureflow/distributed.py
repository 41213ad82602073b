"""Work over several processes with ``torch.distributed``, as launched by torchrun.

``torchrun --nproc-per-node N -m tl_featureflow map --distributed ...`` starts N processes
(ranks) and gives each its ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous
address; :func:`init` reads them and joins the process group (gloo on the CPU, NCCL on
GPUs). The work is cut with :func:`shard_range` (contiguous blocks of texts) or
:func:`shard_items` (layer pairs, round robin), and results come back to rank 0 with
:func:`gather_to_root`.

Failures end the run on every rank, never hang it: each step runs inside :func:`all_ok`,
which exchanges every rank's outcome, so a rank that raises makes every rank raise
:class:`~tl_featureflow.errors.DistributedError` naming it and what it said (with the
text where the work knows it); a rank that dies or hangs leaves the others waiting at
most the group's timeout, after which they raise it too.

Without torchrun, :func:`single` stands for one process (no group): the same code runs.

>>> ranks = single()
>>> ranks.world_size, ranks.is_root, shard_range(10, ranks)
(1, True, range(0, 10))
>>> [shard_range(10, r, align=4) for r in (Ranks(0, 3, 0), Ranks(1, 3, 0), Ranks(2, 3, 0))]
[range(0, 4), range(4, 8), range(8, 10)]
>>> gather_to_root(ranks, lambda: 7, "adding")
[7]
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from tl_featureflow.errors import DistributedError, InvalidArgumentError

__all__ = ["Ranks", "init", "single", "shutdown", "shard_range", "shard_items", "all_ok", "gather_to_root",
           "broadcast_from_root", "note", "DEFAULT_TIMEOUT_S", "ENV"]

T = TypeVar("T")

#: Seconds a rank waits for the others at a collective before it ends the run.
DEFAULT_TIMEOUT_S = 600.0
#: What torchrun sets for every rank (and init reads).
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Ranks:
    """This process's place in a run: its ``rank`` of ``world_size``, its ``local_rank`` on its machine, the
    ``device`` it computes on, the group's ``backend`` (None: one process, no group), ``timeout_s``, and
    whether the :func:`init` that made it ``joined`` the group (then :func:`shutdown` leaves it)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    joined: bool = False

    @property
    def is_root(self) -> bool:
        """Rank 0 gathers the results and writes the files."""
        return self.rank == 0

    @property
    def grouped(self) -> bool:
        return self.backend is not None and self.world_size > 1

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world_size}"


def single(device: torch.device | str = "cpu") -> Ranks:
    """One process standing alone: rank 0 of 1, no process group (collectives are no-ops)."""
    return Ranks(0, 1, 0, torch.device(device))


def init(device: torch.device | str = "cpu", *, timeout_s: float = DEFAULT_TIMEOUT_S) -> Ranks:
    """Join the process group torchrun's environment describes (a group this process is already in is
    reused, and left by whoever joined it).

    ``device``: ``"cpu"`` (backend gloo) or ``"cuda"`` (NCCL; each rank takes ``cuda:LOCAL_RANK``).
    ``timeout_s``: how long a rank waits at a collective for the others (a rank that died or
    hangs) before it raises :class:`DistributedError`.
    """
    import torch.distributed as dist

    missing = [name for name in ENV if name not in os.environ]
    if missing:
        raise DistributedError(f"a distributed run needs torchrun's environment, and {missing} are not set: launch "
                               "it with `torchrun --nproc-per-node N -m tl_featureflow COMMAND --distributed ...`")
    if not (isinstance(timeout_s, (int, float)) and not isinstance(timeout_s, bool) and timeout_s > 0):
        raise InvalidArgumentError(f"timeout_s={timeout_s!r}: expected a positive number of seconds")
    rank, world, local = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"device={device!r}: a distributed run computes on 'cpu' (gloo) or 'cuda' (NCCL)")
    if kind == "cuda":
        if not torch.cuda.is_available() or torch.cuda.device_count() <= local:
            raise DistributedError(f"rank {rank} has LOCAL_RANK {local} but this machine has "
                                   f"{torch.cuda.device_count()} GPUs: use --nproc-per-node at most that")
        torch.cuda.set_device(local)
    where, backend = (torch.device("cuda", local), "nccl") if kind == "cuda" else (torch.device("cpu"), "gloo")
    joined = not dist.is_initialized()
    if joined:
        kwargs: dict[str, Any] = {"device_id": where} if kind == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(timeout_s)), **kwargs)
    return Ranks(dist.get_rank(), dist.get_world_size(), local, where, dist.get_backend(), float(timeout_s), joined)


def shutdown(ranks: Ranks) -> None:
    """Leave the process group if :func:`init` joined it for ``ranks`` (a group joined before, by the caller,
    stays theirs); nothing for a single process."""
    import torch.distributed as dist

    if ranks.joined and dist.is_initialized():
        dist.destroy_process_group()


# -- cutting the work ----------------------------------------------------------------------------------
def shard_range(n: int, ranks: Ranks, *, align: int = 1) -> range:
    """This rank's contiguous block of ``range(n)``: blocks in rank order, as even as whole ``align``-sized
    units allow (texts cut at multiples of a batch size keep every batch as one process reads it; sizes
    differ by at most ``align``)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InvalidArgumentError(f"n={n!r}: expected a number of items >= 0")
    if isinstance(align, bool) or not isinstance(align, int) or align < 1:
        raise InvalidArgumentError(f"align={align!r}: expected a positive int")
    units = -(-n // align)
    per, extra = divmod(units, ranks.world_size)
    first_long = ranks.world_size - extra          # the last ranks take one unit more: the last unit may be short
    start = ranks.rank * per + max(0, ranks.rank - first_long)
    stop = start + per + (1 if ranks.rank >= first_long else 0)
    return range(min(n, start * align), min(n, stop * align))


def shard_items(items: Sequence[T], ranks: Ranks) -> list[T]:
    """This rank's items of ``items``, round robin (item i goes to rank ``i % world_size``)."""
    return list(items[ranks.rank::ranks.world_size])


# -- collectives that fail together ----------------------------------------------------------------
def note(exc: BaseException, text: str) -> None:
    """Add ``text`` to ``exc``'s notes (Python 3.11+; shown in its traceback and a failed rank's message)."""
    if hasattr(exc, "add_note"):
        exc.add_note(text)


def _describe(exc: BaseException) -> str:
    notes = "; ".join(getattr(exc, "__notes__", []))
    return f"{type(exc).__name__}: {exc}" + (f" ({notes})" if notes else "")


def _collective(ranks: Ranks, what: str, call: Callable[[], T]) -> T:
    """A torch.distributed call; a peer that died or did not answer within the timeout is a DistributedError."""
    try:
        return call()
    except DistributedError:
        raise
    except Exception as exc:      # gloo / NCCL: a peer closed its connection, or the timeout passed
        raise DistributedError(f"{ranks}: the other ranks did not answer within {ranks.timeout_s:g} s while {what} "
                               f"(a rank died or hangs): {type(exc).__name__}: {exc}") from exc


def all_ok(ranks: Ranks, work: Callable[[], T], what: str) -> T:
    """Run ``work`` here and learn whether it succeeded on every rank; returns this rank's result.

    If it raised on some rank, every rank raises :class:`DistributedError` naming the failed
    ranks and their errors (``what`` says what the step was), so no rank waits for one that
    gave up. A single process runs ``work`` and lets its errors through unchanged.
    """
    if not ranks.grouped:
        return work()
    import torch.distributed as dist

    result: Any = None
    try:
        result, outcome = work(), None
    except Exception as exc:
        outcome = _describe(exc)
    outcomes: list[Any] = [None] * ranks.world_size
    _collective(ranks, what, lambda: dist.all_gather_object(outcomes, outcome))
    failed = [(rank, message) for rank, message in enumerate(outcomes) if message is not None]
    if len(failed) == ranks.world_size and len({message for _, message in failed}) == 1:
        raise DistributedError(f"every rank ({ranks.world_size}) failed while {what}: {failed[0][1]}")
    if failed:
        said = "; ".join(f"rank {rank} of {ranks.world_size} failed while {what}: {message}" for rank, message in failed)
        raise DistributedError(said)
    return result


def gather_to_root(ranks: Ranks, work: Callable[[], T], what: str) -> list[T] | None:
    """Every rank's result of ``work`` on rank 0 (in rank order; None on the others), failing together
    (:func:`all_ok`). Results travel pickled: move tensors to the CPU in ``work``."""
    result = all_ok(ranks, work, what)
    if not ranks.grouped:
        return [result]
    import torch.distributed as dist

    gathered: list[Any] | None = [None] * ranks.world_size if ranks.is_root else None
    _collective(ranks, f"gathering the results of {what}", lambda: dist.gather_object(result, gathered, dst=0))
    return gathered


def broadcast_from_root(ranks: Ranks, work: Callable[[], T], what: str) -> T:
    """Rank 0's result of ``work`` on every rank (the others only wait); a failure on rank 0 ends every rank."""
    result = all_ok(ranks, work if ranks.is_root else (lambda: None), what)
    if not ranks.grouped:
        return result
    import torch.distributed as dist

    box = [result]
    _collective(ranks, f"sharing the result of {what}", lambda: dist.broadcast_object_list(box, src=0))
    return box[0]

"""Data-parallel ranks: one code path for 1 process, N local processes and N GPUs on several nodes (docs/design.md §6).

A stage launched by `torchrun` or `accelerate launch` (they set RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT)
joins the process group on first use; launched plainly it is rank 0 of 1 and every collective below is a no-op,
so the one-process path costs nothing.

    r = distributed.ranks()                      # Ranks(rank=0, world=1) when not launched
    for shard in r.mine(n_shards): ...           # shard s belongs to rank s % world
    distributed.barrier("pool encoding")         # wait for every rank (with the collective timeout)
    value = distributed.main_first(fn)           # rank 0 runs fn (say, fills a cache), then the others do
    total = distributed.all_reduce_sum(tensor)

Collectives time out after `$FINESCOPE_COLLECTIVE_TIMEOUT` seconds (default 1800): a rank that died makes the
others exit with a one-line error rather than hang. Work shared between ranks goes through files, so every rank
must see the same `$FINESCOPE_HOME` and run directory (one machine, or a shared filesystem across nodes).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch

from . import FinescopeError

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 1800


class DistributedError(FinescopeError):
    """A rank failed or a collective timed out."""


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tag(self) -> str:
        """ " [rank r/w]" for progress lines and messages under several ranks; empty for one process."""
        return f" [rank {self.rank}/{self.world}]" if self.world > 1 else ""

    def mine(self, n: int) -> range:
        """Indices of the n work items this rank owns: i ≡ rank (mod world), a split that does not depend on
        which items are already done, so a resumed run with another process count picks up exactly the rest."""
        return range(self.rank, n, self.world)


def timeout_s() -> float:
    raw = os.environ.get("FINESCOPE_COLLECTIVE_TIMEOUT", "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_TIMEOUT_S
    except ValueError:
        raise DistributedError(f"FINESCOPE_COLLECTIVE_TIMEOUT: {raw!r} is not a number of seconds") from None
    if value <= 0:
        raise DistributedError(f"FINESCOPE_COLLECTIVE_TIMEOUT: must be positive, got {raw!r}")
    return value


def _launcher_int(name: str, default: str) -> int:
    raw = os.environ.get(name, default)
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"{name}: {raw!r} is not an integer (set by torchrun / accelerate launch)") from None


def launched_world() -> int:
    """WORLD_SIZE as torchrun / accelerate launch set it (1 when not launched), without joining the group."""
    return _launcher_int("WORLD_SIZE", "1")


def _local_rank() -> int:
    return _launcher_int("LOCAL_RANK", "0")


def ranks() -> Ranks:
    """This process's rank and the world size, joining the process group when launched with several ranks."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    if launched_world() <= 1:
        return Ranks()
    _init()
    return Ranks(dist.get_rank(), dist.get_world_size())


def _init() -> None:
    import torch.distributed as dist

    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        # One GPU per rank; a launcher that shows each process only its own GPU (CUDA_VISIBLE_DEVICES) has one.
        torch.cuda.set_device(_local_rank() % torch.cuda.device_count())
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s()))
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"could not join the process group ({backend}): {_first_line(e)}") from None


_OBJECT_GROUP: Any = None


def _object_group() -> Any:
    """The gloo group that barriers and pickled-object collectives use, created on first use (every rank makes
    these calls in the same order, as `new_group` needs). Under NCCL, a rank waiting for rank 0 to finish a long
    phase (SAE training, the KD cache, slicing and verifying) waits in gloo on the CPU: no GPU memory for pickles,
    and a timeout is a Python error that `_collective` turns into one line, where NCCL's watchdog would abort the
    process. Under gloo it is a second gloo group: the same code path on CPU and GPU."""
    global _OBJECT_GROUP
    if _OBJECT_GROUP is None:
        import torch.distributed as dist

        _OBJECT_GROUP = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s()))
    return _OBJECT_GROUP


def shutdown(*, failed: bool = False) -> None:
    """Leave the process group, if this process joined one (the CLI calls it once, on the way out). A gloo group
    left to the interpreter's exit tears down its worker threads in whatever order the C++ statics die, and on a
    busy 2-core machine about one exit in three then aborts ("terminate called without an active exception",
    SIGABRT) after the stage's work is done and written; destroying the groups first joins those threads. After a
    failure (`failed`), only gloo groups are destroyed: that is local to the process, where an NCCL group's
    teardown may wait on a collective that a dead peer never finishes."""
    global _OBJECT_GROUP
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if failed and dist.get_backend() != "gloo":
        return
    _OBJECT_GROUP = None
    try:
        dist.destroy_process_group()
    except RuntimeError as e:  # the stage's outcome stands; say why the teardown did not
        print(f"warning: leaving the process group failed: {_first_line(e)}", file=sys.stderr)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _collective(what: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except RuntimeError as e:  # gloo/nccl timeouts and peers that went away surface as RuntimeError
        r = ranks()
        raise DistributedError(
            f"rank {r.rank}/{r.world}: {what} failed after waiting up to {timeout_s():.0f} s "
            f"(FINESCOPE_COLLECTIVE_TIMEOUT): another rank died or hangs; see its log ({_first_line(e)})"
        ) from None


def barrier(what: str = "barrier") -> None:
    if ranks().world > 1:
        import torch.distributed as dist

        _collective(what, lambda: dist.barrier(group=_object_group()))


def all_reduce_sum(t: torch.Tensor, what: str = "all-reduce") -> torch.Tensor:
    """The elementwise sum of `t` over ranks (in place; returned for convenience). A tensor on another device
    than the backend's (a CPU tensor under nccl, a CUDA one under gloo) travels through a copy."""
    if ranks().world > 1:
        import torch.distributed as dist

        on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        buf = t if t.device == on else t.to(on)
        _collective(what, lambda: dist.all_reduce(buf, op=dist.ReduceOp.SUM))
        if buf is not t:
            t.copy_(buf)
    return t


def broadcast_object(obj: Any, what: str = "broadcast") -> Any:
    """Rank 0's `obj` on every rank (picklable Python values: flags, messages, small lists)."""
    if ranks().world <= 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    _collective(what, lambda: dist.broadcast_object_list(box, src=0, group=_object_group()))
    return box[0]


def on_main(fn: Callable[[], T], what: str) -> T:
    """Run `fn` on rank 0 and give its result (picklable) to every rank; an error on rank 0 is raised on every
    rank, so the others do not wait for a collective that rank 0 will never reach."""
    return _main_then_share(fn, what, share=True)


def main_first(fn: Callable[[], T], what: str) -> T:
    """Rank 0 runs `fn` first (say, it fills a cache or converts a model), then the other ranks run it and find
    the cache. An error on rank 0 is raised on every rank."""
    r = ranks()
    if r.world <= 1:
        return fn()
    if r.is_main:
        return _main_then_share(fn, what, share=False)
    _main_then_share(lambda: None, what, share=False)
    return fn()


def _main_then_share(fn: Callable[[], Any], what: str, *, share: bool) -> Any:
    r = ranks()
    if r.world <= 1:
        return fn()
    result = None
    if r.is_main:
        try:
            result = fn()
        except FinescopeError as e:
            broadcast_object(("error", str(e)), what)
            raise
        except BaseException as e:
            broadcast_object(("error", f"{type(e).__name__}: {_first_line(e)}"), what)
            raise
    outcome = broadcast_object(("ok", result if share else None) if r.is_main else None, what)
    if outcome[0] == "error":
        raise DistributedError(f"rank 0 failed during {what}: {outcome[1]}")
    return result if r.is_main else outcome[1]


def all_gather_object(obj: Any, what: str = "gather") -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    r = ranks()
    if r.world <= 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * r.world
    _collective(what, lambda: dist.all_gather_object(out, obj, group=_object_group()))
    return out


def merge_indexed(local: dict[int, T], n: int, what: str = "gather") -> list[T]:
    """The list of n results that the ranks computed between them, each rank holding {index: result} of its
    share; every index must be computed by exactly one rank."""
    merged: dict[int, T] = {}
    for part in all_gather_object(local, what):
        merged.update(part)
    missing = [i for i in range(n) if i not in merged]
    if missing:
        raise DistributedError(f"{what}: no rank computed items {missing[:5]} of {n}")
    return [merged[i] for i in range(n)]


def map_sharded(items: list, fn: Callable[[Any], T], what: str = "map") -> list[T]:
    """[fn(x) for x in items], item i computed by rank i mod world and gathered in order on every rank."""
    r = ranks()
    if r.world <= 1:
        return [fn(x) for x in items]
    return merge_indexed({i: fn(items[i]) for i in r.mine(len(items))}, len(items), what)

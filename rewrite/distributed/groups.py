"""Sequence groups: the ranks one sequence is split over, and the collectives the strategies need.

The rewritten graph names its group by a string (plans are data); `get_group(name)` resolves it at
call time. `"world"` is torch.distributed's default group; `register_group` binds other names to a
process group or one dimension of a DeviceMesh; `bind_group` binds a name for the current thread
only (simulated ranks run as threads of one process).

Every communicator offers the same plain-tensor collectives (no autograd; see `collectives` for the
differentiable forms): all-gather, all-to-all, all-reduce and a point-to-point `exchange`.
`CountingGroup` wraps one to count the bytes each collective delivers.
"""

from __future__ import annotations

import contextlib
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist

from rewrite.errors import RewriteError

T = TypeVar("T")
Partition = tuple[tuple[int, ...], ...]
"""Disjoint tuples of a group's ranks that together cover it (see `SequenceGroup.subgroup`)."""


def own_part(partition: Partition, rank: int) -> tuple[int, ...]:
    """The part of `partition` that holds `rank` (GroupError when the partition does not cover it)."""
    for part in partition:
        if rank in part:
            return part
    raise GroupError(f"rank {rank} is in no part of the partition {partition}")


class GroupError(RewriteError):
    """A sequence group is unknown, not initialised, or the wrong size for a strategy."""


class PendingExchange(Protocol):
    """A started exchange; `wait()` returns the received tensor (None when nothing is received)."""

    def wait(self) -> torch.Tensor | None: ...


@dataclass
class _Done:
    value: torch.Tensor | None

    def wait(self) -> torch.Tensor | None:
        return self.value


class SequenceGroup:
    """The ranks one sequence is split over (base class: subclasses implement the collectives)."""

    rank: int
    size: int

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[size, *x.shape]: every rank's x, in rank order."""
        raise NotImplementedError

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """x [size, ...]: row j goes to rank j; returns [size, ...] whose row j came from rank j."""
        raise NotImplementedError

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x over the ranks."""
        return self.all_gather(x).sum(0)

    def exchange_start(
        self, x: torch.Tensor | None, dst: int | None, src: int | None, like: torch.Tensor | None = None
    ) -> PendingExchange:
        """Start sending x to rank dst and receiving a tensor shaped like `like` (default x) from rank src.

        Either side may be None. Every rank of the group calls it together (threads meet at it).
        """
        raise NotImplementedError

    def exchange(
        self, x: torch.Tensor | None, dst: int | None, src: int | None, like: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Send x to dst, receive from src (shaped like `like`, default x); None where nothing is received."""
        return self.exchange_start(x, dst, src, like=like).wait()

    def subgroup(self, partition: Partition) -> SequenceGroup:
        """The group, among `partition` (disjoint tuples of this group's ranks covering it), that holds this rank.

        Every rank of the group calls it together with the same partition. A rank's index in its part is
        its rank in the subgroup.
        """
        raise GroupError(f"{type(self).__name__} cannot form subgroups")


class ProcessGroupSequenceGroup(SequenceGroup):
    """A torch.distributed process group (gloo, NCCL, ...)."""

    def __init__(self, group: Any = None):
        if not dist.is_available() or not dist.is_initialized():
            raise GroupError(
                "sequence parallelism needs torch.distributed initialised (torch.distributed.init_process_group, "
                "e.g. under torchrun) or a group bound with rewrite.distributed.register_group / bind_group"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1).contiguous()
        out = flat.new_empty(self.size * flat.numel())
        dist.all_gather_into_tensor(out, flat, group=self.group)
        return out.view(self.size, *x.shape)

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=self.group)
        return out

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone().contiguous()
        dist.all_reduce(out, group=self.group)
        return out

    def exchange_start(
        self, x: torch.Tensor | None, dst: int | None, src: int | None, like: torch.Tensor | None = None
    ) -> PendingExchange:
        ops, received = [], None
        if dst is not None and x is not None:
            ops.append(dist.P2POp(dist.isend, x.contiguous(), self._global(dst), self.group))
        if src is not None:
            template = like if like is not None else x
            assert template is not None, "exchange: receiving needs a tensor to take the shape from"
            received = torch.empty_like(template, memory_format=torch.contiguous_format)
            ops.append(dist.P2POp(dist.irecv, received, self._global(src), self.group))
        works = dist.batch_isend_irecv(ops) if ops else []
        return _Waiting(works, received)

    def subgroup(self, partition: Partition) -> SequenceGroup:
        part = own_part(partition, self.rank)
        key = (id(self.group), part)
        if key not in _PROCESS_SUBGROUPS:  # only the part's members meet to create it
            ranks = [self._global(r) for r in part]
            _PROCESS_SUBGROUPS[key] = dist.new_group(ranks, use_local_synchronization=True)
        return ProcessGroupSequenceGroup(_PROCESS_SUBGROUPS[key])


_PROCESS_SUBGROUPS: dict[tuple[int, tuple[int, ...]], Any] = {}
"""Process subgroups already created, by (parent group id, member ranks in the parent)."""


@dataclass
class _Waiting:
    works: list
    value: torch.Tensor | None

    def wait(self) -> torch.Tensor | None:
        for work in self.works:
            work.wait()
        return self.value


@dataclass
class CollectiveRecord:
    """Bytes one collective kind delivered to this rank: calls and bytes received from other ranks."""

    calls: int = 0
    bytes_received: int = 0


class CountingGroup(SequenceGroup):
    """Wraps a group and counts, per collective kind, the bytes this rank receives from other ranks."""

    def __init__(self, inner: SequenceGroup, root: CountingGroup | None = None):
        self.inner = inner
        self.rank, self.size = inner.rank, inner.size
        self.root = root  # a subgroup counts into the records (and under the label) of the group it came from
        self.records: dict[str, CollectiveRecord] = root.records if root is not None else defaultdict(CollectiveRecord)
        self.label = ""

    @contextlib.contextmanager
    def labelled(self, label: str) -> Iterator[None]:
        """Count collectives issued inside the block under `label/kind`."""
        old, self.label = self.label, label
        try:
            yield
        finally:
            self.label = old

    def subgroup(self, partition: Partition) -> SequenceGroup:
        return CountingGroup(self.inner.subgroup(partition), root=self.root or self)

    def _count(self, kind: str, nbytes: int) -> None:
        label = (self.root or self).label
        rec = self.records[f"{label}/{kind}" if label else kind]
        rec.calls += 1
        rec.bytes_received += int(nbytes)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        self._count("all_gather", (self.size - 1) * x.numel() * x.element_size())
        return self.inner.all_gather(x)

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        self._count("all_to_all", (self.size - 1) * (x.numel() // self.size) * x.element_size())
        return self.inner.all_to_all(x)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self._count("all_reduce", (self.size - 1) * x.numel() * x.element_size())
        return self.inner.all_reduce(x)

    def exchange_start(
        self, x: torch.Tensor | None, dst: int | None, src: int | None, like: torch.Tensor | None = None
    ) -> PendingExchange:
        if src is not None:
            template = like if like is not None else x
            assert template is not None
            self._count("exchange", template.numel() * template.element_size())
        return self.inner.exchange_start(x, dst, src, like=like)

    def total_bytes(self) -> int:
        return sum(r.bytes_received for r in self.records.values())


_REGISTRY: dict[str, SequenceGroup | Any] = {}
_THREAD = threading.local()


def register_group(name: str, group: Any = None, *, mesh_dim: str | int | None = None) -> None:
    """Bind `name` to a process group, a DeviceMesh (with `mesh_dim`), or a SequenceGroup, for every thread."""
    if mesh_dim is not None:
        group = group.get_group(mesh_dim)
    _REGISTRY[name] = group


@contextlib.contextmanager
def bind_group(name: str, group: SequenceGroup) -> Iterator[SequenceGroup]:
    """Bind `name` to `group` for the current thread inside the block (simulated ranks, tests)."""
    bound = getattr(_THREAD, "groups", None)
    if bound is None:
        bound = _THREAD.groups = {}
    old = bound.get(name)
    bound[name] = group
    try:
        yield group
    finally:
        if old is None:
            bound.pop(name, None)
        else:
            bound[name] = old


def get_group(name: str) -> SequenceGroup:
    """The sequence group a graph names: thread binding, then registered groups, then torch.distributed."""
    bound = getattr(_THREAD, "groups", None) or {}
    if name in bound:
        return bound[name]
    if name in _REGISTRY:
        entry = _REGISTRY[name]
        return entry if isinstance(entry, SequenceGroup) else ProcessGroupSequenceGroup(entry)
    if name == "world":
        return ProcessGroupSequenceGroup(None)
    known = sorted({"world", *_REGISTRY, *bound})
    raise GroupError(f"unknown sequence group {name!r}; register it with rewrite.distributed.register_group "
                     f"(known: {', '.join(known)})")


def group_size_if_known(name: str) -> int | None:
    """The size of group `name` when it can be resolved now, else None (checked again at run time)."""
    try:
        return get_group(name).size
    except GroupError:
        return None


@dataclass
class ThreadedGroupState:
    """Shared state of ranks that run as threads of one process (simulated ranks)."""

    size: int
    barrier: threading.Barrier = field(init=False)
    slots: list[Any] = field(init=False)
    p2p: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    subgroups: dict[tuple[int, ...], ThreadedGroupState] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.barrier = threading.Barrier(self.size)
        self.slots = [None] * self.size

    def abort(self) -> None:
        """Abort this barrier and every subgroup's, so no rank waits for one that failed."""
        self.barrier.abort()
        with self.lock:
            children = list(self.subgroups.values())
        for child in children:
            child.abort()


class ThreadedSequenceGroup(SequenceGroup):
    """One rank of a group whose ranks are threads of this process, meeting at a barrier per collective."""

    def __init__(self, state: ThreadedGroupState, rank: int):
        self.state, self.rank, self.size = state, rank, state.size

    def _gather_objects(self, x: Any) -> list[Any]:
        self.state.slots[self.rank] = x
        self.state.barrier.wait()
        out = list(self.state.slots)
        self.state.barrier.wait()
        return out

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([t.to(x.device) for t in self._gather_objects(x.detach().clone())])

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._gather_objects(x.detach().clone())
        return torch.stack([rows[j][self.rank] for j in range(self.size)])

    def exchange_start(
        self, x: torch.Tensor | None, dst: int | None, src: int | None, like: torch.Tensor | None = None
    ) -> PendingExchange:
        if dst is not None and x is not None:
            self.state.p2p[(self.rank, dst)] = x.detach().clone()
        self.state.barrier.wait()
        received = self.state.p2p.pop((src, self.rank)) if src is not None else None
        self.state.barrier.wait()
        return _Done(received)

    def subgroup(self, partition: Partition) -> SequenceGroup:
        part = own_part(partition, self.rank)
        with self.state.lock:
            state = self.state.subgroups.get(part)
            if state is None:
                state = self.state.subgroups[part] = ThreadedGroupState(len(part))
        return ThreadedSequenceGroup(state, part.index(self.rank))


def threaded_groups(size: int) -> list[ThreadedSequenceGroup]:
    """`size` ranks that meet through a barrier: run rank r's work in thread r with `bind_group`."""
    state = ThreadedGroupState(size)
    return [ThreadedSequenceGroup(state, r) for r in range(size)]


def run_on_threads(groups: list[ThreadedSequenceGroup], work: Callable[[int], T]) -> list[T]:
    """Run `work(rank)` for every rank of `groups` on a thread of its own; returns the results by rank.

    `work` binds the rank's group itself (`bind_group`). An error on one rank aborts the group's
    barrier, so the other ranks stop at their next collective instead of waiting for ever; the
    first error is raised once every thread has ended.
    """
    results: list[Any] = [None] * len(groups)
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            results[rank] = work(rank)
        except BaseException as error:  # re-raised below, in the caller's thread
            errors.append(error)
            groups[rank].state.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(groups))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


class ReplayGroup(SequenceGroup):
    """Returns, in order, the tensors a recorded run delivered to this rank: one rank's work alone."""

    def __init__(self, rank: int, size: int, delivered: list[torch.Tensor | None], root: ReplayGroup | None = None):
        self.rank, self.size = rank, size
        self.delivered = delivered
        self.position = 0
        self.root = root  # subgroups replay from the same list, in the order the recorded run issued

    def subgroup(self, partition: Partition) -> SequenceGroup:
        part = own_part(partition, self.rank)
        return ReplayGroup(part.index(self.rank), len(part), self.delivered, root=self.root or self)

    def _next(self) -> torch.Tensor | None:
        owner = self.root or self
        if owner.position >= len(self.delivered):
            raise GroupError("replay: more collectives than the recorded run issued")
        value = self.delivered[owner.position]
        owner.position += 1
        return value

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return self._next()  # type: ignore[return-value]

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        return self._next()  # type: ignore[return-value]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self._next()  # type: ignore[return-value]

    def exchange_start(
        self, x: torch.Tensor | None, dst: int | None, src: int | None, like: torch.Tensor | None = None
    ) -> PendingExchange:
        return _Done(self._next())


class RecordingGroup(SequenceGroup):
    """Wraps a group and keeps every tensor it delivers to this rank, for a `ReplayGroup` later."""

    def __init__(self, inner: SequenceGroup, delivered: list[torch.Tensor | None] | None = None):
        self.inner = inner
        self.rank, self.size = inner.rank, inner.size
        self.delivered: list[torch.Tensor | None] = [] if delivered is None else delivered

    def subgroup(self, partition: Partition) -> SequenceGroup:
        return RecordingGroup(self.inner.subgroup(partition), self.delivered)

    def _keep(self, value: torch.Tensor | None) -> torch.Tensor | None:
        self.delivered.append(value)
        return value

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return self._keep(self.inner.all_gather(x))  # type: ignore[return-value]

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        return self._keep(self.inner.all_to_all(x))  # type: ignore[return-value]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self._keep(self.inner.all_reduce(x))  # type: ignore[return-value]

    def exchange_start(
        self, x: torch.Tensor | None, dst: int | None, src: int | None, like: torch.Tensor | None = None
    ) -> PendingExchange:
        return _Done(self._keep(self.inner.exchange_start(x, dst, src, like=like).wait()))

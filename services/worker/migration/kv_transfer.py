"""Moving KV blocks between two workers over torch.distributed (DESIGN §6).

Groups. One two-rank process group per *direction* of a pair (src -> dst), created lazily
the first time src migrates to dst, with no world-wide group: the destination hosts a
TCPStore on a free port of the configured interface (FERRY_BIND_HOST) and answers
MigPrealloc with its address; both sides then build the group (gloo on CPU, NCCL on GPU)
in the group's own thread. The group id, which prefixes every key the two put in the
store, ends in 128 random bits and travels only in MigPreallocReply (on the CURVE channel
when the cluster has keys): a process that reaches the store's port but not the control
channel cannot name a key of the group, let alone join it. Rank 0 sends, rank 1
receives. A group per direction means each group has one sender and one receiver, so
transfers are ordered by the control messages that announce them and cannot deadlock.

Data path. Blocks are gathered with one indexed copy per chunk (the KV layout is
block-major) into a staging buffer and sent in chunks of `chunk_bytes`:

    sender (side stream)   gather c0 -> send c0 | gather c1 -> send c1 | gather c2 (waits c0 sent)
    receiver (side stream) recv c0 -> scatter c0 | recv c1 -> scatter c1 | ...

Two staging buffers per group overlap the gather of chunk i+1 with the send of chunk i.
All blocking calls run in the group's single thread; asyncio callers await a future.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import secrets
import socket
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ferry.common.logging import get_logger

SENDER_RANK = 0
RECEIVER_RANK = 1

log = get_logger()


@dataclass
class KVGroup:
    group_id: str
    peer_instance_id: str
    rank: int
    thread: ThreadPoolExecutor  # one thread: every op of the group runs here, in order
    ready: Future  # resolves to the ProcessGroup once both ranks joined
    store: dist.TCPStore | None = None  # kept alive on the hosting (receiving) side
    staging: list[torch.Tensor] = field(default_factory=list)  # two chunk buffers
    stream: object | None = None  # torch.cuda.Stream on GPU
    broken: bool = False  # a transfer failed; the group is dropped and rebuilt next time


class KVTransport:
    """Pairwise KV groups of one worker and the chunked send/recv over them."""

    def __init__(
        self,
        kv_cache: torch.Tensor,
        *,
        instance_id: str,
        advertise_host: str,
        chunk_bytes: int,
        timeout_s: float,
        bind_host: str = "127.0.0.1",
    ) -> None:
        self.kv_cache = kv_cache  # [num_blocks, ...] block-major, one block per row
        self.instance_id = instance_id
        self.advertise_host = advertise_host
        self.bind_host = bind_host  # the interface the stores listen on
        self.block_bytes = kv_cache[0].numel() * kv_cache.element_size()
        self.blocks_per_chunk = max(1, chunk_bytes // self.block_bytes)
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.backend = "nccl" if kv_cache.is_cuda else "gloo"
        self._sending: dict[str, KVGroup] = {}  # dst instance id -> group
        self._receiving: dict[str, KVGroup] = {}  # group id -> group
        self._receiving_from: dict[str, str] = {}  # src instance id -> group id
        self._counter = itertools.count()
        self._lock = threading.Lock()

    # ---- groups -----------------------------------------------------------------------

    def sending_group_id(self, dst_instance_id: str) -> str | None:
        group = self._sending.get(dst_instance_id)
        return None if group is None or group.broken else group.group_id

    def open_receiving(self, src_instance_id: str, known_group_id: str | None) -> tuple[str, str]:
        """Destination side: reuse the group src names, or host a new one.
        Returns (group_id, store_addr 'host:port')."""
        group_id = self._receiving_from.get(src_instance_id)
        group = self._receiving.get(group_id) if group_id else None
        if group is not None and not group.broken and group_id == known_group_id:
            return group.group_id, ""
        if group is not None:
            self._drop(group)
        group_id = (f"{src_instance_id}->{self.instance_id}#{next(self._counter)}-"
                    f"{secrets.token_hex(16)}")
        store = self._host_store()
        group = self._new_group(group_id, src_instance_id, RECEIVER_RANK, store)
        self._receiving[group_id] = group
        self._receiving_from[src_instance_id] = group_id
        return group_id, f"{self.advertise_host}:{store.port}"

    def _host_store(self) -> dist.TCPStore:
        """A TCPStore listening on bind_host only (TCPStore alone listens on every
        interface): on a socket bound here, whose descriptor the store then owns."""
        family = socket.AF_INET6 if ":" in self.bind_host else socket.AF_INET
        with socket.create_server((self.bind_host, 0), family=family) as listener:
            port = listener.getsockname()[1]
            fd = listener.detach()  # the store closes it
        try:
            return dist.TCPStore(self.bind_host, port, world_size=2, is_master=True,
                                 timeout=self.timeout, wait_for_workers=False,
                                 master_listen_fd=fd)
        except BaseException:
            socket.close(fd)
            raise

    def join_sending(self, dst_instance_id: str, group_id: str, store_addr: str) -> None:
        """Source side: join the group the destination named (no-op if already in it)."""
        group = self._sending.get(dst_instance_id)
        if group is not None and group.group_id == group_id and not group.broken:
            return
        if group is not None:
            self._drop(group)
        host, port = store_addr.rsplit(":", 1)

        def connect() -> dist.TCPStore:  # runs in the group's thread: connecting blocks
            return dist.TCPStore(host, int(port), world_size=2, is_master=False,
                                 timeout=self.timeout)

        self._sending[dst_instance_id] = self._new_group(group_id, dst_instance_id, SENDER_RANK,
                                                         connect)

    def _new_group(self, group_id: str, peer: str, rank: int, store) -> KVGroup:
        """store: the hosted TCPStore, or a function connecting to the peer's one."""
        group = KVGroup(
            group_id=group_id, peer_instance_id=peer, rank=rank,
            thread=ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kv-{group_id}"),
            ready=Future(), store=store if isinstance(store, dist.TCPStore) else None)
        if self.kv_cache.is_cuda:
            # High priority: a gather's blocks are scheduled ahead of the model's kernels.
            group.stream = torch.cuda.Stream(device=self.kv_cache.device, priority=-1)

        def build() -> object:
            self._bind_device()
            if self.kv_cache.is_cuda:
                self._staging(group, self.blocks_per_chunk)
            prefixed = dist.PrefixStore(group_id, store if isinstance(store, dist.TCPStore)
                                        else store())
            if self.backend == "nccl":
                options = dist.ProcessGroupNCCL.Options()
                options.is_high_priority_stream = True  # KV copies jump the queue
                return dist.ProcessGroupNCCL(prefixed, rank, 2, options)
            return dist.ProcessGroupGloo(prefixed, rank, 2, self.timeout)

        group.ready = group.thread.submit(build)
        return group

    def _drop(self, group: KVGroup) -> None:
        group.broken = True
        self._sending = {k: g for k, g in self._sending.items() if g is not group}
        self._receiving.pop(group.group_id, None)
        self._receiving_from = {k: v for k, v in self._receiving_from.items() if v != group.group_id}
        group.thread.shutdown(wait=False, cancel_futures=True)
        if group.ready.done() and group.ready.exception() is None:
            pg = group.ready.result()
            if hasattr(pg, "abort"):
                try:
                    pg.abort()
                except Exception:  # best effort: the peer may be gone
                    pass

    def close(self) -> None:
        for group in list(self._sending.values()) + list(self._receiving.values()):
            self._drop(group)

    def checksum(self, block_ids: list[int]) -> int:
        """Exact, order-independent digest of the blocks' contents: the sum of their bit
        patterns as integers (same value on any device, no float rounding)."""
        idx = torch.tensor(block_ids, dtype=torch.long).to(self.kv_cache.device)
        data = self.kv_cache.index_select(0, idx)
        bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
        ints = data.view(bits[data.element_size()])
        return int(ints.sum(dtype=torch.int64).item())

    # ---- transfers ----------------------------------------------------------------------

    async def send(self, dst_instance_id: str, block_ids: list[int]) -> int:
        """Send the KV of block_ids to dst (which posts matching receives). Returns bytes.
        The blocks must hold completed writes (the stepper syncs every step first). The
        send is queued on the group's thread before the first suspension: awaited right
        after the control message announcing it, the two keep their order."""
        if not block_ids:  # nothing to send (the receiver posts nothing either)
            return 0
        group = self._sending[dst_instance_id]
        return await self._submit(group, self._send_blocks, group, block_ids)

    async def recv(self, group_id: str, block_ids: list[int]) -> int:
        """Receive KV into block_ids from the group's sender. Returns bytes."""
        return await self.post_recv(group_id, block_ids)

    def post_recv(self, group_id: str, block_ids: list[int]) -> asyncio.Future[int]:
        """recv, posted (queued on the group's thread, in order) before this returns; the
        future resolves to the bytes received. The blocks stay being written until then,
        whatever the caller awaits meanwhile."""
        if not block_ids:
            done = asyncio.get_running_loop().create_future()
            done.set_result(0)
            return done
        group = self._receiving[group_id]
        return self._submit(group, self._recv_blocks, group, block_ids)

    def _submit(self, group: KVGroup, fn, *args) -> asyncio.Future[int]:
        """fn(*args) on the group's thread; a failure drops the group (rebuilt next time)."""
        future = asyncio.wrap_future(group.thread.submit(fn, *args))

        def drop_on_failure(f: asyncio.Future) -> None:
            if not f.cancelled() and f.exception() is not None:
                self._drop(group)

        future.add_done_callback(drop_on_failure)
        return future

    def _chunks(self, block_ids: list[int]) -> list[torch.Tensor]:
        """The block ids as device index tensors, one per chunk. On GPU, call it inside the
        group's stream: a plain `torch.tensor(..., device=cuda)` is a pageable copy on the
        legacy default stream and would wait for the model's in-flight step."""
        idx = torch.tensor(block_ids, dtype=torch.long)
        if self.kv_cache.is_cuda:
            idx = idx.pin_memory().to(self.kv_cache.device, non_blocking=True)
        return list(idx.split(self.blocks_per_chunk))

    def _staging(self, group: KVGroup, num_blocks: int) -> list[torch.Tensor]:
        """Two chunk buffers. On GPU full-size from the start (cudaMalloc can synchronize
        the device, so it must not happen in the middle of a migration); on CPU sized to
        the transfer and grown on demand."""
        rows = self.blocks_per_chunk if self.kv_cache.is_cuda else \
            min(self.blocks_per_chunk, num_blocks)
        if not group.staging or group.staging[0].shape[0] < rows:
            shape = (rows, *self.kv_cache.shape[1:])
            group.staging = [
                torch.empty(shape, dtype=self.kv_cache.dtype, device=self.kv_cache.device)
                for _ in range(2)
            ]
        return group.staging

    def _bind_device(self) -> None:
        """The current CUDA device is per thread: make it the KV cache's in this one."""
        if self.kv_cache.is_cuda:
            torch.cuda.set_device(self.kv_cache.device)

    def _send_blocks(self, group: KVGroup, block_ids: list[int]) -> int:
        self._bind_device()
        pg = group.ready.result(timeout=self.timeout.total_seconds())
        staging = self._staging(group, len(block_ids))
        if group.stream is None:  # CPU / gloo: synchronous, one chunk at a time
            for idx in self._chunks(block_ids):
                buf = staging[0][: len(idx)]
                torch.index_select(self.kv_cache, 0, idx, out=buf)
                pg.send([buf], RECEIVER_RANK, 0).wait(self.timeout)
            return len(block_ids) * self.block_bytes
        with torch.cuda.stream(group.stream):
            works = []
            for i, idx in enumerate(self._chunks(block_ids)):
                if i >= 2:
                    works[i - 2].wait()  # the stream waits until staging[i % 2] was sent
                buf = staging[i % 2][: len(idx)]
                torch.index_select(self.kv_cache, 0, idx, out=buf)
                works.append(pg.send([buf], RECEIVER_RANK, 0))
            for work in works[-2:]:
                work.wait()
            group.stream.synchronize()
        return len(block_ids) * self.block_bytes

    def _recv_blocks(self, group: KVGroup, block_ids: list[int]) -> int:
        self._bind_device()
        pg = group.ready.result(timeout=self.timeout.total_seconds())
        staging = self._staging(group, len(block_ids))
        if group.stream is None:
            for idx in self._chunks(block_ids):
                buf = staging[0][: len(idx)]
                pg.recv([buf], SENDER_RANK, 0).wait(self.timeout)
                self.kv_cache.index_copy_(0, idx, buf)
            return len(block_ids) * self.block_bytes
        with torch.cuda.stream(group.stream):
            for i, idx in enumerate(self._chunks(block_ids)):
                buf = staging[i % 2][: len(idx)]
                pg.recv([buf], SENDER_RANK, 0).wait()  # the stream waits for the data
                self.kv_cache.index_copy_(0, idx, buf)
            group.stream.synchronize()
        return len(block_ids) * self.block_bytes


class SimulatedTransport:
    """For the sim executor: no tensors; a transfer takes bytes / bandwidth."""

    def __init__(self, *, block_bytes: int, bandwidth_bytes_s: float, instance_id: str) -> None:
        self.block_bytes = block_bytes
        self.bandwidth_bytes_s = bandwidth_bytes_s
        self.instance_id = instance_id

    def sending_group_id(self, dst_instance_id: str) -> str | None:
        return f"sim:{self.instance_id}->{dst_instance_id}"

    def open_receiving(self, src_instance_id: str, known_group_id: str | None) -> tuple[str, str]:
        return f"sim:{src_instance_id}->{self.instance_id}", ""

    def join_sending(self, dst_instance_id: str, group_id: str, store_addr: str) -> None:
        pass

    async def send(self, dst_instance_id: str, block_ids: list[int]) -> int:
        num_bytes = len(block_ids) * self.block_bytes
        await asyncio.sleep(num_bytes / self.bandwidth_bytes_s)
        return num_bytes

    async def recv(self, group_id: str, block_ids: list[int]) -> int:
        return len(block_ids) * self.block_bytes

    def post_recv(self, group_id: str, block_ids: list[int]) -> asyncio.Future[int]:
        done = asyncio.get_running_loop().create_future()
        done.set_result(len(block_ids) * self.block_bytes)
        return done

    def close(self) -> None:
        pass

    def checksum(self, block_ids: list[int]) -> int:
        return 0  # no tensors to check

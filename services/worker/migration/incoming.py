"""Destination side of one live migration: the asyncio driver of `machine.Incoming`.

The machine decides (DESIGN §6; its docstring has the states and the block table
layout with dedup); this runs its ops: replies through `send`, stage receives through
`kv`, the import into the engine, and a wall-clock timeout on every wait. Messages of one
migration are handled in order by its own task (`inbox`, bounded): a stage's receive
completes before the next message (the commit) is looked at.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ferry.services.worker.engine.engine import Engine
from ferry.services.worker.migration import machine
from ferry.services.worker.migration.machine import Incoming, InPhase

__all__ = ["IncomingMigration", "IncomingRunner", "InPhase"]


@dataclass(slots=True)
class IncomingMigration:
    machine: Incoming
    src_inbox_addr: str
    group_id: str
    inbox: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=64))
    started_s: float = field(default_factory=time.perf_counter)

    @property
    def migration_id(self) -> str:
        return self.machine.migration_id

    @property
    def req_id(self) -> str:
        return self.machine.req_id

    @property
    def phase(self) -> InPhase:
        return self.machine.phase


class IncomingRunner:
    def __init__(
        self,
        mig: IncomingMigration,
        *,
        engine: Engine,
        kv: Any,
        send: Callable[[str, Any], None],
        timeout_s: float,
        on_imported: Callable[[], None],
    ) -> None:
        self.mig = mig
        self.machine = mig.machine
        self.engine = engine
        self.kv = kv
        self.send = send
        self.timeout_s = timeout_s
        self.on_imported = on_imported
        self._stepped = asyncio.Event()  # set by note_step once the machine acked

    async def run(self) -> IncomingMigration:
        m = self.machine
        try:
            while m.phase is InPhase.RESERVED:
                msg = await asyncio.wait_for(self.mig.inbox.get(), self.timeout_s)
                await self._run_ops(m.message(msg))
            if m.phase is InPhase.COMMITTED:
                await self._wait_first_step()
        except TimeoutError:
            await self._run_ops(m.timeout())
        except Exception as exc:
            await self._run_ops(m.failed(f"{type(exc).__name__}: {exc}"))
        return self.mig

    async def _wait_first_step(self) -> None:
        """Until the machine acks (note_step) or the source aborts first."""
        waiter = asyncio.ensure_future(self._stepped.wait())
        aborter = asyncio.ensure_future(self.mig.inbox.get())
        done, _ = await asyncio.wait({waiter, aborter}, timeout=self.timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        aborter.cancel()
        if self.machine.phase is not InPhase.COMMITTED:
            return  # acked
        if aborter in done:
            await self._run_ops(self.machine.message(aborter.result()))
        if self.machine.phase is InPhase.COMMITTED:
            await self._run_ops(self.machine.timeout())

    async def _run_ops(self, ops: list) -> None:
        for op in ops:
            if isinstance(op, machine.Recv):
                await self.kv.recv(self.mig.group_id, list(op.block_ids))
                await self._run_ops(self.machine.received(op.stage_index))
            elif isinstance(op, machine.Import):
                try:
                    self.engine.import_request(
                        op.state, self.machine.prealloc.prompt_token_ids,
                        list(op.block_ids))
                except Exception as exc:
                    return await self._run_ops(self.machine.import_failed(
                        op.block_ids, f"{type(exc).__name__}: {exc}"))
                self.on_imported()
            else:
                self.apply(op)

    def apply(self, op: Any) -> None:
        """Ops that need no waiting (also run by the coordinator)."""
        if isinstance(op, machine.Send):
            self.send(self.mig.src_inbox_addr, op.msg)
        elif isinstance(op, machine.Remove):
            if self.engine.get(self.machine.req_id) is not None:
                self.engine.remove(self.machine.req_id)
        elif not isinstance(op, machine.Done):
            raise TypeError(f"unexpected op {op!r}")

    def note_step(self, started_s: float) -> None:
        """Called after each engine step while COMMITTED; started_s: the step's start."""
        req = self.engine.get(self.machine.req_id)
        if req is not None and req.num_computed_tokens <= self.machine.num_computed_at_import:
            return  # not stepped yet
        first_token_s = time.time() if req is None else req.last_step_s
        for op in self.machine.stepped(started_s, first_token_s):
            self.apply(op)
        if self.machine.phase is not InPhase.COMMITTED:
            self._stepped.set()

"""How the worker's event loop runs one engine step without blocking itself.

One step is the engine's two halves around an executor (services/worker/engine/engine.py):

    plan = engine.schedule() -> run plan.batch -> engine.finish_step(plan, tokens, seconds)

Three drivers run that sequence, each with its own clock: `Engine.step` calls the
executor in place (offline use, tests), `Stepper` here awaits it, and the discrete-event
simulator (bench/sim.py) schedules the step's end on its virtual clock.

While a step's GPU work runs, the event loop is free: it handles messages (migration
control, aborts, new requests) and the GIL is free for the KV-transfer threads. Requests
aborted or paused meanwhile are skipped by `finish_step` (the plan's tokens for them are
dropped; their KV progress is not advanced, so the state stays consistent).

What the stepper awaits, per executor:
- ModelRun: the real model. On GPU `ModelRunner.launch` enqueues the step and returns a
  `PendingTokens`; its wait (a CUDA event sync, GIL released) runs on a helper thread.
  On CPU the forward pass runs inside launch, so launch itself runs on that thread: a
  long prefill (seconds on CPU) must not stall the loop, which sends the load reports the
  scheduler takes as heartbeats, and handles aborts and migration control meanwhile.
- SimRun: the modelled step time is slept, so eight simulated workers share a 2-core
  machine without burning it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from ferry.services.worker.engine.batch import ModelBatch, Sampled
from ferry.services.worker.engine.engine import Engine
from ferry.services.worker.engine.request import RequestOutput
from ferry.services.worker.sim_executor import SimExecutor
from ferry.services.worker.step_log import StepLog


class ModelRun:
    def __init__(self, runner) -> None:
        self.runner = runner  # a ModelRunner (services/worker/runner.py)
        self._waiter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step-wait")

    async def __call__(self, batch: ModelBatch) -> Sampled:
        loop = asyncio.get_running_loop()
        if self.runner.device.type == "cuda":
            pending = self.runner.launch(batch)  # enqueues the GPU work only
            if pending.event is not None:
                await loop.run_in_executor(self._waiter, pending.wait)
        else:  # the CPU computes inside launch
            pending = await loop.run_in_executor(self._waiter, self.runner.launch, batch)
        return pending.result()


class SimRun:
    def __init__(self, executor: SimExecutor) -> None:
        self.executor = executor  # with sleep=False: it returns tokens only

    async def __call__(self, batch: ModelBatch) -> Sampled:
        await asyncio.sleep(self.executor.step_time(batch) / self.executor.speedup)
        return self.executor.execute(batch)


class Stepper:
    def __init__(self, engine: Engine, run: Callable[[ModelBatch], Awaitable[Sampled]],
                 step_log: StepLog | None = None) -> None:
        self.engine = engine
        self.run = run  # runs a batch on the executor: ModelRun or SimRun
        self.step_log = step_log
        self.started_s = 0.0  # wall clock (time.time()) when the latest step began

    async def step(self) -> list[RequestOutput]:
        scheduled = time.perf_counter()
        plan = self.engine.schedule()
        if plan.is_empty:
            return []
        self.started_s = time.time()
        batch = plan.batch
        start = time.perf_counter()
        sampled = await self.run(batch) if batch is not None else []
        step_s = time.perf_counter() - start
        outputs = self.engine.finish_step(plan, sampled, step_s)
        if self.step_log is not None and batch is not None:
            self.step_log.record(batch, step_s, time.perf_counter() - scheduled - step_s)
        return outputs


def make_stepper(engine: Engine, step_log: StepLog | None = None) -> Stepper:
    """step_log: record every model step (services/worker/step_log.py); not for sim."""
    if isinstance(engine.executor, SimExecutor):
        return Stepper(engine, SimRun(engine.executor))
    return Stepper(engine, ModelRun(engine.executor), step_log)

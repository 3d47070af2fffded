"""How the worker's event loop runs one engine step without blocking itself.

    schedule() -> launch the batch -> await its completion -> finish_step()

While a step's GPU work runs, the event loop is free: it handles messages (migration
control, aborts, new requests) and the GIL is free for the KV-transfer threads. Requests
aborted or paused meanwhile are skipped by `finish_step` (the plan's tokens for them are
dropped; their KV progress is not advanced, so the state stays consistent).

- ModelStepper: the real model. `ModelRunner.launch` enqueues the step and returns a
  `PendingTokens`; its wait (a CUDA event sync, GIL released) runs on a helper thread.
  On CPU the forward pass runs inside launch, and there is nothing to wait for.
- SimStepper: the modelled step time is awaited, so eight simulated workers share a
  2-core machine without burning it.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from ferry.services.worker.engine.batch import ModelBatch
from ferry.services.worker.engine.engine import Engine
from ferry.services.worker.engine.request import RequestOutput
from ferry.services.worker.sim_executor import SimExecutor


class ModelStepper:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.runner = engine.executor
        self._waiter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step-wait")
        self.started_s = 0.0  # wall clock (time.time()) when the latest step began

    async def step(self) -> list[RequestOutput]:
        plan = self.engine.schedule()
        if plan.is_empty:
            return []
        self.started_s = time.time()
        start = time.perf_counter()
        pending = self.runner.launch(ModelBatch(chunks=tuple(plan.chunks))) if plan.chunks \
            else None
        if pending is not None and pending.event is not None:
            await asyncio.get_running_loop().run_in_executor(self._waiter, pending.wait)
        sampled = pending.result() if pending is not None else []
        return self.engine.finish_step(plan, sampled, time.perf_counter() - start)


class SimStepper:
    def __init__(self, engine: Engine, executor: SimExecutor) -> None:
        self.engine = engine
        self.executor = executor
        self.started_s = 0.0  # wall clock (time.time()) when the latest step began

    async def step(self) -> list[RequestOutput]:
        plan = self.engine.schedule()
        if plan.is_empty:
            return []
        self.started_s = time.time()
        batch = ModelBatch(chunks=tuple(plan.chunks))
        start = time.perf_counter()
        if plan.chunks:
            await asyncio.sleep(self.executor.step_time(batch) / self.executor.speedup)
        sampled = self.executor.execute(batch)  # sleep=False: tokens only
        return self.engine.finish_step(plan, sampled, time.perf_counter() - start)


def make_stepper(engine: Engine) -> ModelStepper | SimStepper:
    if isinstance(engine.executor, SimExecutor):
        return SimStepper(engine, engine.executor)
    return ModelStepper(engine)

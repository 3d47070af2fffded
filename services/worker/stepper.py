"""How the worker's event loop runs one engine step without blocking itself.

    schedule() -> launch the batch -> await its completion -> finish_step()

While a step's GPU work runs, the event loop is free: it handles messages (migration
control, aborts, new requests) and the GIL is free for the KV-transfer threads. Requests
aborted or paused meanwhile are skipped by `finish_step` (the plan's tokens for them are
dropped; their KV progress is not advanced, so the state stays consistent).

- ModelStepper: the real model. On GPU `ModelRunner.launch` enqueues the step and returns
  a `PendingTokens`; its wait (a CUDA event sync, GIL released) runs on a helper thread.
  On CPU the forward pass runs inside launch, so launch itself runs on that thread: a
  long prefill (seconds on CPU) must not stall the loop, which sends the load reports the
  scheduler takes as heartbeats, and handles aborts and migration control meanwhile.
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
from ferry.services.worker.step_log import StepLog


class ModelStepper:
    def __init__(self, engine: Engine, step_log: StepLog | None = None) -> None:
        self.engine = engine
        self.runner = engine.executor
        self.step_log = step_log
        self._waiter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step-wait")
        self.started_s = 0.0  # wall clock (time.time()) when the latest step began

    async def step(self) -> list[RequestOutput]:
        scheduled = time.perf_counter()
        plan = self.engine.schedule()
        if plan.is_empty:
            return []
        self.started_s = time.time()
        start = time.perf_counter()
        pending = batch = None
        if plan.chunks:
            batch = ModelBatch(chunks=tuple(plan.chunks))
            loop = asyncio.get_running_loop()
            if self.runner.device.type == "cuda":
                pending = self.runner.launch(batch)  # enqueues the GPU work only
                if pending.event is not None:
                    await loop.run_in_executor(self._waiter, pending.wait)
            else:  # the CPU computes inside launch
                pending = await loop.run_in_executor(self._waiter, self.runner.launch, batch)
        sampled = pending.result() if pending is not None else []
        step_s = time.perf_counter() - start
        outputs = self.engine.finish_step(plan, sampled, step_s)
        if self.step_log is not None and batch is not None:
            self.step_log.record(batch, step_s, time.perf_counter() - scheduled - step_s)
        return outputs


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


def make_stepper(engine: Engine, step_log: StepLog | None = None) -> ModelStepper | SimStepper:
    """step_log: record every model step (services/worker/step_log.py); not for sim."""
    if isinstance(engine.executor, SimExecutor):
        return SimStepper(engine, engine.executor)
    return ModelStepper(engine, step_log)

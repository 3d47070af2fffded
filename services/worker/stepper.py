"""How the worker's event loop runs one engine step.

Two implementations, one per executor kind:
- ModelStepper: the forward pass runs inline (it holds the GIL only between kernels);
  message handlers run between steps, so the engine is touched from one thread only.
- SimStepper: the modelled step time is awaited, so eight simulated workers share a
  2-core machine without burning it.
"""

from __future__ import annotations

import asyncio
import time

from services.worker.engine.batch import ModelBatch
from services.worker.engine.engine import Engine
from services.worker.engine.request import RequestOutput
from services.worker.sim_executor import SimExecutor


class ModelStepper:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def step(self) -> list[RequestOutput]:
        return self.engine.step()


class SimStepper:
    def __init__(self, engine: Engine, executor: SimExecutor) -> None:
        self.engine = engine
        self.executor = executor

    async def step(self) -> list[RequestOutput]:
        plan = self.engine.schedule()
        if plan.is_empty:
            return []
        batch = ModelBatch(chunks=tuple(plan.chunks))
        start = time.perf_counter()
        if plan.chunks:
            await asyncio.sleep(self.executor.step_time(batch) / self.executor.speedup)
        sampled = self.executor.execute(batch)  # sleep=False: tokens only
        # Requests aborted or paused while we slept are skipped by update().
        return self.engine.finish_step(plan, sampled, time.perf_counter() - start)


def make_stepper(engine: Engine) -> ModelStepper | SimStepper:
    if isinstance(engine.executor, SimExecutor):
        return SimStepper(engine, engine.executor)
    return ModelStepper(engine)

"""In-situ step samples: every engine step a worker runs, one JSON line each, with the
latency model's features (services/worker/latency_model.py StepFeatures P, A, D, C), the
measured step time and the engine's own time around it:

    {"t": wall clock at the end, "P": .., "A": .., "D": .., "C": .., "step_s": launch to
     tokens read, "engine_s": schedule + bookkeeping of the step}

`ferry worker --step-log PATH` turns it on; `python -m experiments.sim_check` fits a
latency model to these samples and checks the simulator's against them. The samples
have the shape of a profile's, so `LatencyModel.fit` takes them as they are.
"""

from __future__ import annotations

import json
import time
from typing import TextIO

from ferry.services.worker.engine.batch import ModelBatch
from ferry.services.worker.latency_model import StepFeatures


class StepLog:
    def __init__(self, path: str) -> None:
        self._file: TextIO = open(path, "a", buffering=1 << 16)  # noqa: SIM115 (closed in close)

    def record(self, batch: ModelBatch, step_s: float, engine_s: float) -> None:
        f = StepFeatures.of(batch)
        self._file.write(json.dumps({"t": round(time.time(), 6), "P": f.P, "A": f.A, "D": f.D,
                                     "C": f.C, "step_s": step_s, "engine_s": engine_s}) + "\n")

    def close(self) -> None:
        self._file.close()

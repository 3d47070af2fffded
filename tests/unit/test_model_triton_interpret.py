"""The model with the Triton attention backend and element-wise kernels, on CPU under Triton's interpreter, against
the torch reference: mixed prefill chunks and decodes through ModelRunner.execute, the
decode steps on the CUDA-graph bookkeeping path (DecodeGraphs uncaptured: static
buffers, padding rows, max_seq_len as an upper bound). Same tokens, same KV.

Runs in a child process: TRITON_INTERPRET is read when the kernels are decorated, at
import. Skipped where Triton or the Triton backend is absent.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None
    or importlib.util.find_spec("ferry.kernels.attention_triton") is None,
    reason="needs triton and kernels/attention_triton.py",
)

CHILD = r"""
import json, random
import numpy as np
import torch
import triton.runtime.interpreter as interpreter

# numpy >= 2.4 refuses int() of a size-1 array, which Triton 3.6's interpreter does for
# loop bounds that come from loads (triton-lang/triton#9171).
_patch = interpreter._patch_lang_tensor
def _patched(tensor, scope):
    _patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).item()))
interpreter._patch_lang_tensor = _patched

from ferry.common.sampling import SamplingParams
from ferry.kernels.backend import fused_ops
from ferry.kernels.attention_triton import paged_attention_triton, write_kv_triton
from ferry.services.worker.model.cuda_graphs import DecodeGraphs
from ferry.services.worker.model.llama import ModelKernels
from ferry.services.worker.runner import ModelRunner, RunnerConfig
from tests.unit.model_helpers import FakeEngine
from tests.unit.test_runner import CONFIG

num_blocks = 80
prompts = [[random.Random(n).randrange(384) for _ in range(n)] for n in (3, 20, 37, 1, 50)]
params = [SamplingParams(temperature=t, seed=i) for i, t in enumerate((0.0, 1.0, 0.0, 0.7, 0.0))]
runners = []
for backend in ("torch", "triton"):
    runner = ModelRunner(RunnerConfig(model_config=CONFIG, seed=2, num_blocks=num_blocks))
    if backend == "triton":
        runner.model.kernels = ModelKernels(write_kv_triton, paged_attention_triton,
                                            fused_ops("triton"))
        runner.graphs = DecodeGraphs(runner.model, runner.kv_cache, batch_sizes=[1, 2, 4, 8],
                                     block_size=16, pad_block_id=runner.pad_block_id,
                                     max_model_len=runner.max_model_len, capture=False)
    runners.append(runner)
outputs = []
for runner in runners:
    rng = random.Random(0)  # the same chunk plan for both runners
    engine = FakeEngine(runner, seed=5)
    reqs = [engine.add(f"r{i}", p) for i, p in enumerate(prompts)]
    while live := [r for r, p in zip(reqs, prompts) if len(r.token_ids) < len(p) + 8]:
        chunks = []
        for r in live:
            todo = len(r.token_ids) - r.num_computed
            size = min(todo, rng.randint(1, 12))
            i = int(r.req_id[1:])
            chunks.append(engine.chunk(r, size, sample=size == todo, sampling=params[i]))
        tokens = iter(engine.step(chunks))
        for r, c in zip(live, chunks):
            if c.sample:
                r.token_ids.append(next(tokens))
    outputs.append([r.token_ids for r in reqs])
kv_diff = (runners[0].kv_cache[:num_blocks] - runners[1].kv_cache[:num_blocks]).abs().max()
print(json.dumps({"tokens_equal": outputs[0] == outputs[1], "kv_max_diff": kv_diff.item(),
                  "num_tokens": sum(len(t) for t in outputs[0]),
                  "graph_padding_written": bool(runners[1].kv_cache[num_blocks].abs().sum() > 0)}))
"""


def test_triton_backend_matches_torch_reference_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tokens_equal"], result
    assert result["kv_max_diff"] < 1e-5, result
    assert result["graph_padding_written"], result  # decode steps took the graph path
    assert result["num_tokens"] == sum((3, 20, 37, 1, 50)) + 5 * 8

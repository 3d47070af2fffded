"""The runner's cache of penalized requests' histories (services/worker/history_arrays.py):
equal to the chunk's tokens every step, appends only what is new, rebuilds an entry that
no longer prefixes the history, and stays bounded."""

from __future__ import annotations

import numpy as np
import pytest

from ferry.services.worker.history_arrays import HistoryArrays


def test_each_step_returns_the_history_and_appends_only_new_tokens():
    cache = HistoryArrays(max_entries=4)
    prompt = (5, 6, 7)
    outputs: list[int] = []
    views = []
    for token in range(40):  # grows past the first 16-token buffer twice
        p, o = cache.get("a", prompt, tuple(outputs))
        assert p.tolist() == list(prompt) and o.tolist() == outputs
        assert p.dtype == o.dtype == np.int64
        views.append((o, list(outputs)))
        outputs.append(token)
    assert cache.num_rebuilds == 1
    assert all(v.tolist() == expected for v, expected in views)  # earlier views unchanged


@pytest.mark.parametrize("change", ["prompt", "last_output", "fewer_outputs"])
def test_an_entry_that_no_longer_prefixes_the_history_is_rebuilt(change):
    cache = HistoryArrays(max_entries=4)
    cache.get("a", (1, 2, 3), (4, 5))
    prompt, outputs = {"prompt": ((1, 2, 9), (4, 5, 6)),
                       "last_output": ((1, 2, 3), (4, 8, 6)),
                       "fewer_outputs": ((1, 2, 3), (4,))}[change]
    p, o = cache.get("a", prompt, outputs)
    assert (p.tolist(), o.tolist()) == (list(prompt), list(outputs))
    assert cache.num_rebuilds == 2


def test_least_recently_used_entries_go_first():
    cache = HistoryArrays(max_entries=2)
    cache.get("a", (1,), ())
    cache.get("b", (2,), ())
    cache.get("a", (1,), (3,))  # a is now the most recent
    cache.get("c", (4,), ())
    assert len(cache) == 2
    cache.get("a", (1,), (3,))
    assert cache.num_rebuilds == 3  # a, b, c; a was kept
    cache.get("b", (2,), ())
    assert cache.num_rebuilds == 4  # b was evicted
    with pytest.raises(ValueError):
        HistoryArrays(max_entries=0)


def test_the_sampler_builds_the_same_penalties_from_arrays_as_from_tuples():
    import dataclasses

    import torch

    from ferry.common.sampling import SamplingParams
    from ferry.services.worker.sampler import SamplingTensors, TokenHistory

    base = SamplingParams(temperature=0.7, presence_penalty=0.5, frequency_penalty=0.3, seed=1)
    params = [dataclasses.replace(base, repetition_penalty=r) for r in (1.0, 1.2, 1.1)]
    prompts = [(1, 2, 3), (4, 5), (6,)]
    outputs = [(7, 7), (), (8, 9, 8)]
    cache = HistoryArrays(max_entries=8)
    built = {}
    for kind in ("tuples", "arrays"):
        histories = [TokenHistory(p, o) if kind == "tuples"
                     else TokenHistory(*cache.get(f"r{i}", p, o))
                     for i, (p, o) in enumerate(zip(prompts, outputs, strict=True))]
        built[kind] = SamplingTensors.build(params, [5, 5, 5], vocab_size=16, device="cpu",
                                            histories=histories).penalties
    for field in dataclasses.fields(built["tuples"]):
        a, b = getattr(built["tuples"], field.name), getattr(built["arrays"], field.name)
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, field.name


def test_the_token_bound_evicts_the_least_recent_but_never_the_entry_in_use():
    cache = HistoryArrays(max_entries=10, max_tokens=100)
    cache.get("a", tuple(range(40)), ())  # 40 + a 16-token buffer
    cache.get("b", tuple(range(30)), ())  # 56 + 46 > 100: a goes
    assert len(cache) == 1 and cache.num_tokens == 46
    p, o = cache.get("c", tuple(range(200)), (1, 2))  # alone over the bound: kept
    assert len(cache) == 1 and p.tolist() == list(range(200)) and o.tolist() == [1, 2]
    cache.discard("c")
    assert (len(cache), cache.num_tokens) == (0, 0)

"""The prefix-TTFT bench (bench/prefix_ttft.py) on the tiny model on CPU: the cached run
really hits the prefix, and outputs match the uncached engine's."""

from __future__ import annotations

import argparse

from ferry.bench import prefix_ttft


def test_cached_prompt_hits_its_prefix_and_outputs_match():
    args = argparse.Namespace(preset="tiny", device="cpu", num_layers=0, prefix_tokens=100,
                              tail_tokens=20, max_tokens=6, kv_cache_gb=0.0, repeats=1, out="")
    result = prefix_ttft.run(args)
    assert result["repeats"] == 1
    assert result["hit_tokens"] == 96  # the prefix's full 16-token blocks: 100 // 16 * 16
    assert result["greedy_identical"] and result["seeded_identical"]
    assert result["uncached_ttft_s"] > 0 and result["cached_ttft_s"] > 0
    assert "speedup" in prefix_ttft.format_table(result)


def test_first_difference():
    assert prefix_ttft.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert prefix_ttft.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert prefix_ttft.first_difference([1, 2], [1, 2, 3]) == 2

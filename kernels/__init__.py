"""Attention backends over the block-major paged KV cache (see kv_layout.py).

Every backend offers the same two calls:
    write_kv(k, v, k_cache, v_cache, slot_mapping)
    paged_attention(q, k_cache, v_cache, meta, scale) -> out
"""

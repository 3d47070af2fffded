"""Block hashes of a token sequence, the key of the prefix cache (DESIGN §4).

A full block of `block_size` tokens is identified by a hash chained over everything
before it:

    h_0 = H(seed,  tokens[0 : B])
    h_i = H(h_i-1, tokens[i*B : (i+1)*B])

so equal hashes mean equal prefixes (up to a 64-bit collision). H is BLAKE2b with an
8-byte digest over the parent (8 bytes) and the tokens (int32 little endian): stable
across processes and hosts, so a gateway, the scheduler and every worker compute the
same hashes. `seed` names what else changes the KV (the model and its weights): blocks
of different models never match. Only full blocks have hashes; a partial last block is
private to its request. Pure, no torch.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from collections.abc import Sequence

_PARENT = struct.Struct("<Q")


def seed_hash(model_identity: str) -> int:
    """The chain's root for one model (its name, config, weights' seed: whatever makes
    its KV differ from another model's for the same tokens)."""
    return int.from_bytes(hashlib.blake2b(model_identity.encode(), digest_size=8).digest(),
                          "little")


def block_hashes(token_ids: Sequence[int], block_size: int, *, parent: int) -> list[int]:
    """Hashes of the full blocks of token_ids, `parent` being the hash of the block just
    before token_ids[0] (the seed when token_ids starts the sequence)."""
    hashes = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        tokens = array("i", token_ids[start:start + block_size])
        if sys.byteorder == "big":
            tokens.byteswap()
        parent = int.from_bytes(
            hashlib.blake2b(_PARENT.pack(parent) + tokens.tobytes(), digest_size=8).digest(),
            "little")
        hashes.append(parent)
    return hashes

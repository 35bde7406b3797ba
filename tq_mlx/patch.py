"""Route mlx-lm's scaled_dot_product_attention to tq_mlx when the cache is ours.

mlx-lm model files bind `scaled_dot_product_attention` by name at import.
`install()` re-points the name in `mlx_lm.models.base`, which every model
module imported later binds, and in every `mlx_lm.models.*` module already
loaded.  A call on keys a TurboQuant cache handed out goes to that cache, whatever
cache the model passed (KV-shared layers pass None or another layer's cache); other
calls with a TurboQuant cache go to tq_mlx's attention, with a batch of them (mlx-lm's
batching) to `batch_attention`, the rest to mlx-lm's function.
`install()` runs on `import tq_mlx`; it is idempotent.
"""

import sys

from . import handouts
from .attention import attention
from .batch_attention import batch_attention
from .batch_cache import BatchTurboQuantKVCache
from .cache import TurboQuantKVCache

_ORIGINAL = None
_PREFIX = "mlx_lm.models."


def tq_scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
    """Drop-in for mlx_lm.models.base.scaled_dot_product_attention."""
    cache = handouts.owner(keys) or cache  # KV shared with another layer: the cache that holds it
    if isinstance(cache, TurboQuantKVCache):
        return attention(cache, queries, scale, mask, sinks, keys, values)
    if isinstance(cache, BatchTurboQuantKVCache):
        return batch_attention(cache, queries, scale, mask, sinks, keys, values)
    return _ORIGINAL(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)


def install():
    """Patch mlx-lm's attention helper everywhere it is bound, now and for modules imported later."""
    global _ORIGINAL
    import mlx_lm.models.base as base

    if _ORIGINAL is None:
        _ORIGINAL = base.scaled_dot_product_attention
    for name, mod in list(sys.modules.items()):
        if (
            name.startswith(_PREFIX)
            and mod is not None
            and getattr(mod, "scaled_dot_product_attention", None) is _ORIGINAL
        ):
            mod.scaled_dot_product_attention = tq_scaled_dot_product_attention

"""What a TurboQuantKVCache hands back to the model, and which cache handed out a given array.

`update_and_fetch` returns the whole cache as arrays (decoded lazily: nothing is computed unless the
model reads them) until a layer's attention call comes through tq_mlx with exactly those arrays; from
then on it returns the new tokens as placeholders and attention reads the cache's blocks.  Models that
use the arrays in other ways stay correct:
- KV-shared layers (gemma4, afm7, iquestloopcoder's second loop) call attention with cache=None, or
  with another layer's cache, on arrays some cache handed out: `owner(keys)` routes the call back to it.
- `keys_and_values()` after placeholders gives the whole cache again (lazily), and is recognised too.
- `cache.keys = mx.depends(cache.keys, x)` (mlx-lm's idiom to force evaluation of x with the cache:
  pipeline parallelism, DeepSeek-V3.2's indexer) attaches x to the stored arrays; a cache whose arrays
  the model wants replaced by others is refused.
Registry entries hold the cache weakly and are replaced on every update.
"""

import weakref

import mlx.core as mx

_BY_KEYS = {}  # id(keys array) -> weakref to its cache
_IDS = weakref.WeakKeyDictionary()  # cache -> ids of the keys arrays it registered since its last update


def _register(cache, keys, fresh: bool):
    if fresh:
        for old in _IDS.pop(cache, ()):
            _BY_KEYS.pop(old, None)
    _BY_KEYS[id(keys)] = weakref.ref(cache)
    _IDS.setdefault(cache, []).append(id(keys))


def owner(keys):
    """The cache that handed out exactly this keys array (and still stands by it), or None."""
    ref = _BY_KEYS.get(id(keys))
    cache = ref() if ref is not None else None
    return cache if cache is not None and cache.role(keys, None) is not None else None


class HandsOut:
    """Mixin for TurboQuantKVCache: the arrays handed to the model and how attention recognises them.

    The cache provides `all_arrays()` and `_stores()`."""

    def _reset_handouts(self):
        self.hands_out_all = True  # hand back the whole cache until attention shows it reads the blocks
        self.handed = (None, None)  # what the last update returned
        self.whole = None  # keys_and_values() since the last update, when that differs from `handed`

    def _hand_out(self, keys, values):
        """What update_and_fetch returns for the new (keys, values) just stored."""
        self.handed = self.all_arrays() if self.hands_out_all else (keys, values)
        self.whole = None
        _register(self, self.handed[0], fresh=True)
        return self.handed

    def keys_and_values(self):
        """mlx-lm's KVCache.keys_and_values: the whole cache, (B, H, T, d) keys and values (lazy)."""
        if self.hands_out_all:
            return self.handed
        if self.whole is None:
            self.whole = self.all_arrays()
            _register(self, self.whole[0], fresh=False)
        return self.whole

    def role(self, keys, values):
        """How an attention call's keys/values relate to this cache: "kv" (a pair it handed out), "kk" (its
        keys as both: MLA attends in the latent space), None (arrays the model made: not ours).
        values=None asks only whether the keys are ours ("k")."""
        for k, v in (self.handed, self.whole or (None, None)):
            if k is not None and keys is k:
                return "k" if values is None else "kv" if values is v else "kk" if values is k else None
        return None

    # ---- mlx-lm's KVCache attributes, for models that touch them ------------------------------------
    @property
    def keys(self):
        """The keys last handed out (None before the first update), as mlx-lm's `KVCache.keys`."""
        return self.handed[0]

    @keys.setter
    def keys(self, new):
        self._attach(new, "keys")

    @property
    def values(self):
        return self.handed[1]

    @values.setter
    def values(self, new):
        self._attach(new, "values")

    def _attach(self, new, name):
        """`cache.keys = mx.depends(cache.keys, x)` or `cache.values = mx.zeros_like(cache.keys)`: the
        stored arrays now depend on `new`, so evaluating the cache evaluates what it was made from."""
        old = self.handed[0 if name == "keys" else 1]
        if old is None or not isinstance(new, mx.array) or new.shape != old.shape:
            raise NotImplementedError(
                f"the model sets TurboQuantKVCache.{name} to an array of shape "
                f"{getattr(new, 'shape', type(new).__name__)} (the cache handed out "
                f"{None if old is None else old.shape}): TurboQuant caches only support attaching a dependency "
                "(mlx-lm's `cache.keys = mx.depends(cache.keys, ...)`); use mlx-lm's own cache for this model"
            )
        for st in self._stores():
            if st.length:
                name0 = next(iter(st.buffers))
                st.buffers[name0] = mx.depends(st.buffers[name0], new)
                return

"""One codec for a whole batch: each row's calibration stacked along a leading batch axis.

Every sequence of a batch cache calibrates its own codecs on its own first tokens (as it would alone),
so rows differ in what codecs learn (centring means, RoPE-centred keys' pre-RoPE means, query weights,
the outlier split's channel order, HQMQ's outlier threshold); rotations, codebooks and the RoPE map
depend only on the config and the layer.
`stacked(codecs, ...)` builds one codec of the same kind from every row's `calibration_state()`
stacked on axis 0, so a decode step encodes and attends for all rows at once (one kernel launch,
or one MLX op, per step instead of one per row).  A row not calibrated yet holds no codes; it gets
neutral constants (mean 0, weight 1, the identity order), which no result reads.
"""

import mlx.core as mx

from .codec_factory import Calibration, build_codec
from .config import CacheConfig, CodecSpec
from .fp16_codec import FP16


def _neutral(name: str, spec: CodecSpec, d: int, n_heads: int) -> mx.array:
    """What a row without calibration contributes for calibration value `name`."""
    if name in ("mean", "rope_mean"):
        return mx.zeros((n_heads, d), mx.float32)
    if name == "weight":
        if spec.query_weighting == "full":
            return mx.broadcast_to(mx.eye(d), (n_heads, d, d))
        return mx.ones((n_heads, d), mx.float32)
    if name == "perm":
        return mx.broadcast_to(mx.arange(d, dtype=mx.int32), (n_heads, d))
    if name == "median":
        return mx.ones((n_heads,), mx.float32)
    raise ValueError(f"no neutral value for calibration entry {name!r}")


_LAYER_WIDE = ("rope_partner", "rope_angle", "rope_scale", "rope_block")  # the layer's RoPE map: one for all rows


def _shared(name: str, states) -> mx.array:
    """A calibration value that is the layer's, not the row's (its RoPE map): the same in every row that has it."""
    vals = [st[name] for st in states if name in st]
    if any(v.shape != vals[0].shape or not mx.array_equal(v, vals[0]).item() for v in vals[1:]):
        raise NotImplementedError(
            f"batch rows whose RoPE-centred keys differ in {name[5:]} (caches saved with blocks of another size "
            "or another model) do not batch; run them one at a time"
        )
    return vals[0]


def stacked(
    codecs, spec: CodecSpec, cfg: CacheConfig, d: int, n_heads: int, layer: int, part: str, use_kernels, head_offset=0
):
    """The codec coding row b of a batch with codecs[b] (None: a row not calibrated yet); head_offset: the
    global index of the first head (a tensor-parallel rank's slice, as the rows' own codecs)."""
    if d == 0 or spec.codec == "fp16":
        return FP16
    states = [{} if c is None else c.calibration_state() for c in codecs]
    names = sorted({n for st in states for n in st})
    shared = {n: _shared(n, states) for n in names if n in _LAYER_WIDE}
    state = {
        n: mx.stack([st[n] if n in st else _neutral(n, spec, d, n_heads) for st in states])
        for n in names
        if n not in shared
    }
    state.update(shared)
    codec = build_codec(
        spec, cfg, d, n_heads, layer, part, Calibration(state=state), use_kernels, batch=True, head_offset=head_offset
    )
    mx.eval(codec.constants())  # ready, and usable from any thread (mlx-lm's server decodes in its own)
    return codec

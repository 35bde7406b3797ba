"""Cache configuration: one CodecSpec for keys, one for values, plus cache options.

A config is given as a preset name ("k4v4", "2.5", "hqmq-s96r4", ...), an
explicit "kXvY" string, or a CacheConfig.  Every field is plain data so the
whole config round-trips through JSON (and so through a prompt-cache file).
"""

import json
import re
from dataclasses import asdict, dataclass, field, fields, replace

CODECS = ("turboquant", "hqmq", "fp16")
GRIDS = ("lloyd-max", "uniform", "trellis")
TRELLIS_BITS = (2, 3, 4)  # trellis.BITS: the widths with a shipped table


def _check_bits(bits):
    """TurboQuant bits: an int 1..8, or a multiple of 1/4 in 1..8 (the outlier split)."""
    if isinstance(bits, bool) or not isinstance(bits, (int, float)):
        raise TypeError(f"bits must be a number in 1..8, got {bits!r} ({type(bits).__name__})")
    if not 1 <= bits <= 8 or (bits * 4) != int(bits * 4):
        raise ValueError(
            f"TurboQuant bits must be in 1..8, whole or in quarter steps (2.5: the outlier split), got {bits!r}"
        )


@dataclass(frozen=True)
class CodecSpec:
    """How one of K or V is stored.

    codec: "turboquant", "hqmq" or "fp16" (passthrough).
    bits: TurboQuant bits per coordinate, 1..8; a fraction in quarter steps (2.5, 3.5) means
        the outlier split: frac * d channels (rounded to 16) at ceil(bits), the rest at floor(bits).
    qjl: TurboQuant_prod (bits - 1 mse bits + 1 QJL bit).
    center: subtract a per-(layer, head) channel mean learnt from the first tokens before
        encoding; added back exactly in attention (TurboQuant only).  "rope" (keys): the mean taken
        before the layer's rotary embedding, turned to each key's position (rope_mean.py); it applies
        to full-attention layers whose RoPE is known, others keep the static mean.  Every kXvY preset
        centres its keys with "rope" (kXvY-static: True); a CodecSpec built by hand defaults to True.
    query_weighting: keys only: scale channels by (E q^2 / E k^2)^(1/4), learnt
        from the first queries and keys, and divide queries by the same weights
        (scores unchanged; quantization noise moved off the channels queries use).
        "full": a whitening matrix per head instead (lower error, d x d floats held).
    grid: "lloyd-max" (TurboQuant), "uniform": the same rotated, centred,
        weighted vectors in MLX's affine format, so attention runs on MLX's
        quantized matmul kernels (the CPU speed option; bits 2, 3, 4, 5, 6, 8),
        or "trellis": trellis-coded quantization of the same vectors (2, 3, 4 bits;
        lower error at the same bits, a slower encode; `tq_mlx/trellis.py`).
    hqmq: HQMQ configuration name, e.g. "s96_r4".
    """

    codec: str = "turboquant"
    bits: float = 4
    qjl: bool = False
    center: object = True  # True, False or "rope"
    query_weighting: object = True  # True, False or "full"
    grid: str = "lloyd-max"
    hqmq: str = "s96_r4"

    def __post_init__(self):
        if self.codec not in CODECS:
            raise ValueError(f"unknown codec {self.codec!r}; allowed: {CODECS}")
        if self.codec == "turboquant":
            _check_bits(self.bits)
            if self.qjl and self.bits != int(self.bits):
                raise ValueError(f"QJL takes whole bits (got {self.bits}); the outlier split has no QJL variant")
        if not (isinstance(self.center, bool) or self.center == "rope"):
            raise ValueError(f"center must be True, False or 'rope', got {self.center!r}")
        if not (isinstance(self.query_weighting, bool) or self.query_weighting == "full"):
            raise ValueError(f"query_weighting must be True, False or 'full', got {self.query_weighting!r}")
        if self.grid not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS}, got {self.grid!r}")
        widths = {int(self.bits), -int(-self.bits // 1)} if self.codec == "turboquant" else set()
        if self.grid == "trellis" and (self.qjl or not widths <= set(TRELLIS_BITS)):
            raise ValueError(f"the trellis grid codes {TRELLIS_BITS} bits without QJL, got bits={self.bits!r}")


@dataclass(frozen=True)
class CacheConfig:
    """A whole cache's settings.

    keys, values: the CodecSpecs.
    fp_window: the most recent R tokens stay in fp16 (0 = quantize everything).
    fp_sink: the first N tokens (attention sinks) stay in fp16; full-attention layers only.
        Default 1 (bench/RESULTS.md measures what it buys).
    boundary_layers: the first and last N layers keep mlx-lm's fp cache.
    quant_start: keep tokens as given (exact) until the cache holds this many, then calibrate the codecs on
        exactly these first tokens and compress (0: compress from the first attention call).
    quantize_sliding: also compress sliding-window (RotatingKVCache) and chunked (ChunkedKVCache) layers.
    rotation: "auto" (randomized Hadamard for power-of-two sizes, else Haar), "haar" or "hadamard".
    seed: the base seed; per (layer, head, K/V) seeds derive from it.
    """

    keys: CodecSpec = field(default_factory=CodecSpec)
    values: CodecSpec = field(default_factory=CodecSpec)
    fp_window: int = 0
    fp_sink: int = 1
    boundary_layers: int = 0
    quant_start: int = 256
    quantize_sliding: bool = True
    rotation: str = "auto"
    seed: int = 0
    name: str = field(default="custom", compare=False)  # a label: configs compare by content

    def __post_init__(self):
        for k in ("keys", "values"):
            if not isinstance(getattr(self, k), CodecSpec):
                raise TypeError(f"{k} must be a CodecSpec, got {type(getattr(self, k)).__name__}")
        for k in ("fp_window", "fp_sink", "boundary_layers", "quant_start", "seed"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{k} must be a non-negative integer, got {v!r}")
        if self.rotation not in ("auto", "haar", "hadamard"):
            raise ValueError(f"rotation must be 'auto', 'haar' or 'hadamard', got {self.rotation!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CacheConfig":
        d = json.loads(text)
        return cls(**{**d, "keys": CodecSpec(**d["keys"]), "values": CodecSpec(**d["values"])})


def _kv(kb, vb, center="rope", **kw):
    """kXvY: keys centred before RoPE (center="rope", the default) or after (True, -static); values have no RoPE
    (a static mean)."""
    return CacheConfig(keys=CodecSpec(bits=kb, center=center, **kw), values=CodecSpec(bits=vb, **kw))


PRESETS = {
    "k8v8": _kv(8, 8),
    "k8v4": _kv(8, 4),
    "k4v4": _kv(4, 4),
    "k4v3": _kv(4, 3),
    "k3v4": _kv(3, 4),
    "k3v3": _kv(3, 3),
    "k2v2": _kv(2, 2),
    "2.5": _kv(2.5, 2.5),  # the paper's outlier split: 32 ch @ 3 bits + 96 @ 2 at d=128
    "3.5-split": _kv(3.5, 3.5),
    "k4v4-qjl": _kv(4, 4, qjl=True),
    "k8v8-fast": _kv(8, 8, grid="uniform"),
    "k4v4-fast": _kv(4, 4, grid="uniform"),
    "k4v3-fast": _kv(4, 3, grid="uniform"),
    "k4v4-tcq": _kv(4, 4, grid="trellis"),
    "k3v3-tcq": _kv(3, 3, grid="trellis"),
    "k2v2-tcq": _kv(2, 2, grid="trellis"),
    "hqmq-s24r3": CacheConfig(keys=CodecSpec("hqmq", hqmq="s24_r3"), values=CodecSpec("hqmq", hqmq="s24_r3")),
    "hqmq-s96r4": CacheConfig(keys=CodecSpec("hqmq", hqmq="s96_r4"), values=CodecSpec("hqmq", hqmq="s96_r4")),
    "hqmq-s192r6": CacheConfig(keys=CodecSpec("hqmq", hqmq="s192_r6"), values=CodecSpec("hqmq", hqmq="s192_r6")),
    "fp16": CacheConfig(keys=CodecSpec("fp16"), values=CodecSpec("fp16")),
}
PRESETS = {k: replace(v, name=k) for k, v in PRESETS.items()}
DEFAULT_PRESET = "auto"


def auto_preset(head_dims=()) -> str:
    """What "auto", the default, means on this machine: k4v4 where the Metal kernels serve it; on the CPU
    k4v4-fast (the same codes on MLX's quantized kernels) when every head dim suits its uniform grid
    (a multiple of 32), else k4v4."""
    from . import kernels

    if kernels.enabled() or any(d % 32 for d in head_dims):
        return "k4v4"
    return "k4v4-fast"


_KV_RE = re.compile(r"^k(\d(?:\.\d+)?)v(\d(?:\.\d+)?)(-fast|-tcq)?(-rope|-static)?$")
_SUFFIX_GRID = {None: "lloyd-max", "-fast": "uniform", "-tcq": "trellis"}


def resolve_config(config=None, *, head_dims=(), **overrides) -> CacheConfig:
    """A CacheConfig from None or "auto" (the default: `auto_preset(head_dims)`), a preset name, "kXvY",
    or a CacheConfig.

    overrides replace fields; a preset they change is renamed ("k4v4+fp_window=64")."""
    if config is None or config == "auto":
        config = auto_preset(head_dims)
    unknown = sorted(set(overrides) - {f.name for f in fields(CacheConfig)} - {"name"})
    if unknown:
        raise TypeError(
            f"unknown cache option(s) {unknown}; allowed: {[f.name for f in fields(CacheConfig) if f.name != 'name']}"
        )
    if isinstance(config, CacheConfig):
        cfg = config
    elif isinstance(config, str):
        if config in PRESETS:
            cfg = PRESETS[config]
        elif m := _KV_RE.match(config):
            kb, vb = (float(g) if "." in g else int(g) for g in m.groups()[:2])
            center = True if m.group(4) == "-static" else "rope"
            cfg = replace(_kv(kb, vb, center, grid=_SUFFIX_GRID[m.group(3)]), name=config)
        else:
            raise ValueError(
                f"unknown KV preset {config!r}; allowed: {', '.join(PRESETS)}, or 'kXvY' with X, Y in 1..8 "
                "(-fast: the uniform grid, -tcq: trellis codes; then -static: the keys' mean taken after RoPE "
                "instead of before it; -rope, the default, may be written)"
            )
    else:
        raise TypeError(f"config must be a preset name or a CacheConfig, got {type(config).__name__}")
    new = replace(cfg, **{k: v for k, v in overrides.items() if k != "name"})  # validates every value
    changed = {k: v for k, v in overrides.items() if k != "name" and getattr(cfg, k) != v}
    if "name" in overrides or changed:
        label = overrides.get("name") or cfg.name + "".join(f"+{k}={v}" for k, v in sorted(changed.items()))
        new = replace(new, name=label)
    return new

"""Cache configuration: one CodecSpec for keys, one for values, plus cache options.

A config is given as a preset name ("k4v4", "2.5", "hqmq-s96r4", ...), an
explicit "kXvY" string, or a CacheConfig.  Every field is plain data so the
whole config round-trips through JSON (and so through a prompt-cache file).
"""

import json
import re
from dataclasses import asdict, dataclass, field, replace

CODECS = ("turboquant", "hqmq", "fp16")


@dataclass(frozen=True)
class CodecSpec:
    """How one of K or V is stored.

    codec: "turboquant", "hqmq" or "fp16" (passthrough).
    bits: TurboQuant bits per coordinate, 1..8; a fraction (2.5, 3.5) means
        the outlier split: round(frac * d) channels at ceil(bits), the rest at floor(bits).
    qjl: TurboQuant_prod (bits - 1 mse bits + 1 QJL bit); qjl_kind "orthogonal" or "gaussian".
    norm_correction: rescale so dequantized vectors keep the exact norm.
    center: subtract a per-(layer, head) channel mean learnt from the first
        tokens before encoding; added back exactly in attention (TurboQuant only).
    query_weighting: keys only: scale channels by (E q^2 / E k^2)^(1/4), learnt
        from the first queries and keys, and divide queries by the same weights
        (scores unchanged; quantization noise moved off the channels queries use).
        "full": a whitening matrix per head instead (lower error, d x d floats held).
    grid: "lloyd-max" (TurboQuant) or "uniform": the same rotated, centred,
        weighted vectors in MLX's affine format, so attention runs on MLX's
        quantized matmul kernels (the CPU speed option; bits 2, 3, 4, 5, 6, 8).
    norm_dtype: "float16" or "float32".
    hqmq: HQMQ configuration name, e.g. "s96_r4".
    """

    codec: str = "turboquant"
    bits: float = 4
    qjl: bool = False
    qjl_kind: str = "orthogonal"
    norm_correction: bool = True
    center: bool = True
    query_weighting: object = True  # True, False or "full"
    grid: str = "lloyd-max"
    norm_dtype: str = "float16"
    hqmq: str = "s96_r4"

    def __post_init__(self):
        if self.codec not in CODECS:
            raise ValueError(f"unknown codec {self.codec!r}; allowed: {CODECS}")
        if self.codec == "turboquant":
            b = float(self.bits)
            if not 1 <= b <= 8:
                raise ValueError(f"TurboQuant bits must be in 1..8 (fractions for the outlier split), got {self.bits}")
            if self.qjl and b != int(b):
                raise ValueError(f"QJL takes whole bits (got {self.bits}); the outlier split has no QJL variant")
        if self.query_weighting not in (True, False, "full"):
            raise ValueError(f"query_weighting must be True, False or 'full', got {self.query_weighting!r}")
        if self.grid not in ("lloyd-max", "uniform"):
            raise ValueError(f"grid must be 'lloyd-max' or 'uniform', got {self.grid!r}")

    def describe(self) -> str:
        if self.codec == "fp16":
            return "fp16"
        if self.codec == "hqmq":
            return f"hqmq-{self.hqmq}"
        return f"tq{self.bits:g}" + ("+qjl" if self.qjl else "") + ("-uniform" if self.grid == "uniform" else "")


@dataclass(frozen=True)
class CacheConfig:
    """A whole cache's settings.

    keys, values: the CodecSpecs.
    fp_window: the most recent R tokens stay in fp16 (0 = quantize everything).
    fp_sink: the first N tokens (attention sinks) stay in fp16; full-attention layers only.
        Default 1: on SmolLM2 k4v4 this alone halves the KL to the fp cache.
    boundary_layers: the first and last N layers keep mlx-lm's fp cache.
    quant_start: keep every token in fp16 until the cache holds this many, then quantize.
    quantize_sliding: also compress sliding-window (RotatingKVCache) layers.
    rotation: "auto" (randomized Hadamard for power-of-two sizes, else Haar), "haar" or "hadamard".
    seed: the base seed; per (layer, head, K/V) seeds derive from it.
    """

    keys: CodecSpec = field(default_factory=CodecSpec)
    values: CodecSpec = field(default_factory=CodecSpec)
    fp_window: int = 0
    fp_sink: int = 1
    boundary_layers: int = 0
    quant_start: int = 0
    quantize_sliding: bool = True
    rotation: str = "auto"
    seed: int = 0
    name: str = "custom"

    def __post_init__(self):
        for k in ("fp_window", "fp_sink", "boundary_layers", "quant_start", "seed"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{k} must be a non-negative integer, got {v!r}")
        if self.rotation not in ("auto", "haar", "hadamard"):
            raise ValueError(f"rotation must be 'auto', 'haar' or 'hadamard', got {self.rotation!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CacheConfig":
        d = json.loads(text)
        return cls(**{**d, "keys": CodecSpec(**d["keys"]), "values": CodecSpec(**d["values"])})

    @property
    def passthrough(self) -> bool:
        return self.keys.codec == "fp16" and self.values.codec == "fp16"


def _kv(kb, vb, **kw):
    return CacheConfig(keys=CodecSpec(bits=kb, **kw), values=CodecSpec(bits=vb, **kw))


PRESETS = {
    "k8v8": _kv(8, 8),
    "k8v4": _kv(8, 4),
    "k4v4": _kv(4, 4),
    "k4v3": _kv(4, 3),
    "k3v4": _kv(3, 4),
    "k3v3": _kv(3, 3),
    "k2v2": _kv(2, 2),
    "3.5": _kv(3, 4),  # mixed K3 + V4, like mlx-vlm's 3.5-bit preset
    "2.5": _kv(2.5, 2.5),  # the paper's outlier split: 32 ch @ 3 bits + 96 @ 2 at d=128
    "3.5-split": _kv(3.5, 3.5),
    "k4v4-qjl": _kv(4, 4, qjl=True),
    "k8v8-fast": _kv(8, 8, grid="uniform"),
    "k4v4-fast": _kv(4, 4, grid="uniform"),
    "k4v3-fast": _kv(4, 3, grid="uniform"),
    "hqmq-s24r3": CacheConfig(keys=CodecSpec("hqmq", hqmq="s24_r3"), values=CodecSpec("hqmq", hqmq="s24_r3")),
    "hqmq-s96r4": CacheConfig(keys=CodecSpec("hqmq", hqmq="s96_r4"), values=CodecSpec("hqmq", hqmq="s96_r4")),
    "hqmq-s192r6": CacheConfig(keys=CodecSpec("hqmq", hqmq="s192_r6"), values=CodecSpec("hqmq", hqmq="s192_r6")),
    "fp16": CacheConfig(keys=CodecSpec("fp16"), values=CodecSpec("fp16")),
}
PRESETS = {k: replace(v, name=k) for k, v in PRESETS.items()}
DEFAULT_PRESET = "k4v4"
_KV_RE = re.compile(r"^k(\d(?:\.\d+)?)v(\d(?:\.\d+)?)$")


def resolve_config(config=None, **overrides) -> CacheConfig:
    """A CacheConfig from None (the default preset), a preset name, "kXvY", or a CacheConfig; overrides replace fields."""
    if config is None:
        config = DEFAULT_PRESET
    if isinstance(config, CacheConfig):
        cfg = config
    elif isinstance(config, str):
        if config in PRESETS:
            cfg = PRESETS[config]
        elif m := _KV_RE.match(config):
            kb, vb = (float(g) if "." in g else int(g) for g in m.groups())
            cfg = replace(_kv(kb, vb), name=config)
        else:
            raise ValueError(
                f"unknown KV preset {config!r}; allowed: {', '.join(PRESETS)}, or 'kXvY' with X, Y in 1..8"
            )
    else:
        raise TypeError(f"config must be a preset name or a CacheConfig, got {type(config).__name__}")
    return replace(cfg, **overrides) if overrides else cfg

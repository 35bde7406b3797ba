"""The architecture sweep's harness: a tiny random-weight model per mlx-lm architecture, one token sequence
run through mlx-lm's cache, TurboQuant caches and rounding controls, logits compared.

The sequence: PROMPT tokens, fed in one call ("one-call") and, separately, as two chunks of CHUNK
("two-chunks"), then DECODE single tokens (teacher-forced: every cache sees the same inputs). Every forward
call's logits are kept (all positions of a prefill chunk, the one position of a decode step).

Caches compared:
- "mlx": mlx-lm's own `make_prompt_cache(model)`, the reference;
- "fp16-control": the same caches with K/V rounded to float16 as they are written (every cache with an
  `update_and_fetch`, CacheList members included): what an fp16 KV store changes, nothing else;
- "8bit-control": the same with K/V rounded to 8-bit affine codes as mlx-lm's QuantizedKVCache(bits=8)
  holds them (mx.quantize, group 64, or 32 where 64 does not divide the head dim; per vector where neither
  does). Through the wrapper it also covers RotatingKVCache, ChunkedKVCache and MLA latents, where mlx-lm
  has no QuantizedKVCache; `test_architectures` checks it against QuantizedKVCache where both exist;
- "fp16", "k8v8": `tq_mlx.make_prompt_cache(model, preset, quant_start=0)`, compressed from the first
  attention call, or `Refused` when make_prompt_cache raises ValueError / NotImplementedError.

`python tests/arch_sweep.py [ARCH...]` prints the sweep as the markdown table of docs/architectures.md.
"""

import copy
import importlib
import sys
import time
import types
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map
from mlx_lm.models import cache as mlx_cache

import tq_mlx

sys.path.insert(0, __file__.rsplit("/", 1)[0])  # arch_configs, also when run as a script
from arch_configs import ARCH_CONFIGS, METAL_ONLY, ONE_TOKEN_AT_A_TIME, module_name  # noqa: E402

PROMPT, CHUNK, DECODE = 24, 12, 4
SEED = 0
SCHEDULES = ("one-call", "two-chunks")
TQ_PRESETS = ("fp16", "k8v8", "k8v8-static")  # k8v8: keys centred before RoPE (each model's rope module); -static after
CONTROL = {"fp16": "fp16-control", "k8v8": "8bit-control", "k8v8-static": "8bit-control"}

# ---- bounds ----------------------------------------------------------------------------------------------
# The fp16 preset stores exactly the float16-rounded K/V the fp16 control stores; what is left is float32
# summation order (attention by other ops), orders below the rounding itself (the sweep measures tq's error
# equal to the control's to 2 digits on every architecture it serves). FACTOR["fp16"] leaves room for
# other CPUs and BLAS.
# k8v8 (rotated Lloyd-Max codes, centred, query-weighted) measured 0.6x to 2.0x the 8-bit affine control's
# error on the architectures it serves; a cache that loses or misplaces tokens is off by the size of the
# logits (gemma4's KV-shared layers: 100x the fp16 control's error).
FACTOR = {"fp16": 2.0, "k8v8": 3.0, "k8v8-static": 3.0}
FLOOR = 1e-4  # relative to the logits' RMS: models whose logits barely move when K/V are rounded


def bound(preset: str, control_error: float, scale: float) -> float:
    return FACTOR[preset] * control_error + FLOOR * scale


# ---- the model ---------------------------------------------------------------------------------------------
def load_module(arch: str):
    """mlx_lm.models.<module>. olmo probes `import hf_olmo` (ai2-olmo, with torch) at import and exits the
    process without it; the model never uses it, so an empty module stands in when it is missing."""
    name = module_name(arch)
    if name == "olmo" and "hf_olmo" not in sys.modules:
        try:
            import hf_olmo  # noqa: F401
        except ImportError:
            sys.modules["hf_olmo"] = types.ModuleType("hf_olmo")
    return importlib.import_module(f"mlx_lm.models.{name}")


def build_model(arch: str):
    """The architecture's Model with random float32 weights from a fixed seed. Weights a module initialises
    to all zeros (talkie's lm_head, biases, gemma-style norm offsets, attention sinks) get small random
    values too: a zero weight can make the logits blind to the cache."""
    mod = load_module(arch)
    mx.random.seed(SEED)
    model = mod.Model(mod.ModelArgs.from_dict(copy.deepcopy(ARCH_CONFIGS[arch])))

    def init(p):
        if not mx.issubdtype(p.dtype, mx.floating):
            return p
        p = p.astype(mx.float32)
        return 0.02 * mx.random.normal(p.shape) if p.size and not mx.any(p).item() else p

    model.update(tree_map(init, model.parameters()))
    mx.eval(model.parameters())
    return model


def tokens() -> list:
    return np.random.RandomState(SEED).randint(0, 256, PROMPT + DECODE).tolist()


def schedule(arch: str, name: str) -> list:
    """(start, stop) of each forward call."""
    if module_name(arch) in ONE_TOKEN_AT_A_TIME:
        return [(i, i + 1) for i in range(PROMPT + DECODE)]
    prefill = [(0, PROMPT)] if name == "one-call" else [(0, CHUNK), (CHUNK, PROMPT)]
    return prefill + [(i, i + 1) for i in range(PROMPT, PROMPT + DECODE)]


def run(model, cache, arch: str, sched: str) -> list:
    """float32 logits (L, vocab) of each forward call."""
    ids = mx.array([tokens()])
    out = []
    for a, b in schedule(arch, sched):
        logits = model(ids[:, a:b], cache=cache)
        out.append(np.array(logits[0].astype(mx.float32)))
    return out


# ---- the caches' structure ---------------------------------------------------------------------------------
def leaves(caches):
    """Every cache object in a cache list, CacheList members (and nested lists) included."""
    for c in caches:
        if isinstance(c, mlx_cache.CacheList):
            yield from leaves(c.caches)
        elif isinstance(c, (list, tuple)):
            yield from leaves(c)
        else:
            yield c


def is_kv(c) -> bool:
    """A cache attention writes keys and values into (KVCache, RotatingKVCache, ChunkedKVCache, ...)."""
    return c is not None and callable(getattr(c, "update_and_fetch", None))


def describe(c) -> str:
    if c is None:
        return "None"
    if isinstance(c, mlx_cache.CacheList):
        return "CacheList(" + ", ".join(describe(x) for x in c.caches) + ")"
    name = type(c).__name__
    if isinstance(c, mlx_cache.RotatingKVCache):
        return f"{name}({c.max_size})"
    if isinstance(c, mlx_cache.ChunkedKVCache):
        return f"{name}({c.chunk_size})"
    return name


def describe_all(caches) -> str:
    """'2x KVCache, 2x ArraysCache': the kinds in order of first appearance."""
    kinds = [describe(c) for c in caches]
    return ", ".join(f"{kinds.count(k)}x {k}" for k in dict.fromkeys(kinds))


# ---- rounding controls -------------------------------------------------------------------------------------
def round_fp16(x):
    return x.astype(mx.float16).astype(x.dtype)


def round_8bit(x):
    """8-bit affine codes along the last axis, dequantized: mx.quantize as mlx-lm's QuantizedKVCache(bits=8)
    (group 64, or 32 for head dims that 64 does not divide); per vector for other head dims."""
    d = x.shape[-1]
    gs = next((g for g in (64, 32) if d % g == 0), None)
    if gs is not None:
        return mx.dequantize(*mx.quantize(x, group_size=gs, bits=8), group_size=gs, bits=8).astype(x.dtype)
    lo, hi = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
    scale = mx.maximum((hi - lo) / 255, 1e-12)
    return (mx.round((x - lo) / scale) * scale + lo).astype(x.dtype)


ROUNDING = {"fp16-control": round_fp16, "8bit-control": round_8bit}
_CLASSES = {}


def _rounding_class(cls, fn):
    if (cls, fn) not in _CLASSES:

        def update_and_fetch(self, keys, values):
            return cls.update_and_fetch(self, fn(keys), fn(values))

        _CLASSES[cls, fn] = type(f"Rounded{cls.__name__}", (cls,), {"update_and_fetch": update_and_fetch})
    return _CLASSES[cls, fn]


def rounded(caches, fn):
    """mlx-lm's caches with every K/V written through `fn` (the cache keeps and returns the rounded K/V)."""
    for c in leaves(caches):
        if is_kv(c):
            c.__class__ = _rounding_class(type(c), fn)
    return caches


# ---- comparing logits ----------------------------------------------------------------------------------------
def call_errors(a: list, b: list) -> list:
    """max |a - b| of each call's logits (equal entries, -inf ones included, count 0; NaN counts inf)."""
    out = []
    for x, y in zip(a, b, strict=True):
        with np.errstate(invalid="ignore"):
            d = np.where(x == y, 0.0, np.abs(x - y))
        out.append(float(np.max(np.nan_to_num(d, nan=np.inf))))
    return out


def max_error(a: list, b: list) -> float:
    return max(call_errors(a, b))


def logit_scale(ref: list) -> float:
    """The reference logits' RMS over every call (finite entries): errors are reported relative to it."""
    v = np.concatenate([r.ravel() for r in ref])
    return float(np.sqrt(np.mean(v[np.isfinite(v)] ** 2)))


# ---- one architecture --------------------------------------------------------------------------------------
@dataclass
class Refused:
    message: str


class Sweep:
    """One architecture's model and its reference runs ({(cache, schedule): logits per call})."""

    def __init__(self, arch: str):
        self.arch = arch
        self.model = build_model(arch)
        self.refs = {}
        for sched in SCHEDULES:
            self.refs["mlx", sched] = run(self.model, self.mlx_cache(), arch, sched)
            for name, fn in ROUNDING.items():
                self.refs[name, sched] = run(self.model, rounded(self.mlx_cache(), fn), arch, sched)
        self.scale = max(logit_scale(self.refs["mlx", s]) for s in SCHEDULES)

    def mlx_cache(self):
        return mlx_cache.make_prompt_cache(self.model)

    def tq_cache(self, preset, **overrides):
        """tq_mlx's cache for `preset`, compressed from the first attention call, or Refused."""
        try:
            return tq_mlx.make_prompt_cache(self.model, preset, quant_start=0, **overrides)
        except (ValueError, NotImplementedError) as e:
            return Refused(f"{type(e).__name__}: {e}")

    def tq_run(self, preset, sched, **overrides):
        """Logits per call with tq_mlx's cache, or Refused; an exception in a forward call propagates."""
        cache = self.tq_cache(preset, **overrides)
        return cache if isinstance(cache, Refused) else run(self.model, cache, self.arch, sched)

    def error(self, got, sched) -> float:
        return max_error(got, self.refs["mlx", sched])

    def control_error(self, preset, sched) -> float:
        return max_error(self.refs[CONTROL[preset], sched], self.refs["mlx", sched])

    def check(self, preset, sched, got):
        """None when `got` is within the preset's bound on this schedule, else what is wrong."""
        ref = self.refs["mlx", sched]
        errs = call_errors(got, ref)
        ctrl = self.control_error(preset, sched)
        lim = bound(preset, ctrl, self.scale)
        if max(errs) <= lim:
            return None
        calls = schedule(self.arch, sched)
        bad = [f"tokens {a}:{b} ({e:.3g})" for (a, b), e in zip(calls, errs) if e > lim]
        return (
            f"{self.arch} {preset} {sched}: max |logit error| {max(errs):.3g} > bound {lim:.3g} "
            f"({FACTOR[preset]} x {CONTROL[preset]}'s {ctrl:.3g} + {FLOOR} x logit RMS {self.scale:.3g}); "
            f"calls over it: {', '.join(bad)}"
        )


# ---- the report ----------------------------------------------------------------------------------------------
@dataclass
class Result:
    arch: str
    kinds: str = ""
    kv_layers: int = 0
    tq_layers: dict = field(default_factory=dict)  # preset -> TurboQuantKVCache count, or None when refused
    outcome: dict = field(default_factory=dict)  # preset -> ok / refused / crash / wrong (per schedule if they differ)
    error: dict = field(default_factory=dict)  # preset -> relative max error over the schedules that ran
    control: dict = field(default_factory=dict)  # preset -> relative max error of its control
    notes: dict = field(default_factory=dict)  # preset -> the refusal or exception, per schedule
    seconds: float = 0.0


RANK = ("ok", "refused", "wrong", "crash")


def sweep_one(arch: str) -> Result:
    t0 = time.perf_counter()
    sw = Sweep(arch)
    res = Result(arch)
    base = sw.mlx_cache()
    res.kinds = describe_all(base)
    res.kv_layers = sum(is_kv(c) for c in leaves(base))
    for preset in TQ_PRESETS:
        res.control[preset] = max(sw.control_error(preset, s) for s in SCHEDULES) / sw.scale
        cache = sw.tq_cache(preset)
        res.tq_layers[preset] = (
            None if isinstance(cache, Refused) else sum(isinstance(c, tq_mlx.TurboQuantKVCache) for c in leaves(cache))
        )
        outcomes, errors, notes = {}, {}, {}
        for sched in SCHEDULES:
            try:
                got = sw.tq_run(preset, sched)
            except Exception as e:  # noqa: BLE001  (the report records every crash)
                outcomes[sched], notes[sched] = "crash", f"{type(e).__name__}: {e}"
                continue
            if isinstance(got, Refused):
                outcomes[sched], notes[sched] = "refused", got.message
                continue
            errors[sched] = sw.error(got, sched)
            outcomes[sched] = "ok" if sw.check(preset, sched, got) is None else "wrong"
        worst = max(outcomes.values(), key=RANK.index)
        if len(set(outcomes.values())) > 1:
            worst = " / ".join(f"{outcomes[s]} ({s})" for s in SCHEDULES)
        res.outcome[preset] = worst
        res.error[preset] = max(errors.values()) / sw.scale if errors else None
        res.notes[preset] = "; ".join(f"{s}: {n.splitlines()[0][:240]}" for s, n in notes.items())
    res.seconds = time.perf_counter() - t0
    return res


def _fmt(v):
    return f"{v:.1e}" if isinstance(v, float) else "-"


def main(argv):
    archs = argv or sorted(ARCH_CONFIGS)
    print(
        "| architecture | fp16 | k8v8 | fp16 err / control | k8v8 err / control | KV caches compressed "
        "(fp16, k8v8) / mlx-lm's | mlx-lm's caches | s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    t0 = time.perf_counter()
    for arch in archs:
        if module_name(arch) in METAL_ONLY and not mx.metal.is_available():
            print(f"| {arch} | skipped | skipped | - | - | - | Metal only: {METAL_ONLY[module_name(arch)]} | - |")
            continue
        r = sweep_one(arch)
        errs = [f"{_fmt(r.error.get(p))} / {_fmt(r.control[p])}" for p in TQ_PRESETS]
        comp = ", ".join("-" if r.tq_layers[p] is None else str(r.tq_layers[p]) for p in TQ_PRESETS)
        print(
            f"| {arch} | {r.outcome['fp16']} | {r.outcome['k8v8']} | {errs[0]} | {errs[1]} | "
            f"{comp} / {r.kv_layers} | {r.kinds} | {r.seconds:.1f} |",
            flush=True,
        )
        for p in TQ_PRESETS:
            if r.notes[p]:
                print(f"<!-- {arch} {p}: {r.notes[p]} -->", flush=True)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])

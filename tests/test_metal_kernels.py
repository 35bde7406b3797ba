"""Metal kernels (tq_mlx.kernels) and the kernel attention path, checked on the CPU emulator.

Every kernel runs through metal_emu (`patched_mlx(check_races=True)`: four thread schedules compared,
threadgroup memory poisoned with NaN, MSL address spaces checked with clang) against the reference
path; on a Mac the same tests run the real kernels.  The emulator is carried in this repository.
"""

import logging
import shutil

import mlx.core as mx
import numpy as np
import pytest
from emu import emulated, metal_emu

import tq_mlx
from tq_mlx import CacheConfig, CodecSpec, TurboQuantKVCache
from tq_mlx import kernels as K
from tq_mlx.attention import attention, unsupported_reason
from tq_mlx.packing import unpack
from tq_mlx.reference_attention import reference_attention
from tq_mlx.turboquant import TurboQuant

pytestmark = pytest.mark.emu


def _cache(config, H, D, L, seed=0, dtype=mx.float32, **overrides):
    """A calibrated cache of L tokens, encoded on the reference path."""
    cfg = tq_mlx.resolve_config(config, quant_start=0, **overrides)
    c = TurboQuantKVCache(cfg)
    k = mx.random.normal((1, H, L, D), key=mx.random.key(seed)).astype(dtype)
    v = mx.random.normal((1, H, L, D), key=mx.random.key(seed + 1)).astype(dtype)
    c.update_and_fetch(k, v)
    attention(c, mx.random.normal((1, H, L, D), key=mx.random.key(seed + 2)).astype(dtype), D**-0.5, "causal")
    return c


def _step(cache, H, D, seed, dtype=mx.float32):
    cache.update_and_fetch(
        *(mx.random.normal((1, H, 1, D), key=mx.random.key(seed + i)).astype(dtype) for i in range(2))
    )


def _both(cache, q, scale, mask=None, sinks=None, monkeypatch=None, **emu):
    """(kernel path, reference path) outputs of one attention call as float32 numpy."""
    ref = reference_attention(cache, q, scale, mask, sinks)
    monkeypatch.setenv("TQ_MLX_ATTENTION", "metal")
    with emulated(**emu):
        got = attention(cache, q, scale, mask, sinks)
        mx.eval(got)
    monkeypatch.delenv("TQ_MLX_ATTENTION")
    return np.array(got.astype(mx.float32)), np.array(ref.astype(mx.float32))


def _close(got, ref, tol):
    assert np.abs(got - ref).max() <= tol * max(1.0, np.abs(ref).max()), np.abs(got - ref).max()


# (config, D, G, fp_window, sinks): Hadamard at 64/128/256, dense rotations at 80/96, 1..8 query heads
# per KV head (padded to 4 and split into two head groups above 4), odd widths that straddle words
DECODE_CASES = [
    ("k4v3", 64, 3, 0, False),
    ("k4v4", 128, 4, 4, True),
    ("k8v4", 256, 7, 0, False),
    ("k3v2", 80, 1, 2, False),
    ("k5v6", 96, 2, 0, True),
    (CacheConfig(keys=CodecSpec(bits=4, query_weighting="full"), values=CodecSpec(bits=4)), 64, 8, 3, False),
    ("k4v4-tcq", 128, 4, 2, True),  # trellis windows: 10 bits across chunk and word boundaries
    ("k3v2-tcq", 64, 2, 0, False),
]


@pytest.mark.parametrize("config,D,G,fp_window,sinks", DECODE_CASES)
def test_decode_on_the_kernels_matches_the_reference(config, D, G, fp_window, sinks, monkeypatch):
    H, L = 2, 37
    cache = _cache(config, H, D, L, seed=D, fp_window=fp_window)
    sk = mx.random.normal((H * G,)) if sinks else None
    for step in range(2):
        _step(cache, H, D, seed=100 * D + step)
        q = mx.random.normal((1, H * G, 1, D), key=mx.random.key(step))
        got, ref = _both(cache, q, D**-0.5, None, sk, monkeypatch)
        _close(got, ref, 2e-5)


def test_split_k_blocks_merge_exactly(monkeypatch):
    """Several key blocks per KV head (forced small), the last one partial, plus the fp16 block."""
    monkeypatch.setattr(K, "MIN_BLOCK", 8)
    cache = _cache("k4v3", 1, 64, 70, seed=3, fp_window=2)
    _step(cache, 1, 64, seed=9)
    assert K.num_blocks(cache.codes.length, 1)[1] > 4
    got, ref = _both(cache, mx.random.normal((1, 3, 1, 64)), 0.125, None, None, monkeypatch)
    _close(got, ref, 2e-5)


def test_tiny_exactly_sized_buffers_are_read_from_constant_memory(monkeypatch):
    """A reloaded cache holds exactly-sized buffers: with one head and two tokens its norms have fewer than
    8 elements, which MLX passes as `constant` pointers (Apple's compiler rejects mixing them with device)."""
    cache = _cache("k4v4", 1, 64, 3, seed=5)  # sink + 2 coded tokens
    clone = TurboQuantKVCache.from_state(cache.state)
    assert clone.code_buffers().k["norm0"].size < 8
    got, ref = _both(clone, mx.random.normal((1, 1, 1, 64)), 0.125, None, None, monkeypatch)
    _close(got, ref, 2e-5)


@pytest.mark.parametrize("config,D,dtype", [("k4v3", 128, mx.float32), ("k3v2", 80, mx.float16)])
def test_prefill_on_the_kernels_matches_the_reference(config, D, dtype, monkeypatch):
    H, G = 2, 3
    cache = _cache(config, H, D, 29, seed=D, dtype=dtype, fp_window=4)
    k, v = (mx.random.normal((1, H, 16, D), key=mx.random.key(i)).astype(dtype) for i in (7, 8))
    cache.update_and_fetch(k, v)
    q = mx.random.normal((1, H * G, 16, D), key=mx.random.key(9)).astype(dtype)
    got, ref = _both(cache, q, D**-0.5, "causal", None, monkeypatch)
    _close(got, ref, 1e-4 if dtype == mx.float32 else 2e-2)


def mean_and_weights(H, D, weights):
    """A centring mean (H, D) and channel weights: None, "diag" (H, D) or "full" (H, D, D) matrices."""
    mean = mx.random.normal((H, D), key=mx.random.key(1)) * 0.3
    w = None
    if weights == "diag":
        w = mx.exp(mx.random.normal((H, D), key=mx.random.key(2)) * 0.3)
    elif weights == "full":
        a = np.eye(D) + 0.05 * np.random.default_rng(3).standard_normal((H, D, D))
        w = mx.array(a.astype(np.float32))
    return mean, w


@pytest.mark.parametrize("D,bits,weights", [(64, 4, "diag"), (128, 3, None), (80, 5, "diag"), (256, 8, "full")])
def test_encode_kernel_gives_the_reference_codes(D, bits, weights):
    H, T = 2, 21  # rows 42: a partial last threadgroup
    mean, w = mean_and_weights(H, D, weights)
    ref_codec = TurboQuant(D, H, bits, mean=mean, weight=w, seed=bits)
    kern_codec = TurboQuant(D, H, bits, mean=mean, weight=w, seed=bits, use_kernels=True)
    x = mx.random.normal((1, H, T, D), key=mx.random.key(D))
    ref = ref_codec.encode(x)
    with emulated():
        got = kern_codec.encode(x)
        mx.eval(got)
    # a coordinate on a decision edge may round to the other side (norms summed in another order)
    a, b = np.array(unpack(got["codes0"], bits, D)), np.array(unpack(ref["codes0"], bits, D))
    assert (a != b).mean() < 2e-3 and np.abs(a.astype(int) - b).max() <= 1
    np.testing.assert_allclose(
        np.array(got["norm0"].astype(mx.float32)), np.array(ref["norm0"].astype(mx.float32)), rtol=2e-3
    )


@pytest.mark.parametrize(
    "D,bits,dtype,grid",
    [
        (80, 3, mx.float32, "lloyd-max"),
        (128, 4, mx.float16, "lloyd-max"),
        (256, 7, mx.float32, "lloyd-max"),
        (64, 4, mx.float32, "trellis"),
        (96, 3, mx.float32, "trellis"),
        (128, 2, mx.float16, "trellis"),
    ],
)
def test_dequant_kernel(D, bits, dtype, grid):
    codec = TurboQuant(D, 2, bits, seed=bits, grid=grid)
    enc = codec.encode(mx.random.normal((1, 2, 33, D), key=mx.random.key(bits)))
    with emulated():
        y = K.dequantize(enc["codes0"], enc["norm0"], codec.levels, 33, D, dtype, fmt=codec.kernel_format)
        mx.eval(y)
    ref = np.array(codec.segment_values(enc))
    np.testing.assert_allclose(
        np.array(y.astype(mx.float32)),
        ref,
        rtol=1e-3 if dtype == mx.float16 else 1e-6,
        atol=1e-4 if dtype == mx.float16 else 0,
    )


@pytest.mark.parametrize("config", ["k5v3", "k4v3-tcq"])
def test_ubsan_over_the_bit_unpacking(config, monkeypatch):
    """Encode, decode (with a straddling width, trellis windows) and dequant under UBSan: no shift of 32 or more."""
    cache = _cache(config, 1, 80, 20, seed=11)
    _step(cache, 1, 80, seed=12)
    got, ref = _both(cache, mx.random.normal((1, 2, 1, 80)), 0.1, None, None, monkeypatch, ubsan=True)
    _close(got, ref, 2e-5)
    codec = TurboQuant(80, 1, 5, seed=1, use_kernels=True)
    with emulated(ubsan=True):
        enc = codec.encode(mx.random.normal((1, 1, 9, 80)))
        y = K.dequantize(enc["codes0"], enc["norm0"], codec.levels, 9, 80, mx.float32)
        mx.eval(y)
    np.testing.assert_allclose(np.array(y), np.array(codec.segment_values(enc)), rtol=1e-6)


def test_clang_build(monkeypatch):
    if shutil.which("clang++-19") is None:
        pytest.skip("clang++-19 is not installed (.ci/run installs it)")
    monkeypatch.setattr(metal_emu().kernel, "CXX", "clang++-19")
    cache = _cache("k4v3", 1, 64, 20, seed=13)
    _step(cache, 1, 64, seed=14)
    got, ref = _both(cache, mx.random.normal((1, 3, 1, 64)), 0.125, None, None, monkeypatch, check_races=False)
    _close(got, ref, 2e-5)


def test_unsupported_formats_take_the_reference_path(monkeypatch, caplog):
    cache = _cache("2.5", 2, 128, 40)  # the outlier split: two segments
    _step(cache, 2, 128, seed=1)
    q = mx.random.normal((1, 2, 1, 128))
    assert "segments" in unsupported_reason(cache, q, None)
    with caplog.at_level(logging.INFO, logger="tq_mlx"):
        got, ref = _both(cache, q, 0.1, None, None, monkeypatch)
    np.testing.assert_array_equal(got, ref)
    assert any("segments" in r.getMessage() for r in caplog.records)


def test_a_kernel_that_fails_to_build_falls_back_with_one_warning(monkeypatch, caplog):
    cache = _cache("k4v4", 1, 64, 20, seed=15)
    _step(cache, 1, 64, seed=16)
    broken = K.source("tq_decode").replace("constexpr int NSG = 8;", "constexpr int NSG = 8; this is not MSL;")
    monkeypatch.setitem(K._SOURCES, "tq_decode", broken)
    monkeypatch.setattr(K, "_KERNELS", {})
    monkeypatch.setattr(K, "_VERIFIED", {})
    q = mx.random.normal((1, 2, 1, 64))
    ref = np.array(reference_attention(cache, q, 0.125))
    monkeypatch.setenv("TQ_MLX_ATTENTION", "metal")
    with caplog.at_level(logging.WARNING, logger="tq_mlx"), emulated(check_races=False):
        got = [np.array(attention(cache, q, 0.125)) for _ in range(2)]
    np.testing.assert_array_equal(got[0], ref)
    np.testing.assert_array_equal(got[1], ref)
    warnings = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(warnings) == 1 and "decode" in warnings[0] and "reference path" in warnings[0]


def test_token_counts_are_runtime_inputs_not_template_values(monkeypatch):
    """Decoding never recompiles: the template values of a decode step do not change with the cache length."""
    seen = []
    real = K.kernel

    def spy(name):
        k = real(name)

        def call(**kw):
            seen.append((name, tuple(kw["template"])))
            return k(**kw)

        return call

    monkeypatch.setattr(K, "kernel", spy)
    cache = _cache("k4v4", 1, 64, 20, seed=17)
    for step in range(3):
        _step(cache, 1, 64, seed=18 + step)
        _both(cache, mx.random.normal((1, 2, 1, 64)), 0.125, None, None, monkeypatch, check_races=False)
    decode = {t for n, t in seen if n == "tq_decode"}
    assert len([n for n, _ in seen if n == "tq_decode"]) == 3 and len(decode) == 1


@pytest.mark.model
@pytest.mark.parametrize("config", ["k8v8", "k8v8-rope"])
def test_smollm2_decode_on_the_kernel_path_matches_the_reference(smol, config, monkeypatch):
    """Teacher-forced (no greedy near-ties): a prefill chunk, then one decode step per token (RoPE-centred
    keys: encoded less their block's turned mean by tq_encode, and past position 16, a second block).

    The two paths sum in different orders, and a last-bit difference can move a coordinate across a
    decision edge in a later layer; at 8 bits that moves it by one small step, so the next-token
    distributions agree to a KL far below any real error (a wrong kernel gives KL >> 0.01)."""
    model, tok = smol
    ids = tok.encode("The capital of France is Paris, and the capital of Italy is Rome.")
    if config.endswith("-rope"):
        ids += tok.encode(" The capital of Spain is Madrid.")
        assert len(ids) > 17

    def log_probs(mode):
        monkeypatch.setenv("TQ_MLX_ATTENTION", mode)
        cache = tq_mlx.make_prompt_cache(model, config, quant_start=0)
        out = [model(mx.array(ids[:6])[None], cache=cache)[0, -1]]
        out += [model(mx.array([[t]]), cache=cache)[0, -1] for t in ids[6:]]
        lp = mx.stack(out).astype(mx.float32)
        return lp - mx.logsumexp(lp, axis=-1, keepdims=True)

    calls = []
    decode = K.decode_partials
    monkeypatch.setattr(K, "decode_partials", lambda *a, **kw: calls.append(1) or decode(*a, **kw))
    ref = log_probs("reference")
    assert not calls
    # races are checked per kernel above; here one schedule keeps 30 layers x the decode steps quick
    with emulated(check_races=False):
        got = log_probs("metal")
    assert len(calls) == 30 * (len(ids) - 6)  # every layer's decode step went through the kernel
    kl = mx.sum(mx.exp(ref) * (ref - got), axis=-1)
    assert float(kl.max().item()) < 2e-3, np.array(kl)


@pytest.mark.parametrize("config,D,G,split", [("k4v4-rope", 64, 3, False), ("k3v2-rope", 128, 4, True)])
def test_rope_centred_decode_on_the_kernels_matches_the_reference(config, D, G, split, monkeypatch):
    """The turned key mean's term per block of 16 positions (tq_rope_bias), read by tq_decode; split-K blocks
    that do not start on a block of positions; decode steps that cross into a new block."""
    import mlx.nn as nn

    from tq_mlx.rope_mean import probe, rotate

    if split:
        monkeypatch.setattr(K, "MIN_BLOCK", 8)
    H, L = 2, 45
    rmap = probe(nn.RoPE(D, base=10000.0), D)
    mu = 3 * mx.random.normal((H, D), key=mx.random.key(D))
    cache = TurboQuantKVCache(tq_mlx.resolve_config(config, quant_start=32), rope=rmap)
    k = rotate(rmap, mu, 0, L) + mx.random.normal((1, H, L, D), key=mx.random.key(1))
    cache.update_and_fetch(k, mx.random.normal((1, H, L, D), key=mx.random.key(2)))
    attention(cache, mx.random.normal((1, H * G, L, D), key=mx.random.key(3)), D**-0.5, "causal")
    assert cache.k_codec.kernel_reason() is None and cache.k_codec.rope_block == 16
    for step in range(4):  # positions 45 .. 48: the last opens block 3
        _step(cache, H, D, seed=100 * D + step)
        q = mx.random.normal((1, H * G, 1, D), key=mx.random.key(step))
        got, ref = _both(cache, q, D**-0.5, None, None, monkeypatch)
        _close(got, ref, 2e-5)
    ran = [ok for key, ok in K._VERIFIED.items() if key[1] == "decode" and key[-2] == 16]
    assert ran and all(ran)  # the kernels served it (no fallback to the reference path)


@pytest.mark.parametrize("dims", [64, 32])
def test_rope_bias_kernel_turns_the_mean_to_block_centres_far_out(dims):
    """tq_rope_bias against rope_mean.rotate at positions 32000+ (its phasors step 16 blocks from one sincos);
    RoPE on 32 of 64 dims: coordinates that do not turn."""
    import mlx.nn as nn

    from tq_mlx.rope_mean import kernel_pairs, probe, rotate

    D, H, G, b0, nb = 64, 2, 3, 2000, 21
    rmap = probe(nn.RoPE(dims, base=10000.0), D)
    mu = 3 * mx.random.normal((H, D), key=mx.random.key(4))
    q = mx.random.normal((1, H * G, 1, D), key=mx.random.key(5))
    with emulated():
        f = K.rope_bias(q, 0.125, *kernel_pairs(rmap, mu), b0, nb, 16, G)
        mx.eval(f)
    means = rotate(rmap, mu, 16 * b0, 16 * nb, 16)[0, :, ::16]  # (H, nb, D): one per block
    want = 0.125 * 1.4426950408889634 * mx.einsum("hgd,hbd->hgb", q.reshape(H, G, D), means).reshape(H * G, nb)
    # float32 angles near position 32000 are good to ~2e-3 rad on either side (as the model's own RoPE)
    assert f.shape == (H * G, nb + 1)  # a spare column for tq_decode's last step
    assert np.abs(np.array(f[:, :nb]) - np.array(want)).max() <= 1e-3 * np.abs(np.array(want)).max()


def test_rope_centred_ring_decodes_on_the_kernels_at_the_positions_its_layout_gives(monkeypatch):
    """A sliding window's ring, wrapped: tq_decode computes each code slot's position (kring) for its block, from
    the front tile of kf (the first tokens, kept) or the blocks of the recent ones."""
    import mlx.nn as nn

    from tq_mlx.rope_mean import probe, rotate

    D, H, G = 64, 2, 2
    rmap = probe(nn.RoPE(D, base=10000.0), D)
    mu = 3 * mx.random.normal((H, D), key=mx.random.key(6))
    cfg = tq_mlx.resolve_config("k4v4-rope", quant_start=64, fp_window=6)  # an fp16 block beside the ring
    cache = TurboQuantKVCache(cfg, max_size=96, keep=4, rope=rmap)
    k = rotate(rmap, mu, 0, 300) + mx.random.normal((1, H, 300, D), key=mx.random.key(7))
    v = mx.random.normal((1, H, 300, D), key=mx.random.key(8))
    cache.update_and_fetch(k[:, :, :80], v[:, :, :80])
    attention(cache, mx.random.normal((1, H * G, 80, D), key=mx.random.key(9)), D**-0.5, "causal")
    for t in range(80, 300):  # the ring wraps twice; its front tokens and ones past position 256 stay
        cache.update_and_fetch(k[:, :, t : t + 1], v[:, :, t : t + 1])
        q = mx.random.normal((1, H * G, 1, D), key=mx.random.key(t))
        if t < 296:
            attention(cache, q, D**-0.5)
        else:
            got, ref = _both(cache, q, D**-0.5, None, None, monkeypatch)
            _close(got, ref, 2e-5)
    assert cache.codes.start > 0 and cache.ring_slots() is not None
    ran = [ok for key, ok in K._VERIFIED.items() if key[1] == "decode" and key[-2] == 16 and key[-1]]
    assert ran and all(ran)

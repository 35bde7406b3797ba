"""Metal kernels (tq_mlx.kernels) and the kernel attention path, checked on the CPU emulator.

Every kernel runs through metal_emu (`patched_mlx(check_races=True)`: four thread schedules
compared, threadgroup memory poisoned with NaN) against the codecs' reference math; on a Mac the
same tests run the real kernels.  The emulator is carried in this repository (tools/metal_emu).
"""

import logging
import shutil

import mlx.core as mx
import numpy as np
import pytest
from emu import emulated, metal_emu

from tq_mlx import CacheConfig, CodecSpec
from tq_mlx import kernels as K
from tq_mlx.turboquant import TurboQuant

pytestmark = pytest.mark.emu


@pytest.fixture(scope="module")
def emu_module():
    return metal_emu()


# ---------------------------------------------------------------------------------------------
# helpers: encoded tokens padded to a larger capacity (like TokenStore's buffers), float64 refs
# ---------------------------------------------------------------------------------------------
def _coded(B, H, T, D, kb, vb, seed=0, cap_extra=5):
    mx.random.seed(seed)
    ck = TurboQuant(D, H, kb, part="k", seed=seed)
    cv = TurboQuant(D, H, vb, part="v", seed=seed)
    k = mx.random.normal((B, H, T + cap_extra, D))
    v = mx.random.normal((B, H, T + cap_extra, D))
    ek, ev = ck.encode(k), cv.encode(v)  # tokens >= T are junk the kernels must not read
    return ck, cv, ek, ev


def _ref_partial(q, ck, cv, ek, ev, T):
    """float64 (o un-normalised, m, l) over the first T tokens; q (B, H, G, D) rotated."""
    yk = np.array(ck.segment_values(ek), dtype=np.float64)[:, :, :T]
    yv = np.array(cv.segment_values(ev), dtype=np.float64)[:, :, :T]
    s = np.einsum("bhgd,bhtd->bhgt", np.array(q, dtype=np.float64), yk)
    m = s.max(-1)
    p = np.exp(s - m[..., None])
    return np.einsum("bhgt,bhtd->bhgd", p, yv), m, p.sum(-1)


def _run_decode(ck, cv, ek, ev, q, T, **kw):
    B, H, G, D = q.shape
    o, m, l = K.decode_attention(
        q.reshape(B * H, G, D),
        ek["codes0"],
        ek["norm0"],
        ev["codes0"],
        ev["norm0"],
        ck.segments[0].levels,
        cv.segments[0].levels,
        T,
        **kw,
    )
    return (np.array(o).reshape(B, H, G, D), np.array(m).reshape(B, H, G), np.array(l).reshape(B, H, G))


def _check(got, ref, rtol=2e-5):
    (o, m, l), (ro, rm, rl) = got, ref
    np.testing.assert_allclose(m, rm, rtol=rtol, atol=rtol * np.abs(rm).max())
    np.testing.assert_allclose(l, rl, rtol=rtol, atol=0)
    # normalised outputs: per-coordinate error against the scale of the output
    no, nr = o / l[..., None], ro / rl[..., None]
    assert np.abs(no - nr).max() <= rtol * max(1.0, np.abs(nr).max()), np.abs(no - nr).max()


# (D, G, T, K bits, V bits, block): block None = the launcher's own choice
DECODE_CASES = [  # few distinct (D, bits, G) variants, shared with the dispatch and model tests below
    (64, 3, 1, 4, 3, None),
    (64, 3, 31, 4, 3, None),
    (128, 3, 33, 4, 3, None),  # k4v3
    (128, 3, 1000, 4, 3, None),
    (256, 7, 33, 8, 4, None),  # k8v4, GQA 7
    (256, 7, 257, 8, 4, 32),  # split-K: 8 full blocks of 32 + one key
    (80, 3, 70, 3, 2, 32),  # partial last 32-group; merge grid 80 = 64 + a partial threadgroup of 16
    (96, 1, 100, 2, 2, None),
    (64, 3, 2305, 4, 3, None),  # natural split-K: 9 * 256 + 1 tokens -> 10 blocks of 256, the last with one key
]


@pytest.mark.parametrize("D,G,T,kb,vb,block", DECODE_CASES)
def test_decode_kernel_matches_reference(D, G, T, kb, vb, block):
    B, H = (2, 2) if T < 2000 else (1, 1)
    ck, cv, ek, ev = _coded(B, H, T, D, kb, vb, seed=D + T)
    q = ck.rotate_query(mx.random.normal((B, H, G, D)) * (0.5 / np.sqrt(D)) * 8)
    if block is None and T > K.SINGLE_PASS_MAX:
        assert K.num_blocks(T)[1] > 1 and T % K.num_blocks(T)[0] == 1
    with emulated():
        got = _run_decode(ck, cv, ek, ev, q, T, block=block)
    _check(got, _ref_partial(q, ck, cv, ek, ev, T))


@pytest.mark.parametrize(
    "D,bits,T,rows_per_tg,dtype", [(80, 3, 70, 8, mx.float32), (128, 4, 33, 8, mx.float16), (256, 8, 5, 4, mx.float32)]
)  # partial last TGs
def test_dequant_kernel(D, bits, T, rows_per_tg, dtype):
    B, H = 1, 2  # B*H*T rows: 140, 66 and 10 leave a partial last threadgroup
    ck, _, ek, _ = _coded(B, H, T, D, bits, 2, seed=bits)
    ref = np.array(ck.segment_values(ek))[:, :, :T]
    with emulated():
        y = K.dequantize(ek["codes0"], ek["norm0"], ck.segments[0].levels, T, D, dtype, rows_per_tg)
    if dtype == mx.float32:
        np.testing.assert_array_equal(np.array(y), ref)
    else:
        np.testing.assert_allclose(np.array(y.astype(mx.float32)), ref, rtol=1e-3, atol=1e-4)


def test_ubsan_unpacking(emu_module):
    """The unpacking kernels (decode + split-K merge, dequant) and the packing one (encode) under UBSan,
    with a partial last 32-group."""
    D, G, T, kb, vb = 80, 3, 70, 3, 2
    ck, cv, ek, ev = _coded(1, 2, T, D, kb, vb, seed=11)
    q = ck.rotate_query(mx.random.normal((1, 2, G, D)))
    seg = ck.segments[0]
    yr = ck.rotation.forward(mx.random.normal((1, 2, T, D)))
    with emulated(ubsan=True):
        got = _run_decode(ck, cv, ek, ev, q, T, block=32)
        y = K.dequantize(ek["codes0"], ek["norm0"], ck.segments[0].levels, T, D, mx.float32)
        codes, _ = K.encode_rotated(yr, seg.levels, seg.edges)
    np.testing.assert_array_equal(np.array(codes), np.array(seg.encode(yr, mx.float16)["codes"]))
    _check(got, _ref_partial(q, ck, cv, ek, ev, T))
    np.testing.assert_array_equal(np.array(y), np.array(ck.segment_values(ek))[:, :, :T])


def test_clang_build(emu_module, monkeypatch):
    if shutil.which("clang++-19") is None:
        pytest.skip("clang++-19 is not installed")
    monkeypatch.setattr(emu_module.kernel, "CXX", "clang++-19")
    D, G, T, kb, vb = 80, 3, 70, 3, 2
    ck, cv, ek, ev = _coded(1, 2, T, D, kb, vb, seed=5)
    q = ck.rotate_query(mx.random.normal((1, 2, G, D)))
    with emulated():
        got = _run_decode(ck, cv, ek, ev, q, T)  # single pass: the decode kernel only
    _check(got, _ref_partial(q, ck, cv, ek, ev, T))


# ---------------------------------------------------------------------------------------------
# the kernel path against reference_attention on real caches (window, centring, sinks)
# ---------------------------------------------------------------------------------------------
def _cache(config, H, D, L, seed=0, **overrides):
    from tq_mlx.cache import TurboQuantKVCache
    from tq_mlx.config import resolve_config

    c = TurboQuantKVCache(resolve_config(config, **overrides))
    mx.random.seed(seed)
    c.update_and_fetch(mx.random.normal((1, H, L, D)), mx.random.normal((1, H, L, D)))
    return c


def _both(cache, q, scale, mask=None, sinks=None, monkeypatch=None):
    from tq_mlx.attention import attention
    from tq_mlx.reference_attention import reference_attention

    ref = reference_attention(cache, q, scale, mask, sinks)
    monkeypatch.setenv("TQ_MLX_ATTENTION", "metal")
    with emulated():
        got = attention(cache, q, scale, mask, sinks)
    monkeypatch.delenv("TQ_MLX_ATTENTION")
    return np.array(got.astype(mx.float32)), np.array(ref.astype(mx.float32))


@pytest.mark.parametrize(
    "config,D,G,fp_window,sinks",
    [
        ("k4v3", 128, 3, 0, False),
        ("k8v4", 256, 7, 8, True),
        ("k3v2", 80, 3, 4, False),
        (CacheConfig(keys=CodecSpec(bits=4, query_weighting="full"), values=CodecSpec(bits=4)), 64, 3, 4, False),
    ],
)
def test_kernel_path_decode_and_prefill(config, D, G, fp_window, sinks, monkeypatch):
    H, L = 2, 37
    scale = D**-0.5
    cache = _cache(config, H, D, L, seed=D, fp_window=fp_window)
    sk = mx.random.normal((H * G,)) if sinks else None
    # prefill (L > 1, causal): dequantized rotated fp16 q/k/v through mx.fast.scaled_dot_product_attention
    q = mx.random.normal((1, H * G, L, D))
    got, ref = _both(cache, q, scale, "causal", sk, monkeypatch)  # float32 queries: float32 rotated K/V
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    got, ref = _both(cache, q.astype(mx.float16), scale, "causal", sk, monkeypatch)  # float16 rotated K/V
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-2 * np.abs(ref).max())
    # decode steps on top
    for _ in range(2):
        cache.update_and_fetch(mx.random.normal((1, H, 1, D)), mx.random.normal((1, H, 1, D)))
        q = mx.random.normal((1, H * G, 1, D))
        got, ref = _both(cache, q, scale, None, sk, monkeypatch)
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * np.abs(ref).max())


def test_kernel_path_falls_back_for_unsupported_formats(monkeypatch, caplog):
    from tq_mlx import attention
    from tq_mlx.reference_attention import reference_attention

    cache = _cache("2.5", 2, 128, 40)  # outlier split: two segments
    q = mx.random.normal((1, 2, 1, 128))
    with caplog.at_level(logging.INFO, logger="tq_mlx"):
        got, ref = _both(cache, q, 0.1, None, None, monkeypatch)
    np.testing.assert_array_equal(got, ref)
    assert "segments" in attention.unsupported_reason(cache, q, None)
    assert any("segments" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv("TQ_MLX_ATTENTION", "reference")
    cache.update_and_fetch(mx.random.normal((1, 2, 1, 128)), mx.random.normal((1, 2, 1, 128)))
    np.testing.assert_array_equal(
        np.array(attention.attention(cache, q, 0.1)), np.array(reference_attention(cache, q, 0.1))
    )


def test_no_recompile_per_step():
    """Token counts travel as a runtime input: one kernel object, no template value depends on T."""
    src = K.source("tq_decode")
    assert "params[0]" in src and "T>" not in src


@pytest.mark.model
def test_smollm2_decode_on_the_kernel_path_matches_the_reference(smol, monkeypatch):
    """Teacher-forced (no greedy near-ties): a prefill chunk, then one decode step per token.

    The two paths sum in different orders, and a last-bit difference can move a coordinate across a
    decision edge in a later layer; at 8 bits that moves it by one small step, so the next-token
    distributions agree to a KL far below any real error (a wrong kernel gives KL >> 0.01)."""
    import tq_mlx

    model, tok = smol
    ids = tok.encode("The capital of France is Paris, and the capital of Italy is Rome.")

    def log_probs(mode):
        monkeypatch.setenv("TQ_MLX_ATTENTION", mode)
        cache = tq_mlx.make_prompt_cache(model, "k8v8")
        out = [model(mx.array(ids[:6])[None], cache=cache)[0, -1]]
        out += [model(mx.array([[t]]), cache=cache)[0, -1] for t in ids[6:]]
        lp = mx.stack(out).astype(mx.float32)
        return lp - mx.logsumexp(lp, axis=-1, keepdims=True)

    calls = []
    decode = K.decode_attention
    monkeypatch.setattr(K, "decode_attention", lambda *a, **kw: calls.append(1) or decode(*a, **kw))
    ref = log_probs("reference")
    assert not calls
    # races are checked per kernel above; here one schedule keeps 30 layers x the decode steps quick
    with emulated(check_races=False):
        got = log_probs("metal")
    assert len(calls) == 30 * (len(ids) - 6)  # every layer's decode step went through the kernel
    kl = mx.sum(mx.exp(ref) * (ref - got), axis=-1)
    assert float(kl.max().item()) < 2e-3, np.array(kl)


@pytest.mark.parametrize("D,bits,T", [(80, 3, 70), (128, 4, 33)])
def test_encode_kernel(D, bits, T):
    """Packed codes and norms as Segment.encode makes them (rows 140 and 66: partial last threadgroup)."""
    codec = TurboQuant(D, 2, bits, seed=bits)
    mx.random.seed(D)
    y = codec.rotation.forward(mx.random.normal((1, 2, T, D)))
    seg = codec.segments[0]
    ref = seg.encode(y, mx.float16)
    with emulated():
        codes, norm = K.encode_rotated(y, seg.levels, seg.edges, mx.float16, seg.norm_correction)
    # a coordinate sitting on a decision edge may round to the other side (norms summed in another order)
    from tq_mlx.packing import unpack

    got_idx, ref_idx = np.array(unpack(codes, bits, D)), np.array(unpack(ref["codes"], bits, D))
    assert (got_idx != ref_idx).mean() < 1e-3 and np.abs(got_idx.astype(int) - ref_idx).max() <= 1
    np.testing.assert_allclose(np.array(norm.astype(mx.float32)), np.array(ref["norm"].astype(mx.float32)), rtol=1e-3)


def test_cache_encodes_through_the_kernel_when_kernels_are_enabled(monkeypatch):
    from tq_mlx import TurboQuantKVCache, resolve_config
    from tq_mlx.packing import unpack

    calls = []
    real = K.encode_rotated
    monkeypatch.setattr(K, "encode_rotated", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    k = mx.random.normal((1, 2, 40, 64), key=mx.random.key(0))
    v = mx.random.normal((1, 2, 40, 64), key=mx.random.key(1))
    cfg = resolve_config("k4v3", fp_sink=0)
    ref = TurboQuantKVCache(cfg)
    ref.update_and_fetch(k, v)
    ref.prepare_attention(mx.ones((1, 2, 3, 64)))
    monkeypatch.setenv("TQ_MLX_ATTENTION", "metal")
    with emulated():
        got = TurboQuantKVCache(cfg)
        got.update_and_fetch(k, v)
        got.prepare_attention(mx.ones((1, 2, 3, 64)))
        mx.eval(got.codes.view())
    assert len(calls) == 2  # keys and values
    for name, bits in (("k_codes0", 4), ("v_codes0", 3)):
        a = np.array(unpack(got.codes.view()[name], bits, 64))
        b = np.array(unpack(ref.codes.view()[name], bits, 64))
        assert (a != b).mean() < 1e-3

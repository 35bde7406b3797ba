"""tq_mlx's caches on every mlx-lm architecture: refused at make_prompt_cache, or as good as mlx-lm's cache.

Each architecture of mlx-lm 0.32.2 (tests/arch_configs.py: a tiny config each) is built with random float32
weights and fed the same 28 tokens (24 prompt tokens in one call and, separately, in two chunks of 12; then
4 decode steps) with mlx-lm's own cache and with `tq_mlx.make_prompt_cache(model, preset, quant_start=0)`
(tests/arch_sweep.py). Every call's logits are compared:
- "fp16" must give mlx-lm's logits within what rounding K/V to float16 changes (a control: mlx-lm's cache
  with K/V rounded to fp16 as they are written);
- "k8v8" must be as close as an 8-bit control (mlx-lm's cache with K/V rounded to 8-bit affine codes, as its
  QuantizedKVCache(bits=8) holds them);
- every KV cache mlx-lm would use must become a TurboQuant cache.
A model make_prompt_cache refuses (ValueError / NotImplementedError) passes: refused is acceptable, a
crash or a wrong answer is not. The full list is marked slow; DOZEN (arch_configs.py) always runs.
"""

import mlx.core as mx
import pytest
from arch_configs import ARCH_CONFIGS, DOZEN, METAL_ONLY, SKIPPED, SLIDING, module_name
from arch_sweep import SCHEDULES, Refused, Sweep, bound, is_kv, leaves, max_error, round_8bit, rounded, run
from mlx_lm.models import cache as mlx_cache

import tq_mlx


def _param(arch):
    marks = [] if arch in DOZEN else [pytest.mark.slow]
    if module_name(arch) in METAL_ONLY:
        marks.append(pytest.mark.skipif(not mx.metal.is_available(), reason=METAL_ONLY[module_name(arch)]))
    return pytest.param(arch, marks=marks, id=arch)


ARCHS = [_param(a) for a in sorted(ARCH_CONFIGS)] + [
    pytest.param(m, marks=[pytest.mark.slow, pytest.mark.skip(reason=why)], id=m) for m, why in SKIPPED.items()
]


@pytest.fixture(scope="module", params=ARCHS)
def sweep(request):
    """The architecture's model and mlx-lm's reference runs, built once for the tests below."""
    return Sweep(request.param)


@pytest.mark.parametrize("sched", SCHEDULES)
@pytest.mark.parametrize("preset", ["fp16", "k8v8", "k8v8-static"])
def test_tq_cache_is_refused_or_as_close_to_mlx_lm_as_its_rounding_control(sweep, preset, sched):
    got = sweep.tq_run(preset, sched)  # a crash in a forward call fails the test here
    if isinstance(got, Refused):
        assert got.message.strip()
        return
    problem = sweep.check(preset, sched, got)
    assert problem is None, problem


@pytest.fixture(scope="module", params=[_param(a) for a in SLIDING])
def sliding_sweep(request):
    return Sweep(request.param)


@pytest.mark.parametrize("sched", SCHEDULES)
def test_keeping_sliding_layers_uncompressed_never_changes_results(sliding_sweep, sched):
    """quantize_sliding=False: sliding-window and chunked layers keep mlx-lm's cache, the rest is k8v8."""
    got = sliding_sweep.tq_run("k8v8", sched, quantize_sliding=False)
    if isinstance(got, Refused):
        assert got.message.strip()
        return
    problem = sliding_sweep.check("k8v8", sched, got)
    assert problem is None, problem


def test_the_sliding_list_names_exactly_the_models_with_sliding_or_chunked_layers(sweep):
    kinds = {type(c) for c in leaves(sweep.mlx_cache())}
    has = bool(kinds & {mlx_cache.RotatingKVCache, mlx_cache.ChunkedKVCache})
    assert has == (sweep.arch in SLIDING), f"{sweep.arch}: fix SLIDING in arch_configs.py"


def test_every_kv_cache_of_the_model_is_compressed_or_the_model_refused(sweep):
    cache = sweep.tq_cache("k8v8")
    if isinstance(cache, Refused):
        return
    kv = [type(c).__name__ for c in leaves(sweep.mlx_cache()) if is_kv(c)]
    left = [type(c).__name__ for c in leaves(cache) if is_kv(c) and not isinstance(c, tq_mlx.TurboQuantKVCache)]
    assert not left, f"{sweep.arch}: {len(left)} of mlx-lm's {len(kv)} KV caches stay uncompressed: {left}"


# ---- the harness's own checks --------------------------------------------------------------------------------
def test_the_8bit_control_is_what_mlx_lm_quantized_kv_cache_computes():
    sw = Sweep("llama")
    n = len(sw.model.layers)
    for sched in SCHEDULES:
        quantized = [mlx_cache.QuantizedKVCache(group_size=32, bits=8) for _ in range(n)]
        got = run(sw.model, quantized, "llama", sched)
        # the same codes; only the arithmetic differs (quantized matmul vs SDPA on dequantized K/V): measured
        # 8e-7 apart, against 1.4e-2 between either and mlx-lm's fp cache
        assert max_error(got, sw.refs["8bit-control", sched]) < 0.01 * sw.control_error("k8v8", sched)


def test_the_bound_rejects_a_cache_that_forgets_the_prompt():
    """What KV-shared or bypassing layers do with a TurboQuant cache: attend to the new tokens only."""

    class NewTokensOnly(mlx_cache.KVCache):
        def update_and_fetch(self, keys, values):
            super().update_and_fetch(keys, values)
            return keys, values

    sw = Sweep("llama")
    got = run(sw.model, [NewTokensOnly() for _ in sw.model.layers], "llama", "two-chunks")
    for preset in ("fp16", "k8v8"):
        assert sw.check(preset, "two-chunks", got) is not None
        assert sw.error(got, "two-chunks") > 10 * bound(preset, sw.control_error(preset, "two-chunks"), sw.scale)


def test_the_controls_round_every_kv_cache_inside_a_cache_list():
    model = Sweep("baichuan_m1").model
    caches = rounded(mlx_cache.make_prompt_cache(model), round_8bit)
    kv = [c for c in leaves(caches) if is_kv(c)]
    assert len(kv) == 2 and all(type(c).__name__.startswith("Rounded") for c in kv)

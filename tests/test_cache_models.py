"""TurboQuantKVCache inside mlx-lm's own generate, on the bundled real models.

Greedy texts are compared exactly only up to the fp cache's first near-tie (lm_checks), so
the tests hold on any CPU and BLAS; beyond it, teacher-forced KL and top-1 agreement.
"""

import pytest
from lm_checks import clear_prefix, greedy, kl_and_top1, teacher_forced
from mlx_lm import generate, stream_generate
from mlx_lm.models.cache import RotatingKVCache, save_prompt_cache, trim_prompt_cache
from mlx_lm.models.cache import make_prompt_cache as mlx_make_cache

import tq_mlx
from tq_mlx.bench import texts
from tq_mlx.bench.quality import compare, log_probs_with_cache

pytestmark = pytest.mark.model
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):"]
# k4v4 over 512 tokens of Persuasion (from char 20000, chunks of 256) measured 0.026 mean KL
# (mlx-lm's affine 4-bit cache: 0.164 on the same tokens); the bound leaves room for BLAS noise.
K4V4_KL_BOUND = 0.035


@pytest.mark.parametrize("prompt", PROMPTS)
def test_k8v8_greedy_matches_fp_cache_while_the_choice_is_clear(smol, prompt):
    model, tok = smol
    ids = tok.encode(prompt)
    want, margins = greedy(model, ids, mlx_make_cache(model), 32)
    got, _ = greedy(model, ids, tq_mlx.make_prompt_cache(model, "k8v8"), 32)
    clear = clear_prefix(want, margins)
    assert got[: len(clear)] == clear
    # the whole continuation, teacher-forced: the same next-token distributions
    kl, top1 = kl_and_top1(
        teacher_forced(model, ids + want, mlx_make_cache(model)),
        teacher_forced(model, ids + want, tq_mlx.make_prompt_cache(model, "k8v8")),
    )
    assert kl < 2e-3 and top1 >= 0.9


def test_generate_accepts_the_cache_as_prompt_cache(smol):
    model, tok = smol
    text = generate(
        model, tok, "The capital of France is", max_tokens=4, prompt_cache=tq_mlx.make_prompt_cache(model, "k4v3")
    )
    assert "Paris" in text


def test_k4v4_kl_to_fp_cache_is_small_on_real_text(smol):
    model, tok = smol
    ids = tok.encode(texts.read("persuasion")[20000:40000])[:512]
    ref = log_probs_with_cache(model, ids, mlx_make_cache(model))
    got = compare(ref, log_probs_with_cache(model, ids, tq_mlx.make_prompt_cache(model, "k4v4")), ids)
    assert got["kl_mean"] < K4V4_KL_BOUND
    assert got["top1"] > 0.85


def test_save_and_reload_continues_exactly(smol, tmp_path):
    model, tok = smol
    ids = tok.encode(PROMPTS[1])
    want, _ = greedy(model, ids, tq_mlx.make_prompt_cache(model, "k4v3"), 16)
    cache = tq_mlx.make_prompt_cache(model, "k4v3")
    first, _ = greedy(model, ids, cache, 8)
    trim_prompt_cache(cache, cache[0].offset - (len(ids) + 7))  # generate_step ran one token ahead
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
    loaded = tq_mlx.load_prompt_cache(tmp_path / "c.safetensors", model=model, config="k4v3")
    assert all(type(a) is type(b) for a, b in zip(cache, loaded))
    rest, _ = greedy(model, first[-1:], loaded, 8)
    assert first + rest == want  # the same computations in the same process: bit-identical


def test_reload_with_another_config_is_refused(smol, tmp_path):
    model, tok = smol
    cache = tq_mlx.make_prompt_cache(model, "k4v3")
    greedy(model, tok.encode(PROMPTS[0]), cache, 2)
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
    with pytest.raises(tq_mlx.CacheStateError, match="k4v3"):
        tq_mlx.load_prompt_cache(tmp_path / "c.safetensors", model=model, config="k8v8")


def test_reload_with_an_equivalent_explicit_config_is_accepted(smol, tmp_path):
    model, tok = smol
    cache = tq_mlx.make_prompt_cache(model, "k4v4")
    greedy(model, tok.encode(PROMPTS[0]), cache, 2)
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
    same = tq_mlx.CacheConfig(keys=tq_mlx.CodecSpec(bits=4, center="rope"), values=tq_mlx.CodecSpec(bits=4))
    assert len(tq_mlx.load_prompt_cache(tmp_path / "c.safetensors", model=model, config=same)) == len(cache)


def test_a_cache_saved_with_the_old_static_k4v4_is_refused_as_k4v4_with_the_name_that_loads_it(smol, tmp_path):
    model, tok = smol
    old = tq_mlx.make_prompt_cache(model, tq_mlx.resolve_config("k4v4-static", name="k4v4"))  # a file of before
    greedy(model, tok.encode(PROMPTS[0]), old, 2)
    save_prompt_cache(str(tmp_path / "c.safetensors"), old)
    with pytest.raises(tq_mlx.CacheStateError, match="config='k4v4-static'"):
        tq_mlx.load_prompt_cache(tmp_path / "c.safetensors", model=model, config="k4v4")
    assert len(tq_mlx.load_prompt_cache(tmp_path / "c.safetensors", model=model, config="k4v4-static")) == len(old)


def test_trim_then_regenerate_matches_a_fresh_run(smol):
    model, tok = smol
    ids = tok.encode("Once upon a time, in a small village, there lived an old baker who")
    cut = 9
    # per-token codes (no data-calibrated centring or weights), so any chunking encodes alike;
    # 8 bits, so float noise between prefill chunk sizes cannot flip a code that matters
    cfg = tq_mlx.CacheConfig(
        keys=tq_mlx.CodecSpec(bits=8, center=False, query_weighting=False),
        values=tq_mlx.CodecSpec(bits=8, center=False),
    )
    want, margins = greedy(model, ids[:cut], tq_mlx.make_prompt_cache(model, cfg), 12)
    cache = tq_mlx.make_prompt_cache(model, cfg)
    greedy(model, ids, cache, 3)  # holds the prompt and the 3 generated tokens
    n = cache[0].offset - (cut - 1)
    assert trim_prompt_cache(cache, n) == n and cache[0].offset == cut - 1
    got, _ = greedy(model, ids[cut - 1 : cut], cache, 12)
    clear = clear_prefix(want, margins)
    assert got[: len(clear)] == clear


def test_speculative_decoding_with_a_draft_model(smol):
    model, tok = smol
    ids = tok.encode(PROMPTS[0])
    want, margins = greedy(model, ids, tq_mlx.make_prompt_cache(model, "k8v8"), 12)
    cache = tq_mlx.make_prompt_cache(model, "k8v8") + tq_mlx.make_prompt_cache(model, "k8v8")
    got = [
        r.token
        for r in stream_generate(
            model, tok, ids, max_tokens=12, draft_model=model, num_draft_tokens=3, prompt_cache=cache
        )
    ]
    clear = clear_prefix(want, margins)
    assert got[: len(clear)] == clear


def test_boundary_layers_stay_bounded_with_max_kv_size(smol):
    model, _ = smol
    cache = tq_mlx.make_prompt_cache(model, "k4v4", max_kv_size=64, boundary_layers=1)
    assert type(cache[0]) is RotatingKVCache and cache[0].max_size == 64
    assert type(cache[-1]) is RotatingKVCache and cache[-1].max_size == 64
    assert all(c.max_size == 64 for c in cache[1:-1])


def test_gemma3_sliding_window_layers_generate_end_to_end(gemma):
    model, tok = gemma
    cache = tq_mlx.make_prompt_cache(model, "k4v4")
    assert sum(isinstance(c, tq_mlx.TurboQuantKVCache) and c.max_size == 512 for c in cache) == 15
    assert sum(isinstance(c, tq_mlx.TurboQuantKVCache) and c.max_size is None for c in cache) == 3
    assert not any(isinstance(c, RotatingKVCache) for c in cache)
    text = generate(model, tok, "The Eiffel Tower is in the city of", max_tokens=6, prompt_cache=cache)
    assert "Paris" in text
    assert all(c.nbytes > 0 for c in cache)

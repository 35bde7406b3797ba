"""TurboQuantKVCache inside mlx-lm's own generate, on the bundled real models."""

from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import generate
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache as mlx_make_cache
from mlx_lm.models.cache import save_prompt_cache, trim_prompt_cache

import tq_mlx
from tq_mlx.bench.quality import compare, log_probs_with_cache
from tq_mlx.models import load

pytestmark = pytest.mark.model
TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "persuasion.txt"
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):"]
# k4v4 over 512 tokens of Persuasion (from char 20000, chunks of 256) measured 0.022 mean KL
# (mlx-lm's affine 4-bit cache: 0.164 on the same tokens); the bound leaves room for BLAS noise.
K4V4_KL_BOUND = 0.035


@pytest.fixture(scope="module")
def smol():
    return load()


def _greedy(model, prompt_ids, cache, n):
    out = []
    for tok, _ in generate_step(mx.array(prompt_ids), model, prompt_cache=cache, max_tokens=n):
        out.append(int(tok))
    return out


@pytest.mark.parametrize("prompt", PROMPTS)
def test_k8v8_greedy_matches_fp_cache_for_32_tokens(smol, prompt):
    model, tok = smol
    ids = tok.encode(prompt)
    want = _greedy(model, ids, mlx_make_cache(model), 32)
    assert _greedy(model, ids, tq_mlx.make_prompt_cache(model, "k8v8"), 32) == want


def test_generate_accepts_the_cache_as_prompt_cache(smol):
    model, tok = smol
    text = generate(model, tok, "The capital of France is", max_tokens=4,
                    prompt_cache=tq_mlx.make_prompt_cache(model, "k4v3"))
    assert "Paris" in text


@pytest.mark.skipif(not TEXT.exists(), reason="shared/data/persuasion.txt is not next to the checkout")
def test_k4v4_kl_to_fp_cache_is_small_on_real_text(smol):
    model, tok = smol
    ids = tok.encode(TEXT.read_text()[20000:40000])[:512]
    ref = log_probs_with_cache(model, ids, mlx_make_cache(model))
    got = compare(ref, log_probs_with_cache(model, ids, tq_mlx.make_prompt_cache(model, "k4v4")), ids)
    assert got["kl_mean"] < K4V4_KL_BOUND
    assert got["top1"] > 0.85


def test_save_and_reload_continues_exactly(smol, tmp_path):
    model, tok = smol
    ids = tok.encode(PROMPTS[1])
    want = _greedy(model, ids, tq_mlx.make_prompt_cache(model, "k4v3"), 16)
    cache = tq_mlx.make_prompt_cache(model, "k4v3")
    first = _greedy(model, ids, cache, 8)
    trim_prompt_cache(cache, cache[0].offset - (len(ids) + 7))  # generate_step ran one token ahead
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
    loaded = tq_mlx.load_prompt_cache(tmp_path / "c.safetensors", model=model, config="k4v3")
    assert all(type(a) is type(b) for a, b in zip(cache, loaded))
    rest = _greedy(model, first[-1:], loaded, 8)
    assert first + rest == want


def test_reload_with_another_config_is_refused(smol, tmp_path):
    model, tok = smol
    cache = tq_mlx.make_prompt_cache(model, "k4v3")
    _greedy(model, tok.encode(PROMPTS[0]), cache, 2)
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
    with pytest.raises(tq_mlx.CacheStateError, match="k4v3"):
        tq_mlx.load_prompt_cache(tmp_path / "c.safetensors", model=model, config="k8v8")


def test_trim_then_regenerate_matches_a_fresh_run(smol):
    model, tok = smol
    ids = tok.encode("Once upon a time, in a small village, there lived an old baker who")
    cut = 9
    # per-token codes (no data-calibrated centring or weights), so any chunking encodes alike;
    # 8 bits, so float noise between prefill chunk sizes cannot flip a code that matters
    cfg = tq_mlx.CacheConfig(keys=tq_mlx.CodecSpec(bits=8, center=False, query_weighting=False),
                             values=tq_mlx.CodecSpec(bits=8, center=False))
    want = _greedy(model, ids[:cut], tq_mlx.make_prompt_cache(model, cfg), 12)
    cache = tq_mlx.make_prompt_cache(model, cfg)
    _greedy(model, ids, cache, 3)  # holds the prompt and the 3 generated tokens
    n = cache[0].offset - (cut - 1)
    assert trim_prompt_cache(cache, n) == n and cache[0].offset == cut - 1
    assert _greedy(model, ids[cut - 1 : cut], cache, 12) == want


def test_speculative_decoding_with_a_draft_model(smol):
    model, tok = smol
    prompt = PROMPTS[0]
    want = generate(model, tok, prompt, max_tokens=12, prompt_cache=tq_mlx.make_prompt_cache(model, "k8v8"))
    cache = tq_mlx.make_prompt_cache(model, "k8v8") + tq_mlx.make_prompt_cache(model, "k8v8")
    got = generate(model, tok, prompt, max_tokens=12, draft_model=model, num_draft_tokens=3, prompt_cache=cache)
    assert got == want


def test_gemma3_sliding_window_layers_generate_end_to_end():
    model, tok = load("gemma3-270m")
    cache = tq_mlx.make_prompt_cache(model, "k4v4")
    assert sum(isinstance(c, tq_mlx.TurboQuantKVCache) and c.max_size == 512 for c in cache) == 15
    assert sum(isinstance(c, tq_mlx.TurboQuantKVCache) and c.max_size is None for c in cache) == 3
    assert not any(isinstance(c, RotatingKVCache) for c in cache)
    text = generate(model, tok, "The Eiffel Tower is in the city of", max_tokens=6, prompt_cache=cache)
    assert "Paris" in text
    assert all(c.nbytes > 0 for c in cache)

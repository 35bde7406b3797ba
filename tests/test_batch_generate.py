"""mlx-lm's batch_generate on TurboQuant caches, unchanged: per prompt, the greedy tokens of a single run.

quant_start=16 makes every prompt's cache calibrate and attend on codes within the test's few tokens: the
1-token prompt calibrates during decode, the 64-token one at prefill, so the batch holds rows in every
phase at once.  Batched matmuls may sum in another order than single ones (on other back-ends), so the
tokens must agree up to the single run's first near-tie (top-2 logit margin < 1e-3), and the batch must get
that far; on this CPU they agree exactly."""

import mlx.core as mx
import pytest
from mlx_lm import batch_generate
from mlx_lm.generate import generate_step

import tq_mlx

TEXTS = [
    "Hi",
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who every morning " * 3,
    "List three colours:",
]
N = 12


def make_cache(model):
    return tq_mlx.make_prompt_cache(model, "k4v4", quant_start=16)


def single_run(model, tokenizer, prompt):
    """(the greedy tokens of the prompt alone, cut before the first near-tie; whether one was met)."""
    out = []
    steps = generate_step(mx.array(prompt), model, prompt_cache=make_cache(model), max_tokens=N)
    for (t, logprobs), _ in zip(steps, range(N)):
        top2 = mx.topk(logprobs, 2)
        if (top2.max() - top2.min()).item() < 1e-3:
            return out, True
        if t in tokenizer.eos_token_ids:
            break
        out.append(t)
    return out, False


@pytest.mark.model
def test_batch_generate_gives_each_prompt_its_single_sequence_greedy_tokens(smol):
    model, tokenizer = smol
    prompts = [tokenizer.encode(t) for t in TEXTS]
    assert sorted(len(p) for p in prompts)[::3] == [1, 64]  # very different lengths
    caches = [make_cache(model) for _ in prompts]
    got = batch_generate(model, tokenizer, prompts, prompt_caches=caches, max_tokens=N, return_token_ids=True)
    for prompt, tokens in zip(prompts, got.token_ids):
        want, tie = single_run(model, tokenizer, prompt)
        assert len(want) >= 4 and (tokens[: len(want)] if tie else tokens) == want

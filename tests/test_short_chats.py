"""Short chats are answered exactly as with mlx-lm's fp cache, with every preset.

The default quant_start (256) keeps tokens as given until the cache holds that many, and attention
on them is the same computation mlx-lm's fp cache does: the next-token log-probabilities along the fp
cache's greedy answer are identical, bit for bit (so every preset gives the fp cache's answer, on
any machine: no near-tie can break the tie differently).
"""

import mlx.core as mx
import pytest
from lm_checks import greedy
from mlx_lm.models.cache import make_prompt_cache as mlx_make_cache

import tq_mlx

pytestmark = pytest.mark.model

QUESTIONS = [
    "What is the capital of France?",
    "What is the capital of Japan?",
    "How many days are in a week?",
    "What colour is the sky on a clear day?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in the solar system?",
    "What is 2 + 2?",
    "What language is spoken in Brazil?",
    "What is the boiling point of water in Celsius?",
    "Which animal is known as the king of the jungle?",
]
ANSWER_TOKENS = 12


def _log_probs(model, ids, cache, decode=2):
    """Log-probs at every position: a prefill, then `decode` one-token steps (both paths exercised)."""
    cut = len(ids) - decode
    out = [model(mx.array(ids[:cut])[None], cache=cache)[0]]
    out += [model(mx.array([[t]]), cache=cache)[0] for t in ids[cut:]]
    return mx.concatenate(out, axis=0)


@pytest.fixture(scope="module")
def conversations(smol):
    """(question, prompt + the fp cache's greedy answer, the fp cache's log-probs along it) per question."""
    model, tok = smol
    out = []
    for q in QUESTIONS:
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        answer, _ = greedy(model, prompt, mlx_make_cache(model), ANSWER_TOKENS)
        ids = prompt + answer
        out.append((q, ids, _log_probs(model, ids, mlx_make_cache(model))))
    return out


def test_the_questions_are_short_chats(conversations):
    assert len(conversations) >= 10 and all(len(ids) < 256 for _, ids, _ in conversations)


@pytest.mark.parametrize("preset", ["auto", *tq_mlx.PRESETS])
def test_every_preset_answers_short_questions_as_the_fp_cache_does(smol, conversations, preset):
    model, _ = smol
    for question, ids, want in conversations:
        got = _log_probs(model, ids, tq_mlx.make_prompt_cache(model, preset))
        assert mx.array_equal(got, want), f"{preset}: {question}"

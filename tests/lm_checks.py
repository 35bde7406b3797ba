"""Comparisons of a cache against the fp cache on a real model that hold on any CPU and BLAS.

Greedy tokens are compared exactly only while the fp cache's choice is clear (its top-2
log-prob margin at least MIN_MARGIN nats): at a near-tie, float noise of another machine
may flip the token, so beyond it the check is teacher-forced KL and top-1 agreement.
"""

import mlx.core as mx
from mlx_lm.generate import generate_step

MIN_MARGIN = 0.05


def greedy(model, prompt_ids, cache, n, **kw):
    """(tokens, margins): n greedy tokens and, per step, the top-2 log-prob margin."""
    toks, margins = [], []
    for tok, lp in generate_step(mx.array(prompt_ids), model, prompt_cache=cache, max_tokens=n, **kw):
        top2 = mx.topk(lp.reshape(-1), 2)
        toks.append(int(tok))
        margins.append(float(mx.abs(top2[1] - top2[0]).item()))
    return toks, margins


def clear_prefix(tokens, margins, min_margin=MIN_MARGIN):
    """The tokens up to the first near-tie (exclusive): what any machine must reproduce exactly."""
    n = next((i for i, m in enumerate(margins) if m < min_margin), len(tokens))
    return tokens[:n]


def teacher_forced(model, ids, cache, chunk=256):
    """Log-probs (T, vocab) float32 of the model on ids with `cache`."""
    from tq_mlx.bench.quality import log_probs_with_cache

    return log_probs_with_cache(model, ids, cache, chunk)


def kl_and_top1(ref_lp, lp):
    """(mean KL(ref || lp), top-1 agreement) over positions."""
    kl = mx.sum(mx.exp(ref_lp) * (ref_lp - lp), axis=-1).mean().item()
    top1 = (mx.argmax(ref_lp, -1) == mx.argmax(lp, -1)).astype(mx.float32).mean().item()
    return kl, top1

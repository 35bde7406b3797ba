"""Quality of a cache against the fp cache: next-token logits over real text.

`log_probs_with_cache` feeds tokens in chunks through a model with a given cache
(so later chunks attend to earlier, stored - possibly quantized - tokens) and
returns float32 log-probabilities.  `compare` gives mean KL(fp || cache),
top-1 agreement and perplexity.  `make_cache` builds any cache the benchmarks
compare by name; `run` is the `tq-bench quality` sweep.
"""

import mlx.core as mx
from mlx_lm.models import cache as mlx_cache

import tq_mlx

from . import report, texts

AFFINE = {"affine8": 8, "affine4": 4, "affine3": 3, "affine2": 2}
BASELINES = ["fp", *AFFINE]


def log_prob_chunks(model, tokens, cache, chunk: int = 256):
    """Log-softmax of the model's next-token logits, chunk by chunk as the model is fed: (n, vocab) float32 each.

    tokens: 1-D list or mx.array of token ids; cache: a prompt-cache list (fresh).
    """
    tokens = mx.array(tokens).reshape(1, -1)
    for s in range(0, tokens.shape[1], chunk):
        logits = model(tokens[:, s : s + chunk], cache=cache).astype(mx.float32)[0]
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mx.eval(lp)
        yield lp


def log_probs_with_cache(model, tokens, cache, chunk: int = 256) -> mx.array:
    """Log-softmax of the model's next-token logits for every position: (T, vocab) float32."""
    return mx.concatenate(list(log_prob_chunks(model, tokens, cache, chunk)), axis=0)


def compare(ref_lp: mx.array, lp: mx.array, tokens, coded_from: int = 0) -> dict:
    """mean KL(ref || lp), also over the positions from `coded_from` on (kl_coded: a cache's first quant_start
    positions are exact), top-1 agreement, and perplexity of `lp` on the next tokens."""
    return compare_chunks([ref_lp], [lp], tokens, coded_from)


def compare_chunks(ref_chunks, lp_chunks, tokens, coded_from: int = 0) -> dict:
    """`compare` on log-probs that come in chunks (lp_chunks may be a generator): only per-position figures are
    kept, so a long context never holds a second (T, vocab) array (Gemma-3 at 4096 tokens: 4.3 GB each)."""
    tokens = mx.array(tokens).reshape(-1)
    kl, agree, nll, start = [], [], [], 0
    for ref, lp in zip(ref_chunks, lp_chunks):
        n = ref.shape[0]
        nxt = tokens[start + 1 : start + n + 1]  # the next token of each position (the last has none)
        kl.append(mx.sum(mx.exp(ref) * (ref - lp), axis=-1))
        agree.append((mx.argmax(ref, axis=-1) == mx.argmax(lp, axis=-1)).astype(mx.float32))
        nll.append(-mx.take_along_axis(lp[: nxt.shape[0]], nxt[:, None], axis=-1)[:, 0])
        mx.eval(kl[-1], agree[-1], nll[-1])
        start += n
    kl, agree, nll = (mx.concatenate(a) for a in (kl, agree, nll))
    coded = kl[min(coded_from, kl.shape[0] - 1) :]
    return {
        "kl_mean": float(mx.mean(kl).item()),
        "kl_max": float(mx.max(kl).item()),
        "kl_coded": float(mx.mean(coded).item()),
        "top1": float(mx.mean(agree).item()),
        "ppl": float(mx.exp(mx.mean(nll)).item()),
    }


# ---- caches by name ----------------------------------------------------
def make_cache(model, name: str, **overrides):
    """A prompt-cache list: "fp" (mlx-lm's own), "affine8/4/3/2" (mlx-lm QuantizedKVCache, group 64,
    on the plain KVCache layers; sliding-window layers stay fp as in mlx-lm), or a tq_mlx preset."""
    if name == "fp":
        return mlx_cache.make_prompt_cache(model)
    if name in AFFINE:
        base = mlx_cache.make_prompt_cache(model)
        return [
            mlx_cache.QuantizedKVCache(group_size=64, bits=AFFINE[name]) if type(c) is mlx_cache.KVCache else c
            for c in base
        ]
    return tq_mlx.make_prompt_cache(model, name, **overrides)


def kv_dims(model):
    """(n_kv_heads, head_dim) of the model's attention layers."""
    a = model.args
    h = getattr(a, "num_key_value_heads", None) or a.num_attention_heads
    d = getattr(a, "head_dim", None) or a.hidden_size // a.num_attention_heads
    return int(h), int(d)


def held(c) -> int:
    """Tokens a layer's cache holds."""
    if isinstance(c, tq_mlx.TurboQuantKVCache):
        return c.held()
    k = c.keys[0] if isinstance(c.keys, (tuple, list)) else c.keys
    return 0 if k is None else min(c.offset, k.shape[2])


def _layer_bytes(c, fp_bytes: int) -> int:
    """Bytes one layer holds; mlx-lm fp layers counted at fp_bytes per element, affine scales at fp16."""
    n = held(c)
    if isinstance(c, tq_mlx.TurboQuantKVCache):
        return c.nbytes
    if isinstance(c, mlx_cache.QuantizedKVCache):
        if c.keys is None:
            return 0
        words = c.keys[0].shape[-1] + c.values[0].shape[-1]
        groups = c.keys[1].shape[-1] + c.values[1].shape[-1]
        return n * c.keys[0].shape[1] * (4 * words + 2 * 2 * groups)
    if getattr(c, "keys", None) is None:
        return 0
    return n * c.keys.shape[1] * (c.keys.shape[-1] + c.values.shape[-1]) * fp_bytes


def cache_bits(cache, fp_bytes: int = 2) -> dict:
    """Whole-cache bits per stored K/V element after a run: every layer, side data and capacity slack
    of our caches included; mlx-lm fp layers counted as fp16 and affine scales/biases as fp16."""
    total = sum(_layer_bytes(c, fp_bytes) for c in cache)
    total += tq_mlx.cache_nbytes(cache) - sum(c.nbytes for c in cache)  # constants the layers share, once
    elems = 0
    for c in cache:
        if isinstance(c, tq_mlx.TurboQuantKVCache) and c.shape:
            elems += held(c) * c.shape[1] * (c.shape[2] + c.shape[3])
        elif isinstance(c, mlx_cache.QuantizedKVCache) and c.keys is not None:
            elems += held(c) * c.keys[0].shape[1] * 2 * c.keys[0].shape[-1] * 32 // c.bits
        elif getattr(c, "keys", None) is not None:
            elems += held(c) * c.keys.shape[1] * (c.keys.shape[-1] + c.values.shape[-1])
    return {"cache_bytes": int(total), "bpe_model": 8 * total / max(elems, 1)}


def settle(c, hq: int = None):
    """After a direct update_and_fetch: one attention call with random queries, as a model would make, so the
    cache calibrates (on queries for every position it holds, the first quant_start among them) and encodes."""
    if isinstance(c, tq_mlx.TurboQuantKVCache):
        from tq_mlx.attention import attention

        _, h, dk, _ = c.shape
        n = 1 if c.calibrated else min(c.size(), c.offset)
        q = mx.random.normal((1, hq or h, n, dk))
        mx.eval(attention(c, q, dk**-0.5, "causal" if n > 1 else None))
    return c


def marginal_bits(name: str, heads: int, d: int) -> float:
    """Bits per K/V element one more token costs in one quantized layer (codes + norms/scales), measured
    as the nbytes growth from 256 to 512 tokens of fp16 input; 16 for fp."""
    if name == "fp":
        return 16.0
    if name in AFFINE:
        c = mlx_cache.QuantizedKVCache(group_size=64, bits=AFFINE[name])
    else:
        c = tq_mlx.TurboQuantKVCache(name)
    sizes = []
    for n in (256, 256):
        x = mx.random.normal((1, heads, n, d)).astype(mx.float16)
        c.update_and_fetch(x, x)
        settle(c)
        sizes.append(c.nbytes)
    return 8 * (sizes[1] - sizes[0]) / (256 * heads * 2 * d)


# ---- the sweep ------------------------------------------------------------
def text_tokens(tok, path, n: int, offset: int = 20000, bos: bool = False):
    text = texts.resolve(path).read_text(encoding="utf-8", errors="replace")
    if offset >= len(text):
        offset = 0
    ids = list(tok.encode(text[offset : offset + 12 * n + 100]))
    if bos and tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
        ids = [tok.bos_token_id] + ids
    if len(ids) < n:
        raise ValueError(f"{path} gives only {len(ids)} tokens from char {offset}; asked for {n}")
    return ids[:n]


def pareto(rows, x="bpe_marginal", y="kl_mean"):
    """Names on the lower-left front (no other row has both fewer bits and lower KL)."""
    ok = [r for r in rows if r.get(y) is not None and r.get(x) is not None]
    front, best = [], float("inf")
    for r in sorted(ok, key=lambda r: (r[x], r[y])):
        if r[y] < best:
            front.append(r["name"])
            best = r[y]
    return front


def run(model, tokens, names, results, chunk: int = 256, progress=None, **overrides):
    """Quality of every cache in `names` against the fp cache; records go into `results`.
    overrides (e.g. quant_start=0) apply to the tq-mlx presets."""
    from tqdm import tqdm

    heads, d = kv_dims(model)
    coded_from = overrides.get("quant_start", tq_mlx.CacheConfig().quant_start)  # the same positions for every cache
    ref = list(log_prob_chunks(model, tokens, make_cache(model, "fp"), chunk))
    for name in tqdm(names, desc="quality", disable=progress is False):
        if results.done(name):
            continue
        rec = {"name": name}
        try:
            cache = make_cache(model, name, **({} if name in BASELINES else overrides))
            rec.update(compare_chunks(ref, log_prob_chunks(model, tokens, cache, chunk), tokens, coded_from))
            rec.update(cache_bits(cache))
            rec["bpe_marginal"] = marginal_bits(name, heads, d)
            del cache
        except Exception as e:  # a preset that fails (e.g. not importable yet) is recorded, not fatal
            rec["error"] = f"{type(e).__name__}: {e}"[:300]
        results.add(name, rec)
    return results.entries


COLS = ["name", "bpe_marginal", "bpe_model", "kl_mean", "kl_coded", "kl_max", "top1", "ppl", "error"]
HEADERS = [
    "cache",
    "bits/elem (per token)",
    "bits/elem (whole cache)",
    "mean KL",
    "mean KL past quant_start",
    "max KL",
    "top-1",
    "ppl",
    "error",
]


def table(entries) -> str:
    rows = list(entries.values())
    front = set(pareto(rows))
    rows = [{**r, "name": r["name"] + (" *" if r["name"] in front else "")} for r in rows]
    cols = COLS if any(r.get("error") for r in rows) else COLS[:-1]
    return md_table_sorted(rows, cols)


def md_table_sorted(rows, cols):
    rows = sorted(rows, key=lambda r: (r.get("error") is not None, -(r.get("bpe_marginal") or 0)))
    return report.md_table(rows, cols, [HEADERS[COLS.index(c)] for c in cols])


def plot(entries, path, ctx):
    """KL against bits per element (log y), Pareto front marked."""
    plt = report.plt()
    rows = [
        r
        for r in entries.values()
        if r.get("kl_mean") is not None and r.get("bpe_marginal") is not None and r["name"] != "fp"
    ]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        mine = r["name"] not in AFFINE
        ax.scatter(r["bpe_marginal"], max(r["kl_mean"], 1e-6), c="C0" if mine else "C1", marker="o" if mine else "s")
        ax.annotate(
            r["name"],
            (r["bpe_marginal"], max(r["kl_mean"], 1e-6)),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    front = [r for r in sorted(rows, key=lambda r: r["bpe_marginal"]) if r["name"] in pareto(rows)]
    if front:
        ax.step(
            [r["bpe_marginal"] for r in front],
            [max(r["kl_mean"], 1e-6) for r in front],
            "k--",
            lw=0.8,
            where="post",
            label="Pareto front",
        )
    ax.scatter([], [], c="C0", marker="o", label="tq-mlx presets")
    ax.scatter([], [], c="C1", marker="s", label="mlx-lm affine (group 64)")
    ax.set_yscale("log")
    ax.set_xlabel("bits per K/V element (marginal per token, norms/scales included)")
    ax.set_ylabel("mean KL(fp || cache), nats")
    ax.set_title(f"Quality vs size: {ctx.get('model')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return report.save_fig(fig, path, ctx)

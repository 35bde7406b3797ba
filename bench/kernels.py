"""Decode attention per layer: launches, bytes and a modelled Mac latency anywhere; measured times on a Mac.

    python -m tq_mlx.bench.kernels [--contexts 1k,4k,16k,32k,64k] [--presets k4v4,k4v3,k8v4] [--out DIR]

For each preset: the launches of one decode step of one layer beyond mlx-lm's fp16 cache (traced, update
and attention together: bench/launches.py), the KV bytes the step reads, the kernel's instructions per
key row (the hand count next to tq_decode), and from these a *modelled* decode-attention latency per layer
for M1..M4 Max-class GPUs against fp16, with the assumptions printed next to it.  On a Metal back-end it
also *measures* the step: fp16 mx.fast.scaled_dot_product_attention, mlx-lm's quantized SDPA at 4 and 8
bits, and the TurboQuant kernels.  Without Metal it says so, and measures nothing it would label Metal.
Writes JSON, markdown and a PNG into --out.
"""

import argparse
import time
from pathlib import Path

import mlx.core as mx

from . import report
from .launches import fp_cache_launches, trace_step
from .memory import stand_in_rope

# M-series Max-class GPUs: (peak GB/s, GPU cores, GPU clock GHz) from Apple's published figures
BATCH, BATCH_CHIP = 8, "M2 Max"  # the batch column: this many sequences decoding together on this chip
BATCH_COL = f"model_ms {BATCH_CHIP} x{BATCH}"
CHIPS = {"M1 Max": (400, 32, 1.30), "M2 Max": (400, 38, 1.40), "M3 Max": (400, 40, 1.40), "M4 Max": (546, 40, 1.58)}
ASSUMPTIONS = {
    "bandwidth_efficiency": 0.8,  # of peak, for a streaming read
    "simd_issue_per_core_per_clock": 4,  # simdgroup instructions (32 lanes) per GPU core and clock
    "launch_us": 3.0,  # per dependent kernel launch on the same queue (the 2-5 us)
    "fp16_sdpa_bandwidth_bound": True,  # MLX's sdpa_vector is modelled at its bandwidth floor only
}


def instructions_per_key_row(D: int, kb: int, vb: int, G: int, k_trellis=False, v_trellis=False, rope=False) -> float:
    """tq_decode's instruction count per key row (per simdgroup step over KPI keys), by the same hand count
    as the comment in metal_kernels/tq_decode.metal (78 at D=128, G=4, 4/4 bits; 87 with trellis codes);
    rope: keys centred before RoPE, with tq_rope_bias's share (79 + 3.4 at D=128, G=4)."""
    nc = D // 8
    lpk = 8 if nc <= 8 else 16 if nc <= 16 else 32
    kpi = 32 // lpk
    gh = 1 if G == 1 else 2 if G == 2 else 4

    def unpack(b, addr, trellis):  # row address, loads (+ a funnel shift across words), 8 codes, lookups, norm
        words = 1 if 8 * b <= 32 else 2
        funnel = 0 if 32 % (8 * b) == 0 or 8 * b == 64 else 6
        windows = 9 if trellis else 0  # previous chunk's bits: shuffle, shift, 3 to join, 4 more to cut
        return addr + words + funnel + 15 + windows + 8 + 2

    stages = gh.bit_length() - 1
    reduce = sum(4 * (gh >> (s + 1)) for s in range(stages)) + 2 * ((lpk // gh).bit_length() - 1)
    scores, accumulate, weights, softmax, loop = 8 * gh, 8 * gh, 2 * gh, 8, 3
    step = unpack(kb, 3, k_trellis) + unpack(vb, 2, v_trellis) + scores + reduce + softmax + weights + accumulate + loop
    return step / kpi + (rope_instructions_per_key_row(D, G, kpi) if rope else 0.0)


def rope_instructions_per_key_row(D: int, G: int, kpi: int, block: int = 16, tile: int = 16) -> float:
    """What keys centred before RoPE add per key row, by the hand counts in metal_kernels/tq_decode.metal and
    tq_rope_bias.metal: in tq_decode a load of the block's term and the step of its index, 2 per step, where
    `block` divides the NSG * KPI positions a lane's key moves per step (else 4: the index from the position);
    in tq_rope_bias per tile of `tile` blocks a phasor thread per pair (two sincos ~60, a complex step and
    stores per block), a sum thread per (head, block) (two loads and two fma per pair) and ~40 to set up."""
    per_step = 2 if (8 * kpi) % block == 0 else 4
    pairs = D // 2
    phasors = -(-pairs // 32) * (60 + 6 * tile)
    sums = -(-(G * tile) // 32) * pairs * 4
    return per_step / kpi + (phasors + sums + 40) / (tile * block)


def step_bytes(preset: str, H: int, D: int, T: int) -> int:
    """KV bytes one decode step reads at T tokens: codes and norms (and the fp16 sink token)."""
    import tq_mlx
    from tq_mlx.packing import packed_words

    cfg = tq_mlx.resolve_config(preset)
    per = 0
    for spec in (cfg.keys, cfg.values):
        per += 4 * packed_words(D, int(spec.bits)) + 2
    return H * (T - cfg.fp_sink) * per + H * cfg.fp_sink * 2 * D * 2


def viterbi_instructions(preset: str, H: int, D: int) -> float:
    """tq_viterbi's simdgroup instructions per decode step (one token per head on average), by the hand count
    in metal_kernels/tq_viterbi.metal: 2 D steps of ~6 x 2^b + 8 per thread, 64 threads (2 simdgroups)."""
    import tq_mlx

    cfg = tq_mlx.resolve_config(preset)
    per = [2 * 2 * D * (6 * 2 ** int(s.bits) + 8) for s in (cfg.keys, cfg.values) if s.grid == "trellis"]
    return H * sum(per)


def modelled_ms(nbytes: int, launches: int, instr: float = 0.0, chip=(400, 38, 1.4)) -> float:
    """max(bandwidth floor, instruction floor) + launches x launch cost, in ms."""
    gbps, cores, ghz = chip
    t_bw = nbytes / (ASSUMPTIONS["bandwidth_efficiency"] * gbps * 1e9)
    t_alu = instr / (cores * ASSUMPTIONS["simd_issue_per_core_per_clock"] * ghz * 1e9)
    return 1e3 * (max(t_bw, t_alu) + launches * ASSUMPTIONS["launch_us"] * 1e-6)


def count_launches(preset: str, H: int, D: int, G: int):
    """(launches of one kernel-path decode step, its CustomKernel count) for a small cache of `preset`.
    A codec that encodes E staged tokens at a time (trellis codes) is counted as the mean over the E steps
    of one cycle after the first (each traced): E - 1 staging steps and the step that encodes."""
    import tq_mlx
    from tq_mlx.attention import attention

    cfg = tq_mlx.resolve_config(preset, quant_start=0)
    cache = tq_mlx.TurboQuantKVCache(cfg, rope=stand_in_rope(cfg, D))
    k = mx.random.normal((1, H, 80, D)).astype(mx.float16)
    cache.update_and_fetch(k, k)
    mx.eval(attention(cache, mx.random.normal((1, H * G, 80, D)).astype(mx.float16), D**-0.5, "causal"))
    q = mx.random.normal((1, H * G, 1, D)).astype(mx.float16)
    x = mx.random.normal((1, H, 1, D)).astype(mx.float16)
    E = cache._block

    def step():
        cache.update_and_fetch(x, x)
        mx.eval(attention(cache, q, D**-0.5))

    if E > 1:  # one cycle of decode steps (the window's buffers then hold one block), to the next cycle's start
        for _ in range(E):
            step()
        while cache.window.length != cache.window_size:
            step()
    for c in (cache.k_codec, cache.v_codec):  # encoded on this CPU; traced steps encode with tq_encode / tq_viterbi
        c.kernel_encode = c.kernel_encodes()
    launches, _ = trace_step(cache, q, x, x, D**-0.5, "metal")
    if E == 1:
        return sum(launches.values()), launches["CustomKernel"]
    total = sum(launches.values())
    for _ in range(E - 1):  # the rest of the cycle: the last step encodes the E staged tokens
        step()
        total += sum(trace_step(cache, q, x, x, D**-0.5, "metal")[0].values())
    return total / E, launches["CustomKernel"]


def _time(fn, repeats):
    mx.eval(fn())
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(fn())
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def measure(T, preset, Hq, H, D, repeats):
    """Measured ms per decode-attention call at T tokens (Metal only): fp16 SDPA, affine 4/8, TurboQuant."""
    from mlx_lm.models.base import quantized_scaled_dot_product_attention

    import tq_mlx
    from tq_mlx.attention import attention

    k = mx.random.normal((1, H, T, D)).astype(mx.float16)
    v = mx.random.normal((1, H, T, D)).astype(mx.float16)
    q = mx.random.normal((1, Hq, 1, D)).astype(mx.float16)
    out = {"fp16": 1e3 * _time(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5), repeats)}
    for bits in (4, 8):
        qk, qv = mx.quantize(k, group_size=64, bits=bits), mx.quantize(v, group_size=64, bits=bits)
        out[f"affine{bits}"] = 1e3 * _time(
            lambda qk=qk, qv=qv, b=bits: quantized_scaled_dot_product_attention(q, qk, qv, D**-0.5, None, 64, b),
            repeats,
        )
    cfg = tq_mlx.resolve_config(preset, quant_start=0)
    cache = tq_mlx.TurboQuantKVCache(cfg, rope=stand_in_rope(cfg, D))
    for s in range(0, T, 4096):
        cache.update_and_fetch(k[:, :, s : s + 4096], v[:, :, s : s + 4096])
        mx.eval(attention(cache, q, D**-0.5))
    out[preset] = 1e3 * _time(lambda: attention(cache, q, D**-0.5), repeats)
    return out


def _ctx_len(s):
    s = s.strip().lower()
    return int(float(s[:-1]) * 1024) if s.endswith("k") else int(s)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--contexts", default="1k,4k,16k,32k,64k", help="context lengths for the model and timings")
    p.add_argument("--presets", default="k4v4,k4v3,k8v4", help="comma-separated TurboQuant presets")
    p.add_argument("--q-heads", type=int, default=32, help="query heads (default: Llama-3-8B)")
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per point (Metal only)")
    p.add_argument("--out", default="tq-bench-results", help="output folder")
    p.add_argument("--tag", default="kernels", help="file name stem")
    args = p.parse_args(argv)
    contexts = [_ctx_len(c) for c in args.contexts.split(",")]
    presets = [s for s in args.presets.split(",") if s]
    Hq, H, D = args.q_heads, args.kv_heads, args.head_dim
    G = Hq // H
    metal = mx.metal.is_available()
    ctx = report.context(
        None, argv, shapes={"q_heads": Hq, "kv_heads": H, "head_dim": D}, assumptions=ASSUMPTIONS, chips=CHIPS
    )
    if not metal:
        print(
            "No Metal back-end here: launches, bytes and instruction counts are counted, latencies are "
            "modelled (not measured); time on a Mac for measured figures."
        )
    rows, per = [], {}
    for preset in presets:
        import tq_mlx

        cfg = tq_mlx.resolve_config(preset)
        n, kernels_n = count_launches(preset, H, D, G)
        trellis = (cfg.keys.grid == "trellis", cfg.values.grid == "trellis")
        rope = stand_in_rope(cfg, D) is not None
        instr = instructions_per_key_row(D, int(cfg.keys.bits), int(cfg.values.bits), G, *trellis, rope=rope)
        per[preset] = {"launches": n, "kernel_launches": kernels_n, "instructions_per_key_row": instr}
    for T in contexts:
        fp_bytes = 2 * H * T * D * 2
        fp_l = fp_cache_launches(T)
        row = {"context": T, "method": "fp16", "launches": fp_l, "extra_launches": 0, "kv_bytes": fp_bytes}
        for chip, spec in CHIPS.items():
            row[f"model_ms {chip}"] = modelled_ms(fp_bytes, fp_l, 0.0, spec)
        row[BATCH_COL] = modelled_ms(BATCH * fp_bytes, fp_l, 0.0, CHIPS[BATCH_CHIP])
        rows.append(row)
        for preset in presets:
            b = step_bytes(preset, H, D, T)
            hg = -(-G // (1 if G == 1 else 2 if G == 2 else 4))
            instr = per[preset]["instructions_per_key_row"] * T * H * hg + viterbi_instructions(preset, H, D)
            row = {
                "context": T,
                "method": preset,
                "launches": per[preset]["launches"],
                "extra_launches": per[preset]["launches"] - fp_l,
                "kv_bytes": b,
                "bytes_vs_fp16": fp_bytes / b,
                "instructions_per_key_row": per[preset]["instructions_per_key_row"],
            }
            for chip, spec in CHIPS.items():
                row[f"model_ms {chip}"] = modelled_ms(b, per[preset]["launches"], instr, spec)
            cfg = tq_mlx.resolve_config(preset)
            if "trellis" not in (cfg.keys.grid, cfg.values.grid):
                row[BATCH_COL] = modelled_ms(BATCH * b, per[preset]["launches"], BATCH * instr, CHIPS[BATCH_CHIP])
            rows.append(row)
        if metal:
            for preset in presets:
                for name, ms in measure(T, preset, Hq, H, D, args.repeats).items():
                    rows.append({"context": T, "method": name, "measured_ms": ms})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = report.Results(out / f"{args.tag}.json", ctx)
    for i, r in enumerate(rows):
        res.add(f"{r['method']}@{r['context']}#{i}", r)
    model_cols = [f"model_ms {c}" for c in CHIPS]
    modelled = [r for r in rows if "launches" in r]
    sections = [
        (
            "Per layer per decode step (launches: update + attention; KV bytes read)",
            report.md_table(
                modelled,
                [
                    "context",
                    "method",
                    "launches",
                    "extra_launches",
                    "kv_bytes",
                    "bytes_vs_fp16",
                    "instructions_per_key_row",
                ],
                [
                    "context",
                    "cache",
                    "launches",
                    "beyond fp16",
                    "KV bytes",
                    "fewer bytes than fp16",
                    "instructions / key row",
                ],
            ),
        ),
        (
            "Modelled, not measured: decode attention per layer, ms (assumptions in the context block)",
            report.md_table(
                modelled,
                ["context", "method", *model_cols, BATCH_COL],
                ["context", "cache", *CHIPS, f"{BATCH_CHIP}, {BATCH} sequences"],
            ),
        ),
    ]
    sections.append(
        (
            "How the model is made",
            "\n".join(
                [f"- {k}: {v}" for k, v in ASSUMPTIONS.items()]
                + [f"- {c}: {bw} GB/s peak, {cores} GPU cores, {ghz} GHz" for c, (bw, cores, ghz) in CHIPS.items()]
                + [
                    "- latency = max(KV bytes / (efficiency x peak bandwidth), key rows x instructions per key row /"
                    " (cores x issue x clock)) + launches x launch cost; fp16 at its bandwidth floor only;",
                    f"- {BATCH} sequences (a batch cache): {BATCH}x the bytes and key rows, the same launches (one "
                    "tq_encode per part, tq_decode and tq_merge for the whole batch); trellis presets do not batch;",
                    "- instructions per key row: the hand count in metal_kernels/tq_decode.metal, not a compiler's;",
                    "- trellis (-tcq) presets: launches are the mean over the 16 steps of a cycle, 15 staging and one"
                    " encoding the 16 staged tokens with the tq_viterbi kernel (K and V); that kernel's instructions"
                    " (hand count) are in the instruction floor, its serial latency (per vector 2 d barrier-separated"
                    " steps and two backtracks, every 16th step) is not modelled;",
                    "- nothing here ran on a Mac unless the 'Measured' table is present.",
                ]
            ),
        )
    )
    measured = [r for r in rows if "measured_ms" in r]
    if measured:
        sections.append(
            (
                "Measured on this Mac: decode attention per layer, ms",
                report.md_table(measured, ["context", "method", "measured_ms"], ["context", "method", "ms"]),
            )
        )
    md = report.write_md(out / f"{args.tag}.md", f"Decode attention per layer: Hq={Hq}, H={H}, d={D}", ctx, sections)
    plt = report.plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    chip = "M2 Max"
    for m in dict.fromkeys(r["method"] for r in modelled):
        pts = [(r["context"], r[f"model_ms {chip}"]) for r in modelled if r["method"] == m]
        ax.plot(*zip(*pts), marker="o", label=f"{m} (modelled)")
    for m in dict.fromkeys(r["method"] for r in measured):
        pts = [(r["context"], r["measured_ms"]) for r in measured if r["method"] == m]
        ax.plot(*zip(*pts), marker="s", linestyle="--", label=f"{m} (measured)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode attention per layer (ms)")
    ax.set_title(
        f"{chip}: modelled{' and measured' if measured else ', not measured'}; Hq={Hq} H={H} d={D}", fontsize=9
    )
    ax.legend(fontsize=7)
    png = report.save_fig(fig, out / f"{args.tag}.png", ctx)
    for line in md.read_text().split("\n## ")[1:3]:
        print("## " + line)
    print(f"wrote {out / (args.tag + '.json')}, {md}, {png}")
    return 0


if __name__ == "__main__":
    main()

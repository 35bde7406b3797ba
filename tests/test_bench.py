"""tq-bench on tiny settings: JSON schema, non-empty PNGs, memory model = nbytes, perplexity check."""

import json

import mlx.core as mx
import pytest

from tq_mlx.bench import cli, quality, report, summary

TEXT = " ".join(
    f"Sentence {i} of the filler says that the weather at the old house was mild and the garden quiet."
    for i in range(120)
)
CTX_KEYS = {"machine", "mlx", "backend", "blas", "model", "command"}


@pytest.fixture
def text(tmp_path):
    p = tmp_path / "filler.txt"
    p.write_text(TEXT)
    return str(p)


def _load(out, stem):
    d = json.loads((out / f"{stem}.json").read_text())
    assert CTX_KEYS <= set(d["context"]), d["context"].keys()
    assert d["context"]["command"].startswith("tq-bench ")
    assert (out / f"{stem}.png").stat().st_size > 1000
    assert (out / f"{stem}.md").read_text().startswith("# ")
    return d["entries"]


def test_memory_config_model_matches_nbytes(tmp_path):
    cfg = {
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_size": 256,
        "head_dim": 64,
        "sliding_window": 256,
        "sliding_window_pattern": 2,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    argv = [
        "memory",
        "--model",
        str(path),
        "--presets",
        "k4v4,k4v3,2.5,k4v4-qjl",
        "--contexts",
        "256,1024",
        "--check-context",
        "700",
        "--out",
        str(out),
        "--tag",
        "mem",
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    e = _load(out, "mem")
    assert set(e) == {"fp", "affine8", "affine4", "k4v4", "k4v3", "2.5", "k4v4-qjl"}
    for r in e.values():
        assert r["match"], r  # the model equals nbytes measured on real caches
        assert set(r["total"]) == {"256", "1024"}
    # sliding layers hold their window: at 1024 tokens the fp cache is (2 * 1024 + 2 * 256) tokens x layer bytes
    assert e["fp"]["total"]["1024"] == (2 * 1024 + 2 * 256) * 2 * 64 * 2 * 2
    # 4.25 bits, in sliding layers too: a ring's slots hold no positions (its layout gives them)
    assert e["k4v4"]["bpe"] == pytest.approx(4.25)
    assert e["k4v4"]["total"]["1024"] < e["affine4"]["total"]["1024"] < e["fp"]["total"]["1024"]
    # boundary layers keep the fp cache
    argv += ["--boundary-layers", "1", "--tag", "mem-b"]
    assert cli.main(argv) == 0
    eb = _load(out, "mem-b")
    assert eb["k4v4"]["match"] and eb["k4v4"]["total"]["1024"] > e["k4v4"]["total"]["1024"]


def test_results_resume(tmp_path):
    r = report.Results(tmp_path / "r.json", {"model": "x"})
    r.add("a", {"v": 1})
    r2 = report.Results(tmp_path / "r.json", {"model": "x"}, resume=True)
    assert r2.done("a") and not r2.done("b")
    assert not report.Results(tmp_path / "r.json", {"model": "x"}).done("a")


def test_context_and_blas_warning():
    ctx = report.context("m", ["speed"])
    assert CTX_KEYS <= set(ctx) and ctx["command"] == "tq-bench speed"
    msg = report.warn_blas() if not ctx["blas"]["openblas_loaded"] else None
    assert msg is None or "LD_PRELOAD" in msg


def test_pareto():
    rows = [
        {"name": "a", "bpe_marginal": 4, "kl_mean": 0.1},
        {"name": "b", "bpe_marginal": 8, "kl_mean": 0.2},
        {"name": "c", "bpe_marginal": 3, "kl_mean": 0.3},
        {"name": "d", "bpe_marginal": 8, "kl_mean": 0.01},
    ]
    assert quality.pareto(rows) == ["c", "a", "d"]


@pytest.mark.model
def test_perplexity_matches_direct(smol):
    model, tok = smol
    ids = list(tok.encode(TEXT))[:48]
    lp = quality.log_probs_with_cache(model, ids, quality.make_cache(model, "fp"), chunk=16)
    ppl = quality.compare(lp, lp, ids)["ppl"]
    logits = model(mx.array(ids)[None])[0].astype(mx.float32)
    nll = mx.logsumexp(logits[:-1], axis=-1) - mx.take_along_axis(logits[:-1], mx.array(ids[1:])[:, None], -1)[:, 0]
    direct = float(mx.exp(mx.mean(nll)).item())
    assert ppl == pytest.approx(direct, rel=1e-3)
    assert quality.compare(lp, lp, ids)["kl_mean"] == pytest.approx(0, abs=1e-6)


def test_kl_past_quant_start_averages_only_the_positions_a_cache_codes():
    def log_softmax(x):
        return x - mx.logsumexp(x, axis=-1, keepdims=True)

    ref = log_softmax(mx.random.normal((10, 5), key=mx.random.key(0)))
    lp = mx.concatenate([ref[:6], log_softmax(mx.random.normal((4, 5), key=mx.random.key(1)))])
    got = quality.compare(ref, lp, list(range(10)), coded_from=6)
    assert got["kl_coded"] > 0 and got["kl_mean"] == pytest.approx(got["kl_coded"] * 4 / 10, rel=1e-5)


def test_log_probs_compared_chunk_by_chunk_equal_the_whole_comparison():
    def log_softmax(x):
        return x - mx.logsumexp(x, axis=-1, keepdims=True)

    ref = log_softmax(mx.random.normal((10, 7), key=mx.random.key(0)))
    lp = log_softmax(mx.random.normal((10, 7), key=mx.random.key(1)))
    ids = [3, 1, 4, 1, 5, 2, 6, 5, 3, 5]
    whole = quality.compare(ref, lp, ids, coded_from=4)
    parts = quality.compare_chunks([ref[:4], ref[4:8], ref[8:]], iter([lp[:4], lp[4:8], lp[8:]]), ids, coded_from=4)
    assert parts == pytest.approx(whole, rel=1e-6)
    nll = -mx.take_along_axis(lp[:-1], mx.array(ids[1:])[:, None], axis=-1)  # the next token's, as before
    assert whole["ppl"] == pytest.approx(float(mx.exp(mx.mean(nll)).item()), rel=1e-6)


@pytest.mark.model
def test_quality_cli(tmp_path, text):
    out = tmp_path / "out"
    argv = [
        "quality",
        "--text",
        text,
        "--tokens",
        "32",
        "--chunk",
        "16",
        "--presets",
        "k4v4,no-such-preset",
        "--baselines",
        "fp,affine4",
        "--out",
        str(out),
        "--tag",
        "q",
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    e = _load(out, "q")
    assert set(e) == {"fp", "affine4", "k4v4", "no-such-preset"}
    assert "error" in e["no-such-preset"]  # a failing preset is recorded, not fatal
    for name in ("fp", "affine4", "k4v4"):
        assert {"kl_mean", "kl_max", "top1", "ppl", "bpe_marginal", "bpe_model"} <= set(e[name])
    assert e["fp"]["kl_mean"] == 0 and e["k4v4"]["bpe_marginal"] == pytest.approx(4.25, abs=0.05)
    assert e["affine4"]["bpe_marginal"] == pytest.approx(4.5)
    table = summary.table(summary.load([out / "q.json"]), ["k4v4", "no-such-preset", "absent"])
    row = table.splitlines()[-1].split(" | ")
    assert row[3] == report.fmt(e["k4v4"]["kl_mean"], 4) and row[4:6] == ["error", "-"]


@pytest.mark.model
def test_speed_cli(tmp_path):
    out = tmp_path / "out"
    argv = [
        "speed",
        "--contexts",
        "64",
        "--prefill-max",
        "64",
        "--steps",
        "1",
        "--presets",
        "k4v4",
        "--baselines",
        "fp,affine4",
        "--out",
        str(out),
        "--tag",
        "s",
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    e = _load(out, "s")
    assert set(e) == {"fp@64", "affine4@64", "k4v4@64"}
    for r in e.values():
        assert {"decode_ms", "attn_ms", "prefill_tok_s", "kv_bytes", "peak_mb"} <= set(r), r
    assert e["k4v4@64"]["kv_bytes"] < e["fp@64"]["kv_bytes"]


@pytest.mark.model
def test_niah_cli(tmp_path, text):
    out = tmp_path / "out"
    argv = [
        "niah",
        "--text",
        text,
        "--contexts",
        "96",
        "--depths",
        "0.5",
        "--presets",
        "k8v8",
        "--baselines",
        "fp",
        "--out",
        str(out),
        "--tag",
        "n",
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    e = _load(out, "n")
    assert set(e) == {"fp@96@0.5", "k8v8@96@0.5"}
    for r in e.values():
        assert isinstance(r["correct"], bool) and r["code"] not in TEXT


def test_niah_rejects_needle_in_filler(tmp_path):
    from tq_mlx.bench import niah

    p = tmp_path / "bad.txt"
    p.write_text(TEXT + " the secret pass-code is 1.")

    class Tok:
        def encode(self, s):
            return list(range(len(s)))

    with pytest.raises(AssertionError):
        niah.filler(Tok(), str(p), 10)


def test_kernel_bench_fills_contexts_beyond_one_chunk():
    """The timed cache is filled in 4096-token chunks, with attention after each (no pending update)."""
    from tq_mlx.bench import kernels

    ms = kernels.measure(4160, "k4v4", 2, 1, 64, repeats=1)
    assert set(ms) == {"fp16", "affine4", "affine8", "k4v4"} and all(v > 0 for v in ms.values())


@pytest.mark.emu
def test_mac_check_runs_on_the_emulator_and_says_timings_need_a_mac(tmp_path, capsys):
    assert cli.main(["mac-check", "--dims", "64", "--out", str(tmp_path), "--no-progress"]) == 0
    entries = _load(tmp_path, "mac-check")
    assert len(entries) == 6 and all(r["ok"] for r in entries.values()), entries
    assert {r["G"] for r in entries.values()} >= {1, 4, 7} and any(r["tiny"] for r in entries.values())
    assert {r["keys"] for r in entries.values()} == {"rope", "static", "ring"}  # before RoPE, after, in a ring
    md = (tmp_path / "mac-check.md").read_text()
    assert "6 of 6 instantiations agree" in md and "Timings need a Mac" in md
    assert (tmp_path / "mac-check.png").stat().st_size > 0


def test_kernel_bench_counts_launches_and_labels_the_model(tmp_path):
    from tq_mlx.bench import kernels

    kernels.main(
        [
            "--contexts",
            "1k,32k",
            "--presets",
            "k4v4",
            "--q-heads",
            "4",
            "--kv-heads",
            "2",
            "--out",
            str(tmp_path),
            "--tag",
            "k",
        ]
    )
    rows = list(json.loads((tmp_path / "k.json").read_text())["entries"].values())
    tq = [r for r in rows if r["method"] == "k4v4"]
    assert all(r["extra_launches"] <= 8 and r["bytes_vs_fp16"] > 3.5 for r in tq)
    assert "Modelled, not measured" in (tmp_path / "k.md").read_text()


@pytest.mark.model
def test_batch_cli(tmp_path):
    """tq-bench batch: every (cache, context, sequences) entry measured, JSON + markdown + PNG written."""
    out = tmp_path / "out"
    argv = ["batch", "--contexts", "300", "--batches", "1,2", "--steps", "1", "--presets", "k4v4"]
    assert cli.main([*argv, "--out", str(out), "--tag", "b", "--no-progress"]) == 0
    e = _load(out, "b")
    assert set(e) == {"fp@300x1", "fp@300x2", "k4v4@300x1", "k4v4@300x2"}
    for r in e.values():
        assert {"step_ms", "tok_s", "kv_bytes", "peak_mb"} <= set(r), r
    assert e["k4v4@300x2"]["kv_bytes"] < e["fp@300x2"]["kv_bytes"]
    assert (out / "b.md").exists() and (out / "b.png").exists()

"""tq-chat: the command parser, multi-line input and the Session on the bundled model (greedy)."""

import pytest

import tq_mlx
from tq_mlx.chat.commands import CONTINUE, PROMPT, Command, parse, read_message
from tq_mlx.chat.sampling import Sampling

Q1, Q2, Q3 = "What is the capital of France?", "And of Germany?", "And of Italy?"
MAX_TOKENS = 6


# ---- command parser ---------------------------------------------------------
def test_empty_input_is_ignored():
    assert parse("") is None and parse("   \t") is None


def test_plain_text_is_a_message():
    assert parse("  hello there ") == Command("say", "hello there")


def test_command_takes_the_rest_of_the_line():
    assert parse("/system You are  terse.") == Command("system", "You are  terse.")
    assert parse("/KV k3v4") == Command("kv", "k3v4")


def test_exit_aliases_quit():
    assert parse("/exit") == parse("/quit") == Command("quit", "")


def test_unknown_command():
    assert parse("/frobnicate now") == Command("unknown", "/frobnicate now")
    assert parse("/").name == "unknown"


def test_save_and_load_need_a_file():
    assert parse("/save").name == "error" and "FILE" in parse("/save").arg
    assert parse("/load  s.safetensors") == Command("load", "s.safetensors")


def test_double_slash_sends_text_starting_with_slash():
    assert parse("//usr/bin is?") == Command("say", "/usr/bin is?")


def _reader(lines, prompts):
    it = iter(lines)

    def read(prompt):
        prompts.append(prompt)
        return next(it)

    return read


def test_backslash_continues_a_message():
    prompts = []
    assert read_message(_reader(["one \\", "two\\", "three"], prompts)) == "one \ntwo\nthree"
    assert prompts == [PROMPT, CONTINUE, CONTINUE]


def test_triple_quotes_make_a_block():
    lines = ['"""first', "", "  indented \\", 'last"""', "never read"]
    assert read_message(_reader(lines, [])) == "first\n\n  indented \\\nlast"


def test_triple_quotes_on_one_line():
    assert read_message(_reader(['"""just this"""'], [])) == "just this"


def test_eof_inside_a_block_propagates():
    def read(prompt):
        if prompt == CONTINUE:
            raise EOFError
        return '"""'

    with pytest.raises(EOFError):
        read_message(read)


# ---- Session on the bundled model --------------------------------------------
@pytest.fixture(scope="module")
def lm(smol):
    return smol


@pytest.fixture(scope="module")
def session_cls():
    from tq_mlx.chat.session import Session

    return Session


def _offset(session):
    return session.cache[0].offset


def _held_text(session):
    return "".join(t for t, _ in session.segments)


@pytest.fixture(scope="module")
def convo(lm, session_cls, tmp_path_factory):
    """Two greedy turns on one session, saved to a file after the first."""
    model, tok = lm
    s = session_cls(model, tok, max_tokens=MAX_TOKENS)
    rec = {"answer1": "".join(s.ask(Q1)), "offset1": _offset(s), "held1": _held_text(s)}
    rec["file"] = s.save(tmp_path_factory.mktemp("chat") / "turn1")
    rec["answer2"] = "".join(s.ask(Q2))
    rec["stats2"] = s.last
    return s, rec


@pytest.mark.model
def test_second_turn_prefills_only_the_new_tokens(convo, lm):
    s, rec = convo
    tok = lm[1]
    template = tok.apply_chat_template(s.conversation()[:-1], add_generation_prompt=True, tokenize=False)
    new_text = template[len(rec["held1"]) :]
    assert template.startswith(rec["held1"]) and new_text.startswith("<|im_end|>\n<|im_start|>user\n" + Q2)
    assert rec["stats2"].prefill_tokens == len(tok.encode(new_text, add_special_tokens=False))
    assert rec["stats2"].prefill_tokens < len(tok.encode(template)) // 3
    assert _offset(s) == rec["offset1"] + rec["stats2"].prefill_tokens + rec["stats2"].decode_tokens


@pytest.mark.model
def test_cache_holds_exactly_the_templated_conversation(convo, lm):
    s, rec = convo
    assert [m["role"] for m in s.messages] == ["user", "assistant", "user", "assistant"]
    assert s.messages[1]["content"] == rec["answer1"] and s.messages[3]["content"] == rec["answer2"]
    full = lm[1].apply_chat_template(s.conversation(), tokenize=False)
    assert full.startswith(_held_text(s))
    assert all(c.offset == s.n_tokens for c in s.cache)


@pytest.mark.model
def test_save_load_round_trip_gives_the_identical_next_answer(convo, lm, session_cls):
    _, rec = convo
    s = session_cls(*lm, max_tokens=MAX_TOKENS)
    s.load(rec["file"])
    assert _offset(s) == rec["offset1"] and s.messages[1]["content"] == rec["answer1"]
    assert "".join(s.ask(Q2)) == rec["answer2"]
    assert s.last.prefill_tokens == rec["stats2"].prefill_tokens


@pytest.mark.model
def test_load_from_another_preset_fails_and_keeps_the_session(convo, lm, session_cls):
    from tq_mlx.chat.session import SessionFileError

    s = session_cls(*lm, "k3v3", max_tokens=MAX_TOKENS, system_prompt="Be brief.")
    s.sync()
    before = (_offset(s), list(s.segments), s.system, s.config.name)
    with pytest.raises(SessionFileError, match="k4v4"):
        s.load(convo[1]["file"])
    assert (_offset(s), list(s.segments), s.system, s.config.name) == before


@pytest.mark.model
def test_load_of_a_foreign_file_is_a_clear_error(lm, session_cls, tmp_path):
    from tq_mlx.chat.session import SessionFileError

    s = session_cls(*lm)
    with pytest.raises(SessionFileError, match="no such file"):
        s.load(tmp_path / "missing")
    from mlx_lm.models.cache import save_prompt_cache

    save_prompt_cache(str(tmp_path / "plain.safetensors"), tq_mlx.make_prompt_cache(lm[0]), {"x": "1"})
    with pytest.raises(SessionFileError, match="not a tq-chat session"):
        s.load(tmp_path / "plain.safetensors")


@pytest.mark.model
def test_context_full_with_stop_refuses_the_turn_and_changes_nothing(convo, lm, session_cls):
    from tq_mlx.chat.session import ContextFull

    s = session_cls(*lm, max_tokens=MAX_TOKENS, max_context=convo[1]["offset1"] + 10, on_context_full="stop")
    s.load(convo[1]["file"])
    before = (_offset(s), list(s.segments), list(s.messages))
    with pytest.raises(ContextFull, match="context full"):
        s.prepare(Q2)
    assert (_offset(s), list(s.segments), list(s.messages)) == before


@pytest.mark.model
def test_context_full_with_drop_oldest_drops_turns_and_rebuilds(convo, lm, session_cls):
    s = session_cls(*lm, max_tokens=MAX_TOKENS, max_context=convo[1]["offset1"] + 10, on_context_full="drop-oldest")
    s.load(convo[1]["file"])
    answer = "".join(s.ask(Q2))
    assert s.last.dropped_turns == 1
    assert [m["content"] for m in s.messages] == [Q2, answer]
    full = lm[1].apply_chat_template(s.conversation(), tokenize=False)
    assert full.startswith(_held_text(s)) and Q1 not in _held_text(s)
    assert _offset(s) == s.n_tokens <= s.max_context


@pytest.mark.model
def test_kv_switch_re_encodes_the_conversation(convo, lm, session_cls):
    s = session_cls(*lm, max_tokens=MAX_TOKENS)
    s.load(convo[1]["file"])
    s.set_kv("k3v3")
    tq = [c for c in s.cache if isinstance(c, tq_mlx.TurboQuantKVCache)]
    assert tq and all(c.config.name == "k3v3" for c in tq)
    text = lm[1].apply_chat_template(s.conversation(), tokenize=False)
    assert _held_text(s) == text
    assert all(c.offset == len(lm[1].encode(text)) == s.n_tokens for c in s.cache)
    with pytest.raises(ValueError, match="unknown KV preset"):
        s.set_kv("k9")
    assert s.config.name == "k3v3"


@pytest.mark.model
def test_interrupted_answer_is_kept_in_messages_and_cache(convo, lm, session_cls):
    s = session_cls(*lm, max_tokens=MAX_TOKENS)
    s.load(convo[1]["file"])
    for _ in s.ask(Q2):
        s.stop()
    partial = s.messages[-1]["content"]
    assert s.last.finish == "interrupted" and 1 <= s.last.decode_tokens < MAX_TOKENS
    assert partial and convo[1]["answer2"].startswith(partial)
    assert _offset(s) == s.n_tokens == convo[1]["offset1"] + s.last.prefill_tokens + s.last.decode_tokens
    "".join(s.ask(Q3))
    assert s.segments[-2][0].startswith("<|im_end|>\n<|im_start|>user\n" + Q3)
    assert _offset(s) == s.n_tokens


@pytest.mark.model
def test_seed_makes_sampled_answers_repeatable(convo, lm, session_cls):
    answers = []
    for _ in range(2):
        s = session_cls(*lm, max_tokens=3, sampling=Sampling(temp=1.5), seed=3)
        s.load(convo[1]["file"])
        answers.append("".join(s.ask(Q2)))
    assert answers[0] == answers[1]


@pytest.mark.model
def test_session_file_records_messages_and_settings(convo):
    from tq_mlx.chat.session import read_meta

    saved = read_meta(convo[1]["file"])
    assert saved["kv"] == tq_mlx.config.auto_preset() and saved["messages"][0]["content"] == Q1
    assert sum(n for _, n in saved["segments"]) == convo[1]["offset1"]


@pytest.mark.model
def test_max_kv_size_makes_every_layer_a_sliding_window(lm, session_cls):
    s = session_cls(*lm, max_kv_size=32, kv_boundary_layers=1)
    assert [type(c).__name__ for c in s.cache[:2]] == ["RotatingKVCache", "TurboQuantKVCache"]
    assert all(c.max_size == 32 and c.keep == 4 for c in s.cache)


def test_a_full_disk_on_save_is_a_clear_error_and_leaves_no_file(convo, lm, session_cls, tmp_path, monkeypatch):
    import errno

    import tq_mlx.chat.session as session_mod

    s = session_cls(*lm, max_tokens=MAX_TOKENS)
    "".join(s.ask(Q1))

    def full(path, *a, **kw):
        open(path, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(session_mod, "save_prompt_cache", full)
    with pytest.raises(session_mod.SessionFileError, match="cannot write .*No space left on device"):
        s.save(tmp_path / "s")
    assert not list(tmp_path.iterdir()) and len(s.messages) == 2


def test_stats_say_when_nothing_is_compressed_yet(lm, session_cls):
    s = session_cls(*lm, max_tokens=4)
    assert s.stats()["ratio"] is None and s.stats()["tokens"] == 0
    "".join(s.ask(Q1))
    st = s.stats()
    assert st["ratio"] is None and st["quant_start"] == 256  # a short chat stays exact
    s.reset()
    assert s.stats()["tokens"] == 0 and s.stats()["ratio"] is None


def test_stats_ratio_compares_with_an_fp16_cache_of_the_same_tokens(lm, session_cls):
    s = session_cls(*lm, "k4v4", max_tokens=2, kv_window=0)
    s.config = tq_mlx.resolve_config(s.config, quant_start=0)
    s.cache = s._new_cache()
    "".join(s.ask(Q1))
    st = s.stats()
    assert st["ratio"] == pytest.approx(st["fp16_bytes"] / st["kv_bytes"]) and st["ratio"] > 1


def test_sampling_flags_reach_mlx_lm_samplers():
    from tq_mlx.chat.sampling import Sampling

    s = Sampling(temp=0.7, top_k=5, min_p=0.05, repetition_penalty=1.2)
    assert callable(s.sampler()) and len(s.processors()) == 1
    assert Sampling().processors() == []
    for bad in ({"top_p": 0}, {"top_k": -1}, {"min_p": 1.0}, {"repetition_penalty": 0}):
        with pytest.raises(ValueError):
            Sampling(**bad)


def test_a_repetition_penalty_changes_a_looping_answer(lm, session_cls):
    from tq_mlx.chat.sampling import Sampling

    plain = session_cls(*lm, max_tokens=40)
    penalised = session_cls(*lm, max_tokens=40, sampling=Sampling(repetition_penalty=1.5))
    q = "Repeat the word hello many times."
    assert "".join(plain.ask(q)) != "".join(penalised.ask(q))


def test_a_base_model_runs_in_completion_mode(lm, session_cls):
    s = session_cls(*lm, max_tokens=4, completion=True)
    out = "".join(s.ask("The capital of France is"))
    assert s.messages[-1]["content"].strip() == out.strip()
    assert s.render(s.conversation(), True) == "The capital of France is" + s.messages[-1]["content"]
    assert "<|im_start|>" not in s.tokenizer.decode(s.tokenizer.encode(s.segments[0][0]))


def test_help_documents_history_base_models_and_sampling(capsys):
    from tq_mlx.chat.cli import build_parser

    text = build_parser().format_help()
    for needle in (
        "--no-history",
        "chat_history",
        "completion mode",
        "--top-k",
        "--min-p",
        "--repetition-penalty",
        "auto",
    ):
        assert needle in text

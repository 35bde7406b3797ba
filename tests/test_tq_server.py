"""tq-server over real HTTP: OpenAI-style answers, streaming, exact prefix reuse, several clients
at once, bad requests, Ctrl-C; and the prompt cache it reuses prefixes from."""

import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlx.core as mx
import pytest

import tq_mlx
from tq_mlx.models.mlx_lm_hook import TurboQuantPromptCache

OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
TIMEOUT = 300  # seconds per request: the CPU may be shared
MODEL = "smollm2-135m"

# A system prompt of more than 500 tokens with a needle in the middle.
TOWNS = [
    "Arden",
    "Belmor",
    "Caskil",
    "Dunmere",
    "Eskar",
    "Fallow",
    "Grentz",
    "Harlow",
    "Istra",
    "Jorvik",
    "Kelmar",
    "Lunde",
    "Marrow",
    "Norsk",
    "Ostby",
    "Pellam",
    "Quarry",
    "Rookby",
    "Selwyn",
    "Tarrow",
    "Umber",
    "Valen",
]
FACTS = [
    f"The town of {t} has {3 + i} bridges, {12 + 2 * i} bakeries and a market every {['Monday', 'Friday'][i % 2]}."
    for i, t in enumerate(TOWNS)
]
NEEDLE = "The secret code of the old vault is 7291."
SYSTEM = "You are a careful assistant. Answer from these notes. " + " ".join(FACTS[:11] + [NEEDLE] + FACTS[11:])
Q_OTHER, Q_NEEDLE = "How many bridges does Istra have?", "What is the secret code of the old vault?"
CAPITALS = ["France", "Germany", "Italy", "Japan"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """tq-server in a subprocess on a free port, its log in a file."""

    def __init__(self, log_dir: Path, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"tq-server-{self.port}.log"
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        if os.path.exists(OPENBLAS) and "LD_PRELOAD" not in env:
            env["LD_PRELOAD"] = OPENBLAS
        exe = Path(sys.executable).with_name("tq-server")
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [str(exe), "--port", str(self.port), *args], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, f"tq-server exited with {self.proc.returncode}:\n{self.log()}"
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"tq-server did not come up in 120 s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def request(self, path, data=None, timeout=TIMEOUT):
        """(status, body bytes, content type) of a GET (data None) or POST of raw bytes."""
        req = urllib.request.Request(self.url + path, data, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read(), r.headers.get("Content-Type")
        except urllib.error.HTTPError as e:
            return e.code, e.read(), e.headers.get("Content-Type")

    def get(self, path):
        status, body, _ = self.request(path, timeout=5)
        return status, json.loads(body)

    def post(self, path, body: dict):
        status, raw, _ = self.request(path, json.dumps(body).encode())
        return status, json.loads(raw)

    def chat(self, question, system=None, max_tokens=12, **extra):
        """The answer to one question at temperature 0, with its token ids (via logprobs)."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        status, body = self.post(
            "/v1/chat/completions",
            {
                "messages": messages,
                "max_tokens": max_tokens,
                "temperature": 0,
                "logprobs": True,
                "top_logprobs": 2,
                **extra,
            },
        )
        assert status == 200, body
        return body

    def interrupt(self, timeout=30):
        """Ctrl-C; the exit status."""
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return f"still running {timeout} s after SIGINT"


def tokens(body) -> list:
    return [t["id"] for t in body["choices"][0]["logprobs"]["content"]]


def clear_tokens(body, min_margin=0.1) -> list:
    """The answer's tokens up to its first near-tie (top-2 log-prob margin below min_margin nats)."""
    out = []
    for t in body["choices"][0]["logprobs"]["content"]:
        top = sorted((c["logprob"] for c in t["top_logprobs"]), reverse=True)
        if len(top) > 1 and top[0] - top[1] < min_margin:
            break
        out.append(t["id"])
    return out


def text(body) -> str:
    return body["choices"][0]["message"]["content"]


def cached(body) -> int:
    return body["usage"]["prompt_tokens_details"]["cached_tokens"]


def _serve(tmp_path_factory, *args):
    server = Server(tmp_path_factory.mktemp("server"), *args)
    yield server
    status = server.interrupt()
    assert status in (0, 130) and "Traceback" not in server.log(), f"Ctrl-C gave {status}:\n{server.log()[-3000:]}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """tq-server with mlx-lm's defaults: a prompt cache of 10 sequences."""
    yield from _serve(tmp_path_factory)


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    """The same server without a prompt cache: every request is served cold."""
    yield from _serve(tmp_path_factory, "--prompt-cache-size", "0")


# ---- answers -----------------------------------------------------------------------------
@pytest.mark.model
def test_chat_completion_answers_openai_style(server):
    body = server.chat("What is the capital of France?")
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and "Paris" in choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["completion_tokens"] <= 12


@pytest.mark.model
def test_text_completion_continues_the_prompt(server):
    status, body = server.post(
        "/v1/completions", {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    )
    assert status == 200 and body["object"] == "text_completion"
    assert "Paris" in body["choices"][0]["text"]
    assert body["usage"]["completion_tokens"] <= 8


@pytest.mark.model
def test_models_lists_the_served_model(server):
    status, body = server.get("/v1/models")
    assert status == 200 and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL]


@pytest.mark.model
def test_streaming_sends_the_answer_in_server_sent_events(cold):
    question = {
        "messages": [{"role": "user", "content": "What is the capital of Italy?"}],
        "max_tokens": 12,
        "temperature": 0,
    }
    status, raw, ctype = cold.request("/v1/chat/completions", json.dumps({**question, "stream": True}).encode())
    assert status == 200 and ctype.startswith("text/event-stream")
    events = [line[len("data: ") :] for line in raw.decode().split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    assert sum(bool(d) for d in deltas) >= 2  # streamed, not one block
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "".join(deltas) == text(cold.chat("What is the capital of Italy?"))


@pytest.mark.model
def test_openai_client_gets_an_answer(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed", timeout=TIMEOUT)
    reply = client.chat.completions.create(
        model=MODEL,
        max_tokens=12,
        temperature=0,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    assert "Paris" in reply.choices[0].message.content
    with pytest.raises(openai.NotFoundError, match="model_not_found|does not exist"):
        client.chat.completions.create(model="gpt-4o", max_tokens=4, messages=[{"role": "user", "content": "hi"}])


# ---- prefix reuse -------------------------------------------------------------------
@pytest.fixture(scope="module")
def prefix_runs(server, cold):
    """The same requests to a server with a prompt cache (in this order) and to a cold one."""
    warm = {"first": server.chat(Q_OTHER, SYSTEM, max_tokens=16)}
    warm["needle"] = server.chat(Q_NEEDLE, SYSTEM, max_tokens=16)
    warm["first again"] = server.chat(Q_OTHER, SYSTEM, max_tokens=16)
    return warm, {
        "needle": cold.chat(Q_NEEDLE, SYSTEM, max_tokens=16),
        "first again": cold.chat(Q_OTHER, SYSTEM, max_tokens=16),
    }


def same_as_cold(warm, cold):
    """The cold server's tokens, up to its first near-tie.

    A cached prefix's keys and values were computed in another request, in other chunks; float noise
    of order 1e-7 (as with mlx-lm's own fp cache) can move a coordinate across a decision edge, so
    where the cold server's choice is a near-tie the warm one may choose the other token.  A prefix
    cache that corrupts anything (a wrong trim, codecs from another prefix) fails long before."""
    clear = clear_tokens(cold)
    assert len(clear) >= 3, "the cold answer is a near-tie from the start: choose another question"
    assert tokens(warm)[: len(clear)] == clear


@pytest.mark.model
def test_a_second_question_on_a_cached_long_prompt_answers_like_a_cold_server(prefix_runs):
    warm, cold = prefix_runs
    assert warm["needle"]["usage"]["prompt_tokens"] >= 500
    assert cached(warm["needle"]) >= 500 and cached(cold["needle"]) == 0  # a real hit; a real cold start
    same_as_cold(warm["needle"], cold["needle"])


@pytest.mark.model
def test_going_back_to_the_first_question_answers_like_a_cold_server(prefix_runs):
    warm, cold = prefix_runs
    assert cached(warm["first again"]) >= 500
    same_as_cold(warm["first again"], cold["first again"])


# ---- load -----------------------------------------------------------------------------------
@pytest.mark.model
def test_four_clients_at_once_each_get_their_own_answer(cold):
    questions = [f"What is the capital of {c}?" for c in CAPITALS]
    alone = [tokens(cold.chat(q, max_tokens=8)) for q in questions]
    assert len({tuple(a) for a in alone}) == len(questions)  # distinct, so a mix-up would show
    results, barrier = [None] * len(questions), threading.Barrier(len(questions))

    def ask(i):
        barrier.wait()
        results[i] = cold.chat(questions[i], max_tokens=8)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert [tokens(r) for r in results] == alone
    assert len({r["id"] for r in results}) == len(questions)
    together = [int(n) for n in re.findall(r"tq_mlx: (\d+) sequence\(s\) decode together", cold.log())]
    assert max(together, default=0) >= 2, "the concurrent requests were not batched"


@pytest.mark.model
def test_a_preset_that_does_not_batch_serves_concurrent_clients_one_at_a_time(tmp_path):
    """Trellis caches do not merge: the server answers both clients, one after the other."""
    server = Server(tmp_path, "--prompt-cache-size", "0", "--kv", "k4v4-tcq")
    results = [None, None]

    def ask(i):
        results[i] = server.chat(f"What is the capital of {CAPITALS[i]}?", max_tokens=4)

    try:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert all(r is not None and text(r) for r in results)
        assert "decode together" not in server.log() and "Traceback" not in server.log()
    finally:
        server.interrupt()


# ---- bad requests ---------------------------------------------------------------------------
LONG = "hello " * 9000  # more tokens than SmolLM2's 8192-token context
BAD = {
    "malformed JSON": ("/v1/chat/completions", b'{"messages": [', 400, None),
    "not an object": ("/v1/chat/completions", b"[1, 2]", 400, None),
    "unknown model": (
        "/v1/chat/completions",
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
        404,
        "model_not_found",
    ),
    "negative max_tokens": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5},
        400,
        None,
    ),
    "no messages": ("/v1/chat/completions", {"max_tokens": 4}, 400, None),
    "content not text": ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, None),
    "prompt not text": ("/v1/completions", {"prompt": [1, 2, 3]}, 400, None),
    "prompt past the context": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": LONG}], "max_tokens": 4},
        400,
        "context_length_exceeded",
    ),
    "unknown path": ("/v1/nothing", {}, 404, None),
}


def send_bad(server, name):
    path, body, _, _ = BAD[name]
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return server.request(path, data, timeout=60)


@pytest.mark.model
@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_request_gets_a_4xx_with_an_openai_error_body(server, name):
    status, raw, ctype = send_bad(server, name)
    error = json.loads(raw)["error"]
    assert (status, error["code"]) == BAD[name][2:]
    assert ctype == "application/json"
    assert isinstance(error["message"], str) and error["message"] and error["type"] == "invalid_request_error"
    assert "param" in error


@pytest.mark.model
def test_the_server_keeps_answering_after_bad_requests(server):
    for name in BAD:
        assert 400 <= send_bad(server, name)[0] < 500
    assert "Paris" in text(server.chat("What is the capital of France?"))


# ---- Ctrl-C -----------------------------------------------------------------------------------
@pytest.mark.model
def test_ctrl_c_in_the_middle_of_an_answer_exits_cleanly(tmp_path):
    server = Server(tmp_path)
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
            "max_tokens": 4000,
            "stream": True,
        }
    ).encode()
    req = urllib.request.Request(server.url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    events = 0
    with urllib.request.urlopen(req, timeout=TIMEOUT) as stream:
        while events < 3:
            events += stream.readline().startswith(b"data: ")
        tic = time.time()
        status = server.interrupt()
    assert status in (0, 130), server.log()[-3000:]
    assert time.time() - tic < 30
    assert "Traceback" not in server.log()


# ---- the prompt cache, in process -------------------------------------------------------------
class Calibrated(tq_mlx.TurboQuantKVCache):
    """A TurboQuant layer that reports `calibration_length`, as the cache will once codecs are
    calibrated on its first tokens only."""

    calibration_length = 0


def filled_cache(n_tokens, calibration=0, layers=2):
    """TurboQuant layers holding n_tokens random tokens, reporting `calibration`."""
    cache = [Calibrated("k4v4", layer=i) for i in range(layers)]
    for c in cache:
        kv = mx.random.normal((1, 2, n_tokens, 64), key=mx.random.key(c.layer))
        c.update_and_fetch(kv, kv)
        c.calibration_length = calibration
    return cache


def test_prompt_cache_reuses_a_trimmed_copy_and_keeps_the_original():
    lru = TurboQuantPromptCache(max_size=4)
    lru.insert_cache("m", list(range(20)), filled_cache(20))
    cache, rest = lru.fetch_nearest_cache("m", list(range(12)) + [99, 98])
    assert rest == [99, 98] and [c.offset for c in cache] == [12, 12]
    cache, rest = lru.fetch_nearest_cache("m", list(range(20)) + [99])
    assert rest == [99] and [c.offset for c in cache] == [20, 20]


def test_prompt_cache_serves_cold_a_prefix_shorter_than_the_calibration():
    lru = TurboQuantPromptCache(max_size=4)
    lru.insert_cache("m", list(range(40)), filled_cache(40, calibration=16))
    assert lru.fetch_nearest_cache("m", list(range(10)) + [99]) == (None, list(range(10)) + [99])
    cache, rest = lru.fetch_nearest_cache("m", list(range(20)) + [99])
    assert rest == [99] and cache[0].offset == 20


def test_prompt_cache_keeps_to_max_bytes():
    one = sum(c.nbytes for c in filled_cache(30))
    lru = TurboQuantPromptCache(max_size=10, max_bytes=int(1.5 * one))
    lru.insert_cache("m", list(range(30)), filled_cache(30))
    lru.insert_cache("m", list(range(100, 130)), filled_cache(30))
    assert len(lru) == 1 and lru.nbytes == one
    assert lru.fetch_nearest_cache("m", list(range(100, 131)))[0] is not None
    assert lru.fetch_nearest_cache("m", list(range(31)))[0] is None


def test_a_deep_copied_cache_is_independent_of_the_original():
    cache = filled_cache(20)
    before = {k: v for k, v in cache[0].state.items() if isinstance(v, mx.array)}
    twin = copy.deepcopy(cache)
    twin[0].trim(15)
    twin[0].update_and_fetch(mx.zeros((1, 2, 3, 64)), mx.zeros((1, 2, 3, 64)))
    assert (cache[0].offset, twin[0].offset) == (20, 8)
    after = cache[0].state
    assert all(mx.array_equal(v, after[k]).item() for k, v in before.items())


THREAD_SCRIPT = """
import os, threading, mlx.core as mx
import tq_mlx
from mlx_lm.models import base
def attend():
    try:
        x = mx.sin(mx.arange(1024, dtype=mx.float32)).reshape(1, 2, 8, 64)
        c = tq_mlx.TurboQuantKVCache(tq_mlx.resolve_config("k4v4", quant_start=0))  # codes at once
        k, v = c.update_and_fetch(x, x)
        out = base.scaled_dot_product_attention(mx.concatenate([x, x], axis=1), k, v, cache=c, scale=0.125,
                                                mask="causal")
        mx.eval(out)
        print("OK", out.shape)
    except Exception as e:
        print("FAILED:", e)
t = threading.Thread(target=attend)
t.start(); t.join()
os._exit(0)  # MLX 0.32 may abort while tearing down a thread's stream at exit
"""


def test_turboquant_attention_works_in_a_thread_other_than_the_importing_one():
    """mlx_lm.server runs the model in its own thread: an MLX array tq_mlx built lazily in another thread
    would fail there ("There is no Stream(cpu, 0) in current thread"); tq_mlx evaluates what it caches."""
    out = subprocess.run(
        [sys.executable, "-c", THREAD_SCRIPT], check=False, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.strip() == "OK (1, 4, 8, 64)", out.stdout + out.stderr

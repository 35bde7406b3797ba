"""A chat conversation on one persistent TurboQuant prompt cache (no terminal I/O).

The cache always holds exactly the tokens of `segments`, a list of (text, n_tokens):
the template text prefilled for each turn, then each answer as generated (its
tokens, including the end-of-turn token when the model emitted one).  A turn
renders the whole conversation with the chat template, keeps the segments
that are a prefix of that text, trims the cache back to them (usually nothing
to trim) and prefills only the rest: the end of the last answer's turn, the
new user message and the assistant header.

An interrupted answer (`stop()`) is kept: its tokens stay in the cache and its
text becomes the assistant message, so the next turn continues consistently.
"""

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx_lm import stream_generate
from mlx_lm.models.cache import can_trim_prompt_cache, save_prompt_cache, trim_prompt_cache

import tq_mlx
from tq_mlx import describe
from tq_mlx.models import distributed

from .sampling import Sampling

SESSION_VERSION = 1
POLICIES = ("stop", "drop-oldest")
_FINGERPRINT = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)


class ContextFull(RuntimeError):
    """The next turn does not fit in max_context (nothing was changed)."""


class SessionFileError(ValueError):
    """A session file that cannot be loaded into this session (nothing was changed)."""


@dataclass
class TurnStats:
    prefill_tokens: int = 0
    prefill_tps: float = 0.0
    decode_tokens: int = 0
    decode_tps: float = 0.0
    ttft: float = 0.0  # seconds from the turn's start to its first token
    peak_memory: int = 0  # bytes, during this turn
    finish: str = ""  # "stop", "length" or "interrupted"
    dropped_turns: int = 0


@dataclass
class Plan:
    """What a turn will do: the messages after it, the segments kept, the text and tokens to prefill."""

    messages: list[dict]
    kept: list[tuple[str, int]]
    text: str
    ids: list[int]
    dropped_turns: int = 0


def fingerprint(model) -> dict:
    """The model's architecture figures, to tell saved sessions of other models apart."""
    args = vars(getattr(model, "args", None) or object())
    return {k: args[k] for k in _FINGERPRINT if isinstance(args.get(k), (int, str))}


def read_meta(path) -> dict:
    """The session metadata of a file written by Session.save (mlx-lm stores it as "2.tq_chat")."""
    _, raw = mx.load(str(path), return_metadata=True)
    return json.loads(next(v for k, v in raw.items() if k.split(".")[-1] == "tq_chat"))


def has_chat_template(tokenizer) -> bool:
    """True when the tokenizer renders chat messages (an instruction-tuned model)."""
    return bool(getattr(tokenizer, "chat_template", None) or getattr(tokenizer, "has_chat_template", False))


def _reason(e: Exception) -> str:
    """A one-line reason for a file error (MLX's own messages name the file; OSError's the cause)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _offset(cache) -> int | None:
    return next((c.offset for c in cache if hasattr(c, "offset")), None)


class Session:
    """Messages, system prompt and the prompt cache that holds them."""

    def __init__(
        self,
        model,
        tokenizer,
        kv=None,
        *,
        system_prompt=None,
        max_tokens=256,
        sampling=None,
        completion=None,
        seed=None,
        max_context=None,
        max_kv_size=None,
        kv_window=None,
        kv_boundary_layers=None,
        on_context_full="stop",
        model_name=None,
        group=None,
    ):
        if on_context_full not in POLICIES:
            raise ValueError(f"on_context_full must be one of {POLICIES}, got {on_context_full!r}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        # a tensor-parallel group (the model sharded over it): stats sum the ranks, files are per rank
        self.group = group if group is not None and group.size() > 1 else None
        self.overrides = {
            k: v for k, v in (("fp_window", kv_window), ("boundary_layers", kv_boundary_layers)) if v is not None
        }
        self.config = tq_mlx.model_config(model, kv, **self.overrides)
        self.max_kv_size, self.max_tokens, self.seed = max_kv_size, max_tokens, seed
        self.sampling = sampling or Sampling()
        # completion mode: no chat template (a base model): the conversation is plain text, continued
        self.completion = not has_chat_template(tokenizer) if completion is None else completion
        ctx = getattr(getattr(model, "args", None), "max_position_embeddings", None)
        self.max_context = max_context or ctx or 8192
        self.on_context_full = on_context_full
        self.system = system_prompt or None
        self.messages: list[dict] = []
        self.segments: list[tuple[str, int]] = []
        self.cache = self._new_cache()
        self.last = TurnStats()
        self.stop_requested = False
        self.turns = 0  # answers so far: with a seed, answer i is sampled after mx.random.seed(seed + i)

    # ---- text and tokens ------------------------------------------------
    def _new_cache(self):
        return tq_mlx.make_prompt_cache(self.model, self.config, max_kv_size=self.max_kv_size)

    @property
    def n_tokens(self) -> int:
        """Tokens fed into the cache (its offset; a sliding window keeps at most max_kv_size of them)."""
        return sum(n for _, n in self.segments)

    def conversation(self, messages=None) -> list[dict]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + list(self.messages if messages is None else messages)

    def render(self, messages, generation_prompt: bool) -> str:
        if not messages:
            return ""
        if self.completion:
            return "".join(m["content"] for m in messages)
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)

    def _encode(self, text: str, first: bool) -> list[int]:
        bos = self.tokenizer.bos_token
        return self.tokenizer.encode(text, add_special_tokens=first and not (bos and text.startswith(bos)))

    def _plan(self, target: str, need_prompt: bool):
        """(kept segments, text to prefill, its token ids) for the cache to hold `target`."""
        kept, pos = [], 0
        for text, n in self.segments:
            if not target.startswith(text, pos):
                break
            kept.append((text, n))
            pos += len(text)
        if need_prompt and pos == len(target) and kept:  # generation needs at least one new token
            pos -= len(kept.pop()[0])
        rest = target[pos:]
        return kept, rest, (self._encode(rest, first=not kept) if rest else [])

    def _trim_to(self, kept) -> list[tuple[str, int]]:
        """Trim the cache to the kept segments; a cache that cannot be trimmed (a full sliding window)
        is replaced by an empty one. Returns the segments the cache now holds."""
        drop = self.n_tokens - sum(n for _, n in kept)
        if drop and can_trim_prompt_cache(self.cache) and trim_prompt_cache(self.cache, drop) == drop:
            self.segments = list(kept)
        elif drop:
            self.cache, self.segments = self._new_cache(), []
        return self.segments

    def _prefill(self, text: str, ids: list[int], step: int = 512):
        for i in range(0, len(ids), step):
            self.model(mx.array(ids[i : i + step])[None], cache=self.cache)
            mx.eval([c.state for c in self.cache])
        self.segments.append((text, len(ids)))

    def sync(self):
        """Make the cache hold the templated conversation (re-encoding what differs)."""
        target = self.render(self.conversation(), False)
        self._trim_to(self._plan(target, False)[0])
        _, rest, ids = self._plan(target, False)  # against what the cache now holds
        if ids:
            self._prefill(rest, ids)

    # ---- turns ------------------------------------------------------------
    def prepare(self, text: str) -> Plan:
        """Plan a turn for the user message `text`; raises ContextFull (changing nothing) when it
        does not fit and the policy is "stop" or dropping every earlier turn is not enough."""
        messages, dropped = list(self.messages), 0
        while True:
            msgs = messages + [{"role": "user", "content": text}]
            kept, rest, ids = self._plan(self.render(self.conversation(msgs), True), True)
            held = sum(n for _, n in kept)
            need = held + len(ids) + self.max_tokens
            if need <= self.max_context:
                return Plan(msgs, kept, rest, ids, dropped)
            if self.on_context_full == "stop" or not messages:
                why = (
                    f"context full: this turn needs {need} tokens ({held} held + {len(ids)} new + "
                    f"{self.max_tokens} for the answer), the limit is {self.max_context}."
                )
                hint = (
                    " Use /reset, a shorter message, a smaller --max-tokens, or --on-context-full drop-oldest."
                    if messages
                    else " Even without earlier turns it does not fit: shorten the message or lower --max-tokens."
                )
                raise ContextFull(why + hint)
            i = 1
            while i < len(messages) and messages[i]["role"] != "user":
                i += 1
            del messages[:i]
            dropped += 1

    def stop(self):
        """Ask the running answer to stop after its current token (safe from a signal handler)."""
        self.stop_requested = True

    def generate(self, plan: Plan) -> Iterator[str]:
        """Run a planned turn, yielding the answer's text as it is generated."""
        self.stop_requested = False
        self.messages = plan.messages
        if self._trim_to(plan.kept) != plan.kept:  # the cache was rebuilt: prefill everything
            _, rest, ids = self._plan(self.render(self.conversation(), True), True)
            plan = Plan(plan.messages, [], rest, ids, plan.dropped_turns)
        self.segments.append((plan.text, len(plan.ids)))
        if self.seed is not None:
            mx.random.seed(self.seed + self.turns)
        self.turns += 1
        self.last = stats = TurnStats(prefill_tokens=len(plan.ids), dropped_turns=plan.dropped_turns)
        mx.reset_peak_memory()
        start = time.perf_counter()
        responses = stream_generate(
            self.model,
            self.tokenizer,
            mx.array(plan.ids),
            max_tokens=self.max_tokens,
            sampler=self.sampling.sampler(),
            logits_processors=self.sampling.processors(),
            prompt_cache=self.cache,
        )
        tokens, boundary = [], True  # boundary: not inside a model call, the cache holds whole tokens
        try:
            while not self.stop_requested:
                boundary = False
                r = next(responses, None)
                boundary = True
                if r is None:
                    break
                tokens.append(r.token)  # each response is one token, already in the cache
                if len(tokens) == 1:
                    stats.ttft = time.perf_counter() - start
                stats.prefill_tps, stats.decode_tps = r.prompt_tps, r.generation_tps
                stats.peak_memory = mx.get_peak_memory()
                stats.finish = r.finish_reason or "interrupted"
                if r.text:
                    yield r.text
        finally:
            responses.close()
            self._finish(tokens, stats, boundary)

    def ask(self, text: str) -> Iterator[str]:
        """prepare + generate."""
        return self.generate(self.prepare(text))

    def _finish(self, tokens, stats, clean: bool):
        """Record the answer (possibly partial) and make sure the cache holds exactly the segments."""
        stats.decode_tokens = len(tokens)
        eos = bool(tokens) and tokens[-1] in self.tokenizer.eos_token_ids
        answer = self.tokenizer.decode(tokens[:-1] if eos else tokens)
        if tokens:
            end = self.tokenizer.decode(tokens[-1:]) if eos else ""
            self.segments.append((answer + end, len(tokens)))
            self.messages.append({"role": "assistant", "content": answer})
        else:  # nothing generated: undo the turn
            self.segments.pop()
            self.messages.pop()
            stats.finish = "interrupted"
        held = _offset(self.cache)
        if clean and held is not None and held > self.n_tokens and can_trim_prompt_cache(self.cache):
            trim_prompt_cache(self.cache, held - self.n_tokens)
            held = _offset(self.cache)
        if not clean or held not in (None, self.n_tokens):
            self.cache, self.segments = self._new_cache(), []  # unknown state: re-encode at the next turn

    # ---- commands -----------------------------------------------------------
    def reset(self):
        self.messages, self.segments, self.cache, self.turns = [], [], self._new_cache(), 0

    def set_system(self, text: str | None):
        self.system = text or None
        self.sync()

    def set_kv(self, kv):
        """Switch the KV preset ("k3v4", a preset name, ...) and re-encode the conversation."""
        self.config = tq_mlx.model_config(self.model, kv, **self.overrides)
        self.cache, self.segments = self._new_cache(), []
        self.sync()

    def stats(self) -> dict:
        """tokens; kv_bytes held; fp16_bytes an fp16 cache of the same tokens would hold; ratio of the two,
        None while nothing is compressed yet (every layer still in its exact phase, or empty)."""
        kv = tq_mlx.cache_nbytes(self.cache)
        fp16 = sum(describe.fp16_bytes(c) for c in self.cache)
        per_rank = None
        if self.group is not None:  # every rank calls this: the figures are gathered
            per_rank = distributed.gather_ints([kv, fp16], self.group)
            kv, fp16 = sum(r[0] for r in per_rank), sum(r[1] for r in per_rank)
        compressed = any(getattr(c, "calibrated", False) for c in self.cache)
        starts = [c.config.quant_start for c in self.cache if isinstance(c, tq_mlx.TurboQuantKVCache)]
        return {
            "tokens": self.n_tokens,
            "max_context": self.max_context,
            "kv": self.config.name,
            "kv_bytes": kv,
            "kv_bytes_per_rank": None if per_rank is None else [r[0] for r in per_rank],
            "fp16_bytes": fp16,
            "ratio": fp16 / kv if compressed and kv else None,
            "quant_start": max(starts, default=0),
            "layers": describe.summary(self.cache),
            "last": self.last,
        }

    # ---- files --------------------------------------------------------------
    def _meta(self) -> dict:
        return {
            "version": SESSION_VERSION,
            "model": self.model_name,
            "fingerprint": fingerprint(self.model),
            "kv": self.config.name,
            "config": json.loads(self.config.to_json()),
            "max_kv_size": self.max_kv_size,
            "system": self.system,
            "messages": self.messages,
            "segments": self.segments,
            "turns": self.turns,
        }

    def _rank_file(self, path: Path) -> Path:
        """In a group, this rank's file of session file `path` (each rank saves its own KV heads)."""
        if self.group is None:
            return path
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        return Path(distributed.rank_path(path, self.group))

    def save(self, path) -> Path:
        """Write messages, settings and the prompt cache to a .safetensors file; returns its path
        (in a group, this rank's file: NAME.rank{r}-of-{N}.safetensors)."""
        path = self._rank_file(Path(path).expanduser())
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.safetensors")
        try:  # a failed write (missing folder, read-only, full disk) leaves no half file behind
            save_prompt_cache(str(tmp), self.cache, {"tq_chat": json.dumps(self._meta())})
            os.replace(tmp, path)
        except (OSError, RuntimeError, ValueError) as e:
            tmp.unlink(missing_ok=True)
            raise SessionFileError(f"cannot write {path}: {_reason(e)}") from None
        return path

    def load(self, path) -> Path:
        """Replace the session with a saved one; raises SessionFileError (changing nothing) for a
        missing or foreign file, or one saved with another model, KV preset or --max-kv-size (in a group,
        or by another rank or group size)."""
        path = self._rank_file(Path(path).expanduser())
        if not path.is_file() and path.with_name(path.name + ".safetensors").is_file():
            path = path.with_name(path.name + ".safetensors")
        if not path.is_file():
            raise SessionFileError(f"{path}: no such file")
        try:
            meta = read_meta(path)
        except OSError as e:
            raise SessionFileError(f"cannot read {path}: {_reason(e)}") from None
        except Exception:
            raise SessionFileError(f"{path}: not a tq-chat session file (or a corrupt one)") from None
        if meta.get("version") != SESSION_VERSION:
            raise SessionFileError(f"{path}: session file version {meta.get('version')} is not supported")
        if meta["fingerprint"] != fingerprint(self.model):
            raise SessionFileError(
                f"{path}: saved with another model ({meta['model'] or 'unknown'}: "
                f"{meta['fingerprint']}); this session runs {self.model_name or 'a model'} "
                f"({fingerprint(self.model)})"
            )
        mine = json.loads(self.config.to_json())
        if meta["config"] != mine:
            diff = ", ".join(
                f"{k}: {meta['config'].get(k)} vs {mine.get(k)}"
                for k in sorted(mine)
                if k != "name" and meta["config"].get(k) != mine.get(k)
            )
            hint = (
                f"switch with /kv {meta['kv']} first"
                if meta["kv"] != self.config.name
                else "start tq-chat with the same --kv-window / --kv-boundary-layers"
            )
            raise SessionFileError(
                f"{path}: saved with KV preset {meta['kv']!r}, this session uses "
                f"{self.config.name!r} (saved vs current: {diff}); {hint}"
            )
        if meta["max_kv_size"] != self.max_kv_size:
            raise SessionFileError(
                f"{path}: saved with --max-kv-size {meta['max_kv_size']}, this session uses {self.max_kv_size}"
            )
        try:
            cache = tq_mlx.load_prompt_cache(path, config=self.config, group=self.group)
        except (tq_mlx.CacheStateError, ValueError, KeyError) as e:
            raise SessionFileError(f"{path}: {e}") from None
        want = [type(c).__name__ for c in self._new_cache()]
        if [type(c).__name__ for c in cache] != want:
            raise SessionFileError(
                f"{path}: the saved cache's layers do not match this model and settings "
                f"({len(cache)} layers saved, {len(want)} expected)"
            )
        segments = [(t, n) for t, n in meta["segments"]]
        if _offset(cache) is not None and _offset(cache) != sum(n for _, n in segments):
            raise SessionFileError(
                f"{path}: corrupt session: the cache holds {_offset(cache)} tokens, "
                f"the messages {sum(n for _, n in segments)}"
            )
        self.cache, self.segments = cache, segments
        self.system, self.messages, self.turns = meta["system"], meta["messages"], meta["turns"]
        return path

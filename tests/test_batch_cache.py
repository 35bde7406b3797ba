"""BatchTurboQuantKVCache: mlx-lm's batch protocol on compressed caches, checked against single caches.

Each sequence of a batch must be stored exactly as it would be alone: merge/extract/filter/extend
round trips give back the same state, bit for bit; a decode step stored for all rows at once leaves
each row as a single cache's decode step would; attention on the batch equals each row's own."""

import copy

import mlx.core as mx
import numpy as np
import pytest

import tq_mlx
from tq_mlx import BatchTurboQuantKVCache, TurboQuantKVCache
from tq_mlx.attention import attention
from tq_mlx.batch_attention import batch_attention
from tq_mlx.sharding import Shard

H, D = 2, 64


def rand(shape, seed):
    return mx.random.normal(shape, key=mx.random.key(seed))


def single(config="k4v4", T=40, seed=0, steps=0, max_size=None, keep=0, shard=None, rope=None, **overrides):
    """A cache after a T-token prefill (with its attention call) and `steps` decode steps."""
    cfg = tq_mlx.resolve_config(config, **overrides)
    c = TurboQuantKVCache(cfg, max_size=max_size, keep=keep, shard=shard, rope=rope)
    if T:
        k, v = rand((1, H, T, D), seed), rand((1, H, T, D), seed + 1)
        mask = c.make_mask(T) if max_size else "causal"
        c.update_and_fetch(k, v)
        attention(c, rand((1, 3 * H, T, D), seed + 2), D**-0.5, mask)
    for i in range(steps):
        c.update_and_fetch(rand((1, H, 1, D), seed + 10 + i), rand((1, H, 1, D), seed + 50 + i))
        attention(c, rand((1, 3 * H, 1, D), seed + 90 + i), D**-0.5)
    return c


def assert_same(a: TurboQuantKVCache, b: TurboQuantKVCache):
    """Equal states: settings, counters, every stored array and calibration, bit for bit."""
    sa, sb = a.state, b.state
    assert sa["tq_meta"] == sb["tq_meta"]
    assert sorted(sa) == sorted(sb)
    for k in sa:
        if k != "tq_meta":
            assert sa[k].dtype == sb[k].dtype and mx.array_equal(sa[k], sb[k]).item(), k


def step_both(batch, caches, seed, masked=False):
    """One decode step on the batch and on each single cache (with their own masks if `masked`): equal outputs."""
    B = len(caches)
    k, v, q = rand((B, H, 1, D), seed), rand((B, H, 1, D), seed + 40), rand((B, 3 * H, 1, D), seed + 80)
    mask = batch.make_mask(1) if masked else None  # asked for before storing, as a model does
    batch.update_and_fetch(k, v)
    got = batch_attention(batch, q, D**-0.5, mask, None, *batch.handed)
    for b, c in enumerate(caches):
        mask = c.make_mask(1) if masked else None
        c.update_and_fetch(k[b : b + 1], v[b : b + 1])
        want = attention(c, q[b : b + 1], D**-0.5, mask)
        np.testing.assert_allclose(np.array(got[b : b + 1]), np.array(want), rtol=1e-5, atol=1e-6)


MIXED = {  # one of each state a sequence can be in (one config: caches of a batch share it)
    "empty": dict(T=0),
    "exact": dict(T=9),
    "calibrated, decoded": dict(T=60, steps=3),
    "calibrated at prefill": dict(T=45),
}


def mixed():
    return [single(seed=10 * i, quant_start=16, fp_window=8, **kw) for i, kw in enumerate(MIXED.values())]


def test_merge_then_extract_gives_back_each_cache():
    caches = mixed()
    batch = TurboQuantKVCache.merge(caches)
    assert isinstance(batch, BatchTurboQuantKVCache) and batch.batch == len(caches)
    assert batch.offset.tolist() == [c.offset for c in caches]
    for i, c in enumerate(caches):
        assert_same(batch.extract(i), c)


def test_filter_keeps_the_chosen_sequences_in_their_new_order():
    caches = mixed()
    batch = TurboQuantKVCache.merge(caches)
    batch.filter([3, 1])
    assert batch.batch == 2
    assert_same(batch.extract(0), caches[3])
    assert_same(batch.extract(1), caches[1])


def test_extend_appends_the_other_batch():
    caches = mixed()
    batch = TurboQuantKVCache.merge(caches[:1])
    batch.extend(TurboQuantKVCache.merge(caches[1:]))
    for i, c in enumerate(caches):
        assert_same(batch.extract(i), c)


def test_a_deep_copy_is_independent():
    caches = mixed()[1:]
    batch = TurboQuantKVCache.merge(caches)
    twin = copy.deepcopy(batch)
    twin.update_and_fetch(rand((3, H, 1, D), 1), rand((3, H, 1, D), 2))
    twin.filter([0])
    for i, c in enumerate(caches):
        assert_same(batch.extract(i), c)


def test_a_decode_step_leaves_each_row_as_a_single_decode_step_would():
    caches = mixed()[1:]
    batch = TurboQuantKVCache.merge([copy.deepcopy(c) for c in caches])
    for step in range(3):
        step_both(batch, caches, step)
    for b, c in enumerate(caches):
        assert_same(batch.extract(b), c)


def test_a_row_reaching_quant_start_during_decode_calibrates_on_its_own_tokens():
    caches = [single(T=15, quant_start=16, seed=3), single(T=40, quant_start=16, seed=4)]
    batch = TurboQuantKVCache.merge([copy.deepcopy(c) for c in caches])
    step_both(batch, caches, 5)
    for b, c in enumerate(caches):
        assert_same(batch.extract(b), c)
    assert batch.extract(0).calibration_length == 16


def test_a_right_padded_prefill_stores_and_attends_only_each_rows_real_tokens():
    """mlx-lm's prompt batch: rows padded on the right to one length, `prepare(lengths=...)` says which."""
    lengths = [5, 12, 9]
    caches = [single(T=0) for _ in lengths]
    batch = TurboQuantKVCache.merge([copy.deepcopy(c) for c in caches])
    batch.prepare(lengths=lengths, right_padding=[12 - n for n in lengths])
    k, v, q = rand((3, H, 12, D), 1), rand((3, H, 12, D), 2), rand((3, 3 * H, 12, D), 3)
    batch.update_and_fetch(k, v)
    got = batch_attention(batch, q, D**-0.5, batch.make_mask(12), None, *batch.handed)
    batch.finalize()
    assert batch.offset.tolist() == lengths
    for b, (c, n) in enumerate(zip(caches, lengths)):
        c.update_and_fetch(k[b : b + 1, :, :n], v[b : b + 1, :, :n])
        want = attention(c, q[b : b + 1, :, :n], D**-0.5, "causal")
        np.testing.assert_allclose(np.array(got[b : b + 1, :, :n]), np.array(want), rtol=1e-5, atol=1e-6)
        assert not np.array(got[b, :, n:]).any()  # padding positions: zeros
        assert_same(batch.extract(b), c)


def test_sliding_window_rows_wrap_their_rings_as_single_caches_do():
    kw = dict(max_size=24, keep=2, quant_start=8, fp_window=4)
    caches = [single(T=30, seed=1, **kw), single(T=10, seed=2, **kw), single(T=20, seed=3, steps=7, **kw)]
    batch = TurboQuantKVCache.merge([copy.deepcopy(c) for c in caches])
    for step in range(20):  # every ring fills and wraps
        step_both(batch, caches, step, masked=True)
    for b, c in enumerate(caches):
        assert_same(batch.extract(b), c)


@pytest.mark.parametrize("config", ["k4v4-fast", "2.5", "hqmq-s24r3", "fp16"])
def test_every_codec_kind_batches_with_its_own_calibration_per_row(config):
    caches = [single(config, T=40, seed=s, quant_start=16, fp_window=4) for s in (1, 2)]
    batch = TurboQuantKVCache.merge([copy.deepcopy(c) for c in caches])
    step_both(batch, caches, 5)
    for b, c in enumerate(caches):
        assert_same(batch.extract(b), c)


def rope_map():
    import mlx.nn as nn

    from tq_mlx.rope_mean import probe

    return probe(nn.RoPE(D, base=10000.0), D)


@pytest.mark.parametrize("config", ["k4v4-rope", "k4v4-fast-rope", "k3v3-rope"])
def test_rope_centred_rows_batch_each_with_its_own_mean_and_positions(config):
    """Rows at other positions (a block opening in one, not another), one still exact, one calibrating mid-step."""
    rmap = rope_map()
    kw = dict(quant_start=16, fp_window=4, rope=rmap)
    caches = [single(config, T=T, seed=s, steps=n, **kw) for T, s, n in ((40, 1, 0), (57, 2, 3), (9, 3, 0), (15, 4, 0))]
    assert caches[0].k_codec.rope_mean is not None
    batch = TurboQuantKVCache.merge([copy.deepcopy(c) for c in caches])
    for step in range(20):  # row 1 crosses positions 64 and 80: blocks open
        step_both(batch, caches, step)
    for b, c in enumerate(caches):
        assert_same(batch.extract(b), c)


def test_rope_centred_sliding_window_rows_batch_through_their_wrapping_rings():
    kw = dict(max_size=24, keep=2, quant_start=8, fp_window=4, rope=rope_map())
    caches = [single("k4v4-rope", T=T, seed=s, steps=n, **kw) for T, s, n in ((30, 1, 0), (10, 2, 0), (20, 3, 7))]
    batch = TurboQuantKVCache.merge([copy.deepcopy(c) for c in caches])
    for step in range(40):
        step_both(batch, caches, step, masked=True)
    for b, c in enumerate(caches):
        assert_same(batch.extract(b), c)


def test_rows_whose_rope_means_turn_in_other_blocks_do_not_batch():
    caches = [single("k4v4-rope", T=40, seed=s, quant_start=16, rope=rope_map()) for s in (1, 2)]
    caches[1].k_codec.rope_block = 1  # as a cache saved before blocks
    batch = TurboQuantKVCache.merge(caches)
    with pytest.raises(NotImplementedError, match="blocks of another size"):
        batch_attention(batch, *_step(batch))


def _step(batch):
    B = batch.batch
    batch.update_and_fetch(rand((B, H, 1, D), 1), rand((B, H, 1, D), 2))
    return rand((B, 3 * H, 1, D), 3), D**-0.5, None, None, *batch.handed


def test_a_short_batch_attends_exactly_like_mlx_lms_fp_batch_cache():
    from mlx_lm.models.cache import KVCache

    ks = [rand((1, H, n, D), n) for n in (3, 7)]
    ours = TurboQuantKVCache.merge([TurboQuantKVCache("k4v4") for _ in ks])
    fp = KVCache.merge([KVCache() for _ in ks])
    for c in (ours, fp):
        c.prepare(lengths=[3, 7], right_padding=[4, 0])
    both = mx.concatenate([mx.pad(ks[0], [(0, 0), (0, 0), (0, 4), (0, 0)]), ks[1]], axis=0)
    q = rand((2, 3 * H, 7, D), 9)
    ours.update_and_fetch(both, both)
    batch_attention(ours, q, 0.125, ours.make_mask(7), None, *ours.handed)
    fp.update_and_fetch(both, both)
    for c in (ours, fp):
        c.finalize()
    step, q1 = rand((2, H, 1, D), 1), rand((2, 3 * H, 1, D), 2)
    mask = fp.make_mask(1)  # the model asks for the mask before the layers store
    k_fp, v_fp = fp.update_and_fetch(step, step)
    want = mx.fast.scaled_dot_product_attention(q1, k_fp, v_fp, scale=0.125, mask=mask)
    mask = ours.make_mask(1)
    ours.update_and_fetch(step, step)
    got = batch_attention(ours, q1, 0.125, mask, None, *ours.handed)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-6, atol=1e-6)


def test_a_tensor_parallel_ranks_batch_codes_with_its_global_heads():
    caches = [single(T=40, seed=s, quant_start=16, shard=Shard(1, 3, H)) for s in (1, 2)]
    batch = TurboQuantKVCache.merge([copy.deepcopy(c) for c in caches])
    step_both(batch, caches, 5)  # the rows' rotations are those of heads H.. 2H-1, not 0.. H-1
    with pytest.raises(ValueError, match="shard"):
        TurboQuantKVCache.merge([single(T=8), single(T=8, shard=Shard(1, 3, H))])


def test_caches_of_other_configs_do_not_merge():
    with pytest.raises(ValueError, match="share config"):
        TurboQuantKVCache.merge([TurboQuantKVCache("k4v4"), TurboQuantKVCache("k4v3")])
    with pytest.raises(ValueError, match="share config"):
        TurboQuantKVCache.merge([TurboQuantKVCache("k4v4", max_size=64), TurboQuantKVCache("k4v4")])


def test_chunked_attention_caches_are_refused_with_a_clear_error():
    with pytest.raises(NotImplementedError, match="chunked"):
        TurboQuantKVCache.merge([TurboQuantKVCache("k4v4", chunk_size=32) for _ in range(2)])


def test_trellis_caches_are_refused_with_a_clear_error():
    with pytest.raises(NotImplementedError, match="trellis.*batch with"):
        TurboQuantKVCache.merge([TurboQuantKVCache("k4v4-tcq") for _ in range(2)])


def test_a_mask_that_is_not_a_batch_mask_is_refused():
    batch = TurboQuantKVCache.merge([single(T=8), single(T=5)])
    batch.update_and_fetch(rand((2, H, 1, D), 1), rand((2, H, 1, D), 2))
    with pytest.raises(ValueError, match="batch masks"):
        batch_attention(batch, rand((2, 3 * H, 1, D), 3), 0.125, mx.zeros((1, 1, 1, 9)), None, *batch.handed)


def test_a_batch_cache_is_not_saved_as_such():
    batch = TurboQuantKVCache.merge([single(T=8)])
    with pytest.raises(NotImplementedError, match="merge"):
        batch.state = []

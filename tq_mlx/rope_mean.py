"""RoPE-aware key centring: the keys' mean taken before the rotary embedding.

Keys reach the cache after RoPE: k_t = R_t k'_t, R_t the layer's rotary map at
position t.  Pre-RoPE keys have a large constant part mu (on SmolLM2 the residual
k_t - R_t mu holds 42 % of the energy left by a static post-RoPE mean), which a
static mean cannot remove since R_t turns it with t.  The key codec then encodes
k_t - R_t mu and adds R_t mu back exactly in attention (`AtPositions`), so
scores are unchanged except for a smaller quantization error.

R_t is read off the model's own rope module (`probe`), as a `RopeMap`: every
coordinate i turns with one partner p(i) at angle t * phi_i and scale s_i,

    (R_t x)_j = s_j x_j cos(t phi_j) + s_p x_p sin(t phi_p),   p = p(j),

which covers mlx-lm's RoPE variants (traditional or half-split pairs, partial
dims, Llama-3 / YaRN / SuScaled frequencies and scales).  A module that is not
of that form (checked at many positions) gives None: static centring.

The mean is turned to the centre of each aligned block of `BLOCK` positions, R_c(t) mu with
c(t) = BLOCK * floor(t / BLOCK) + (BLOCK - 1) / 2, not to t itself: the decode kernel then adds one
term per block and head instead of one per key (an O(d) sum each), for most of the gain (SmolLM2 k4v4,
three texts: mean KL 0.0160 / 0.0152 / 0.0137 at blocks of 16 against 0.0140 / 0.0139 / 0.0111 turned
to every position and 0.0250 / 0.0234 / 0.0179 for the static mean).  block 1 is the exact form
(caches saved before blocks were introduced).
"""

from typing import NamedTuple

import mlx.core as mx
import numpy as np

BLOCK = 16  # positions per block of the turned mean (new caches; a saved cache keeps its own)
PRIOR_TOKENS = 8  # the fitted mean shrinks toward 0 as if from this many more tokens (calibration.PRIOR_TOKENS)
_PROBE = ((0, 64), (1000, 8), (30000, 8))  # (first position, count) where a probed map must match the module


class RopeMap(NamedTuple):
    """partner int32 (d,), angle float32 (d,) radians per position, scale float32 (d,).

    Made through `shared`: one object per distinct map in the process, so the layers of a model that turn
    alike hold one map (and one set of `tables`), counted once (`describe.cache_nbytes`)."""

    partner: mx.array
    angle: mx.array
    scale: mx.array

    def state(self) -> dict:
        return {"partner": self.partner, "angle": self.angle, "scale": self.scale}

    @classmethod
    def shared(cls, partner, angle, scale) -> "RopeMap":
        """The map with these values (int32, float32, float32 (d,)), the same object for the same values."""
        host = (np.asarray(partner, np.int32), np.asarray(angle, np.float32), np.asarray(scale, np.float32))
        key = b"".join(a.tobytes() for a in host)
        if key not in _MAPS:
            _MAPS[key] = cls(*(mx.array(a) for a in host))
        return _MAPS[key]

    @classmethod
    def from_state(cls, st: dict):
        """The map saved by `state()`, or None when st is empty."""
        if not st:
            return None
        if set(st) != {"partner", "angle", "scale"}:
            raise ValueError(f"a RoPE map holds partner, angle and scale; got {sorted(st)}")
        return cls.shared(
            *(
                np.array(st[k].astype(t))
                for k, t in (("partner", mx.int32), ("angle", mx.float32), ("scale", mx.float32))
            )
        )


_MAPS = {}  # the values' bytes -> RopeMap (RopeMap.shared)


class MapTables(NamedTuple):
    """What a map's users derive from it, made once per map (`tables`).
    host: (partner, angle, scale) as numpy (the host's turned means); pairs: (rp int32 (NP, 2), rang float32 (NP,),
    inv int32 (d,)) on the device, or None when the map is not in pairs (`kernel_pairs`): pair k is coordinates
    rp[k] = (i, p) turning by rang[k] and minus it, and inv[j] is where coordinate j sits in [i-terms | p-terms];
    pair_angles: rang on the host (the key of the reference path's [cos | sin] table)."""

    host: tuple
    pairs: tuple
    pair_angles: np.ndarray

    def arrays(self) -> list:
        return [*self.host, *(self.pairs or ()), *([] if self.pair_angles is None else [self.pair_angles])]


_TABLES = {}  # id(RopeMap) -> (RopeMap, MapTables)


def _pair_list(partner: np.ndarray, angle: np.ndarray):
    """rp (NP, 2) int32: each pair (i, p(i)) once, lead i <= p; None when a pair's angles are not opposite or a
    lone coordinate turns (then the map is not in pairs)."""
    lead = [i for i in range(len(partner)) if partner[i] >= i]
    for i in lead:
        p = partner[i]
        if angle[p] != (angle[i] if p == i else -angle[i]) or (p == i and angle[i] != 0):
            return None
    return np.array([[i, partner[i]] for i in lead], np.int32)


def tables(rmap: RopeMap) -> MapTables:
    """The map's MapTables, made once per map object."""
    hit = _TABLES.get(id(rmap))
    if hit is not None and hit[0] is rmap:
        return hit[1]
    host = (np.array(rmap.partner), np.array(rmap.angle, np.float32), np.array(rmap.scale, np.float32))
    rp = _pair_list(*host[:2])
    pairs = rang = None
    if rp is not None:
        NP = len(rp)
        inv = np.empty(len(host[0]), np.int32)
        inv[rp[:, 1]] = NP + np.arange(NP)
        inv[rp[:, 0]] = np.arange(NP)  # a lone coordinate (i = p) is its i-term
        rang = host[1][rp[:, 0]].copy()
        pairs = (mx.array(rp), mx.array(rang), mx.array(inv))
    out = MapTables(host, pairs, rang)
    _TABLES[id(rmap)] = (rmap, out)
    return out


def positions(start: int, n: int) -> mx.array:
    """start .. start + n - 1 as int32 (1, 1, n)."""
    return (mx.arange(n, dtype=mx.int32) + start)[None, None]


def centres(pos: mx.array, block: int = 1) -> mx.array:
    """Where the mean is turned to for positions pos (int): the centre of each one's block, float32."""
    p = pos.astype(mx.float32)
    return p if block == 1 else mx.floor(p / block) * block + (block - 1) / 2


def _phases(angle: mx.array, pos: mx.array, block: int = 1):
    """cos and sin of c(t) * angle for the positions pos (B, 1, n): float32 (B, 1, n, d) each."""
    a = centres(pos, block)[..., None] * angle
    return mx.cos(a), mx.sin(a)


def rotate_at(rmap: RopeMap, mu: mx.array, pos: mx.array, block: int = 1) -> mx.array:
    """R_c(t) mu at positions pos (B or 1, 1, n): mu (H, d), or (B, H, d) one per batch row -> float32 (B, H, n, d)."""
    c, s = _phases(rmap.angle, pos, block)
    sc = (rmap.scale * mu).reshape(-1, mu.shape[-2], 1, mu.shape[-1])  # (1 or B, H, 1, d)
    return sc * c + mx.take(sc, rmap.partner, axis=-1) * mx.take(s, rmap.partner, axis=-1)


def rotate(rmap: RopeMap, mu: mx.array, start: int, n: int, block: int = 1) -> mx.array:
    """R_c(t) mu for t = start .. start + n - 1: mu (H, d) -> float32 (1, H, n, d)."""
    return rotate_at(rmap, mu, positions(start, n), block)


def fit_mean(rmap: RopeMap, x: mx.array, start: int = 0, block: int = 1) -> mx.array:
    """The pre-RoPE mean mu minimising sum_t |x_t - R_c(t) mu|^2 over keys x (B, H, T, d) at positions
    start .. start + T - 1, shrunk toward 0: float32 (H, d).  R^T x_t is the same formula run backwards."""
    B, _, T, _ = x.shape
    c, s = _phases(rmap.angle, positions(start, T), block)
    x = x.astype(mx.float32)
    xp = mx.take(x, rmap.partner, axis=-1)
    back = rmap.scale * (x * c + xp * s)  # (R_t^T x_t)_i = s_i (x_i cos(t phi_i) + x_p sin(t phi_i))
    return back.sum(axis=(0, 2)) / (B * T * rmap.scale**2 + PRIOR_TOKENS)


def probe(rope, d: int):
    """The RopeMap of a rope module (called as rope(x, offset=t0) on (B, H, T, d), as mlx-lm's are), or None
    when it is not a per-pair rotation with fixed angles and scales (checked at several positions)."""
    try:
        eye = mx.eye(d)[None, :, None, :]  # (1, d, 1, d): basis vector e_i as head i
        at = {t0: rope(mx.broadcast_to(eye, (1, d, n, d)), offset=t0) for t0, n in _PROBE}
        y = np.array(at[0].astype(mx.float32), dtype=np.float64)[0]  # (d inputs, T, d outputs)
    except Exception:
        return None
    scale = np.linalg.norm(y[:, 0], axis=-1)
    if not np.all(scale > 0):
        return None
    one = y[:, 1] / scale[:, None]  # input i at position 1
    far = np.abs(np.array(at[_PROBE[-1][0]].astype(mx.float32), dtype=np.float64)[0]).max(axis=1)
    off = (far + np.abs(one)) * (1 - np.eye(d))  # slow pairs turn visibly only far out
    partner = np.where(off.max(axis=-1) > 1e-6, off.argmax(axis=-1), np.arange(d))
    angle = np.arctan2(one[np.arange(d), partner] * (partner != np.arange(d)), one[np.arange(d), np.arange(d)])
    if np.any(partner[partner] != np.arange(d)):
        return None
    rmap = RopeMap.shared(partner, angle, scale)
    eye_mu = mx.eye(d)
    for t0, n in _PROBE:
        want = np.array(at[t0].astype(mx.float32))[0]
        got = np.array(rotate(rmap, eye_mu, t0, n))[0]
        if not np.allclose(got, want, atol=2e-3 * max(1.0, float(scale.max()))):
            return None
    return rmap


def kernel_pairs(rmap: RopeMap, mu: mx.array):
    """The mean as tq_rope_bias reads it: (ra float32 (CH, NP, 2): a_i = s_i mu_i, a_p = s_p mu_p per head (CH = H, or
    B * H for a batch's means (B, H, d), row b * H + h) and pair (i, p), a_p = 0 for a coordinate on its own (it does
    not turn); rp int32 (NP, 2): the pairs; rang float32 (NP,): the angle of i, p turning by minus it), or None when
    the map is not in such pairs (a coordinate turning on its own, or a pair whose angles are not opposite).
    rp and rang are the map's (`tables`), shared by every layer with this map."""
    pairs = tables(rmap).pairs
    if pairs is None:
        return None
    rp = pairs[0]
    a = (rmap.scale * mx.array(mu).astype(mx.float32)).reshape(-1, mu.shape[-1])
    pair = (rp[:, 0] != rp[:, 1]).astype(mx.float32)
    ra = mx.stack([a[:, rp[:, 0]], a[:, rp[:, 1]] * pair], axis=-1)
    return ra, rp, pairs[1]


def _pair_means(ra: mx.array, n_heads: int):
    """a_i and a_p of kernel_pairs' ra (CH, NP, 2), CH = H or B * H, each as (1 or B, H, 1, NP)."""
    ra = ra.reshape(-1, n_heads, 1, *ra.shape[-2:])
    return ra[..., 0], ra[..., 1]


def turn_pairs(ra: mx.array, n_heads: int, rmap: RopeMap, pos: mx.array, block: int = 1) -> mx.array:
    """R_c(t) mu from the mean in pairs (kernel_pairs' ra, (CH, NP, 2), CH = H or B * H) at positions pos
    (B or 1, 1, n) -> float32 (B, H, n, d): rotate_at without the mean itself (i-term a_i cos - a_p sin,
    p-term a_p cos + a_i sin)."""
    rp, rang, inv = tables(rmap).pairs
    ai, ap = _pair_means(ra, n_heads)
    ph = centres(pos, block)[..., None] * rang  # (B, 1, n, NP)
    c, s = mx.cos(ph), mx.sin(ph)
    return mx.take(mx.concatenate([ai * c - ap * s, ap * c + ai * s], axis=-1), inv, axis=-1)


def turned_mean(codec, position) -> mx.array:
    """R_c mu for one position (an int: (H, d) float32), or one per batch row (a list: (B, H, d), row b at
    position[b] with its own mean), kept on the codec for its blocks (a decode step re-uses them).  Made on the
    host from the codec's `rope_mu` and the map's host tables, so a decode step that opens a block adds no launch
    and no sync."""
    blk = codec.rope_block
    rows = isinstance(position, (list, tuple))
    key = tuple(int(p) // blk for p in position) if rows else int(position) // blk
    memo = getattr(codec, "_turned", None)
    if memo is None or memo[0] != key:
        partner, angle, scale = tables(codec.rope_map).host
        a = scale * codec.rope_mu.astype(np.float32)
        pos = np.array(position if rows else [position], np.float32)
        c = pos if blk == 1 else np.floor(pos / blk) * blk + (blk - 1) / 2
        phase = c.reshape(-1, 1, 1) * angle  # (rows, 1, d)
        m = a * np.cos(phase) + a[..., partner] * np.sin(phase[..., partner])
        memo = codec._turned = (key, mx.array((m if rows else m[0]).astype(np.float32)))
    return memo[1]


_TRIG = {}  # (angles, block) -> float32 (capacity, 2 NP): [cos | sin] of c_b * angle per block b, shared by layers


def _trig(rang: np.ndarray, blk: int, need: int) -> mx.array:
    """[cos | sin](c_b w) for blocks b = 0 .. need - 1 at least: float32 (capacity, 2 NP), computed on the host in
    float64 (positions far out keep their phase) when the capacity doubles, so a decode step adds no sync."""
    key = (rang.tobytes(), blk)
    have = _TRIG.get(key)
    if have is None or have.shape[0] < need:
        cap = max(64, 1 << (need - 1).bit_length())
        c = np.arange(cap, dtype=np.float64) * blk + (blk - 1) / 2
        ph = c[:, None] * rang.astype(np.float64)[None]
        have = _TRIG[key] = mx.array(np.concatenate([np.cos(ph), np.sin(ph)], axis=1).astype(np.float32))
    return have


def _block_scores(codec, q: mx.array, q_rot: mx.array, fb: int, b0: int, b1: int) -> mx.array:
    """<q, R_c mu> for blocks 0 .. fb - 1 then b0 .. b1 - 1: q (B, H, M, d) and q_rot = codec.rotate_query(q) ->
    float32 (B, H, M, blocks).
    In pairs (rope_mean.kernel_pairs, as tq_rope_bias): sum over pairs of A cos(c w) + B sin(c w), with
    A = a_i q_i + a_p q_p and B = a_i q_p - a_p q_i from the query in the original domain; else the turned
    means moved to the stored domain (any RopeMap)."""
    c, blk = codec, codec.rope_block
    if c.kernel_pairs() is None:
        ids = np.concatenate([np.arange(fb), np.arange(b0, b1)]).astype(np.int32)
        table = c.to_stored(rotate_at(c.rope_map, c.rope_mean, mx.array(ids * blk)[None, None], blk))
        return q_rot @ mx.swapaxes(table, -1, -2)
    ra, rp, _ = c.kernel_pairs()
    ai, ap = _pair_means(ra, n_heads=c.n_heads)  # a lone coordinate's B term meets sin(0) = 0
    qi, qp = mx.take(q, rp[:, 0], axis=-1), mx.take(q, rp[:, 1], axis=-1)  # (B, H, M, NP)
    ab = mx.concatenate([ai * qi + ap * qp, ai * qp - ap * qi], axis=-1)
    trig = _trig(tables(c.rope_map).pair_angles, blk, b1)
    rows = trig[b0:b1] if fb == 0 else mx.concatenate([trig[:fb], trig[b0:b1]])
    return ab @ rows.T


class RingSlots(NamedTuple):
    """Where the code slots of a ring (a sliding layer's RoPE-centred keys) sit in position, per batch row b: slots
    0 .. keep - 1 hold positions 0 .. keep - 1 (the first tokens, kept); the others hold consecutive positions, the
    oldest, base[b], in slot keep + start[b], wrapping from slot size - 1 back to slot keep.  So a ring holds no
    position per slot: each follows from its slot."""

    keep: int
    size: int
    start: tuple
    base: tuple

    @classmethod
    def of(cls, rows, ordered: bool = False) -> "RingSlots":
        """rows: (store, next) per batch row, its ring store (TokenStore or a batch's RowStore) and the position
        its next code will take; ordered: the slots as `store.ordered()` lays them out (start 0)."""
        size, keep = rows[0][0].ring
        start = tuple(0 if ordered else st.start for st, _ in rows)
        return cls(keep, size, start, tuple(nxt - max(st.length - keep, 0) for st, nxt in rows))

    def offsets(self) -> np.ndarray:
        """int32 (B, 4) per row [keep, split, off, wrap]: slot t holds t (t < keep), else t + off, plus wrap if
        t < split (as tq_decode computes it)."""
        rows = [
            [self.keep, self.keep + s, b - self.keep - s, self.size - self.keep] for s, b in zip(self.start, self.base)
        ]
        return np.array(rows, np.int32)

    def positions(self, n: int) -> np.ndarray:
        """The positions of slots 0 .. n - 1: int32 (B, 1, n), on the host."""
        keep, split, off, wrap = self.offsets().T[:, :, None]
        t = np.arange(n, dtype=np.int32)[None]
        return np.where(t < keep, t, t + off + np.where(t < split, wrap, 0)).astype(np.int32)[:, None]


class AtPositions:
    """A RoPE-centred key codec bound to positions: token t of an encoding at position start + t, `start` an int,
    or one per batch row (a list: a batch's stacked codec).  ring: the codes are a ring's (RingSlots: slots are not
    in position order), and reading takes each slot's position from it; span (first, last, front) then bounds
    them: every slot holds one of the `front` first positions (a ring's kept tokens) or a position in
    first .. last.  Every other attribute is the codec's."""

    def __init__(self, codec, start, ring: RingSlots = None, span=None):
        self.codec, self.start, self.ring, self.span = codec, start, ring, span
        self.per_row = isinstance(start, (list, tuple))
        self.starts = list(start) if self.per_row else [start]

    def __getattr__(self, name):
        return getattr(self.codec, name)

    def positions(self, n: int) -> np.ndarray:
        """The position of each of the first n slots: int32 (B or 1, 1, n), on the host (no sync)."""
        if self.ring is not None:
            return self.ring.positions(n)
        return np.array(self.starts, np.int32)[:, None, None] + np.arange(n, dtype=np.int32)

    def turned(self, n: int) -> mx.array:
        """R_t mu in the stored domain for the first n slots: float32 (B or 1, H, n, d)."""
        c = self.codec
        return c.to_stored(turned(c, mx.array(self.positions(n))))

    def encode(self, x: mx.array) -> dict:
        c, n = self.codec, x.shape[2]
        if n == 1:  # a decode step: its block's mean, taken off by the encode kernel where it runs
            out = c.encode_centred(x, turned_mean(c, self.start))
        else:
            if self.per_row:
                raise ValueError("a batch's codec encodes one token per row at a time")
            out = c.encode_centred(x.astype(mx.float32) - turned(c, positions(self.start, n)))
        return out

    def rotate_query(self, q: mx.array) -> mx.array:
        """The codec's, keeping q: `mean_scores` then reads it as it is, instead of rotating back."""
        q_rot = self.codec.rotate_query(q)
        self._query = (q, q_rot)
        return q_rot

    def decode_stored(self, enc: dict) -> mx.array:
        y = self.codec.decode_stored(enc)
        return y + self.turned(y.shape[2])

    def decode(self, enc: dict) -> mx.array:
        return self.codec.unrotate(self.decode_stored(enc))

    def scores(self, q_rot: mx.array, enc: dict) -> mx.array:
        s = self.codec.scores(q_rot, enc)
        return s + self.mean_scores(q_rot, enc, s.shape[-1])

    def mean_scores(self, q_rot: mx.array, enc: dict, n: int) -> mx.array:
        """<R q, R_c mu> for the n slots of enc: q_rot (B, H, M, d) -> float32 (B, H, M, n).  One term per block of
        positions, for the blocks the slots can be in (as tq_rope_bias), expanded to the slots."""
        blk = self.codec.rope_block
        if self.span is not None:
            first, last, front = self.span
        elif self.ring is not None:
            raise ValueError("reading a ring's RoPE-centred codes needs the span of their positions")
        else:
            first, last, front = min(self.starts), max(self.starts) + n - 1, 0
        fb = -(-front // blk)  # blocks of the front tokens, then blocks b0 .. b1 - 1
        b0 = max(first // blk, fb)
        b1 = max(last // blk + 1, b0)
        kept = getattr(self, "_query", None)
        q = kept[0] if kept is not None and kept[1] is q_rot else self.codec.unrotate_query(q_rot)
        term = _block_scores(self.codec, q, q_rot, fb, b0, b1)  # (B, H, M, fb + b1 - b0)
        if fb == 0 and self.ring is None and not self.per_row:  # one row's slots in position order
            off = self.start - b0 * blk
            return (term if blk == 1 else mx.repeat(term, blk, axis=-1))[..., off : off + n]
        bi = self.positions(n) // blk  # each slot's column of term, on the host
        idx = mx.array(np.clip(np.where(bi < fb, bi, bi - b0 + fb), 0, max(term.shape[-1] - 1, 0)))[:, :, None]
        return mx.take_along_axis(term, mx.broadcast_to(idx, (*term.shape[:3], n)), axis=-1)

    def accumulate(self, p: mx.array, enc: dict) -> mx.array:
        """The keys as values (MLA's latent attention): sum_t p_t (y~_t + R_t mu) in the stored domain."""
        return self.codec.accumulate(p, enc) + p @ self.turned(p.shape[-1])


def turned(codec, pos: mx.array) -> mx.array:
    """A RoPE-centred codec's R_c(t) mu at positions pos (B or 1, 1, n): float32 (B, H, n, d), from its mean in
    pairs where the map is in pairs, else from the mean and the map."""
    pairs = codec.kernel_pairs()
    if pairs is None:
        return rotate_at(codec.rope_map, codec.rope_mean, pos, codec.rope_block)
    return turn_pairs(pairs[0], codec.n_heads, codec.rope_map, pos, codec.rope_block)


def at(codec, start, ring: RingSlots = None, span=None):
    """codec bound to positions from `start` (see AtPositions) when it is RoPE-centred, else codec itself."""
    if getattr(codec, "rope_map", None) is None:
        return codec
    return AtPositions(codec, start, ring, span)

// TurboQuant decode attention (one query token) as partial softmax sums per key block.
// Template: QT (query dtype), NT (norm dtype), D (multiple of 8), KB / VB (K / V code bits, 1..8), KL / VL
//           (0: Lloyd-Max codes, the code indexes the codebook; else trellis codes, KB / VB <= 4, indexed by the
//           KL / VL-bit window ending with the code, tq_common.h),
//           G (query heads per KV head), GH (query heads per threadgroup: 1, 2 or 4), ROT (0: Hadamard,
//           `qmap` (CH, D) scales q before the unnormalised transform; 1: dense, q' = qmap[h] q), RB (0, or
//           RoPE-centred keys: positions per block of the turned key mean, whose term `kf` holds), RPOS
//           (RB > 0: 0, code slot t at position S + t; 1, a sliding window's ring, at a position kring gives).
// Inputs:  q (B*H*G*D) QT raw queries; scale (float); qmap (CH, D) or (CH, D, D); kmr (CH, D) f32 key mean in
//          the stored domain (CH = H, or B*H when each batch row has codecs of its own: row b*H + h);
//          kc (B, H, cap, WK) u32, kn (B, H, cap) NT, vc (B, H, cap, WV) u32, vn (B, H, cap) NT: the code
//          store's full buffers; kcb (2^KB or 2^KL), vcb (2^VB or 2^VL) f32 codebooks or trellis tables; sk, sv
//          (B, H, SC, D) fp16 sink tokens; wk, wv (B, H, RC, D) fp16 window ring; ek, ev (B, H, EC, D) exact
//          tokens (a batch row not yet calibrated; any float type); lens int32 (LB, 4), LB = B or 1 (shared):
//          per batch row [T, S, R, E] coded, sink, window and exact tokens; kf (B*H*G, NF) f32 (RB > 0): the
//          turned key mean's term per query row and block of RB positions (tq_rope_bias) from block FB0 on;
//          kring (B or 1, 4) int32 (RPOS): per batch row [keep, split, off, wrap], slot t at position t if
//          t < keep, else t + off, plus wrap if t < split (rope_mean.RingSlots); params int32 [BLK, FB0, FRONT]: keys
//          per block; kf's entry for position t: block t / RB - FB0, or with FRONT = 1 (a ring that keeps its
//          first tokens) block t / RB for t < TQ_ROPE_TILE * RB and TQ_ROPE_TILE + t / RB - FB0 after.
//          Counts are read at run time (no recompile per step); a row's slots past its counts are never read.
// Outputs: po (B*H*G, NB + 1, D), pm, pl (B*H*G, NB + 1) f32: for block b < NB the codes [b*BLK, b*BLK + BLK)
//          in the stored domain (pm includes the key-mean shift); block NB the fp16 and exact tokens in the
//          original domain.  Scores are in base 2 (q is scaled by log2 e): tq_merge combines them.
// Grid (32*NSG, B*H*HG, NB + 1) threads, threadgroup (32*NSG, 1, 1), HG = ceil(G / GH).
//
// Lanes: 8 dims per lane (one BITS-byte chunk of codes), LPK = 8/16/32 lanes per key (D <= 64 / 128 / 256),
// so each simdgroup step scores KPI = 32/LPK keys.  Per step a lane: loads its K chunk, unpacks 8 codes,
// looks them up, takes GH dot products of 8, reduce-scatters the GH sums over its key's lanes (it keeps
// one head's score), updates that head's online softmax (a rescale only when some lane sees a new max),
// broadcasts the GH weights and accumulates its 8 value dims for the GH heads.
//
// Instructions per key row, by hand, at G = GH = 4, D = 128, KB = VB = 4 (LPK = 16, KPI = 2: one simdgroup
// step covers 2 key rows; counts are per step, one instruction issuing for all 32 lanes):
//   K: row address 3, load 1, unpack 8 codes 15 (shift + and), codebook 8, norm load + convert 2  = 29
//   scores: 4 heads x 8 fma                                                                         = 32
//   reduce-scatter over 16 lanes: 2 stages (2 + 1 values: select 2, shuffle, add) + 2 plain stages  = 16
//   scale by norm 1, mask 1, softmax without rescale (compare, simd_any, branch, sub, exp2, add) 6  = 8
//   broadcast 4 weights (shuffle) and fold the V norm (mul)                                         = 8
//   V: row address 2, load 1, unpack 15, codebook 8, norm load + convert 2                          = 28
//   accumulate 4 heads x 8 dims fma                                                                 = 32
//   loop: add, compare, branch                                                                      = 3
//   total 156 per step = 78 per key row (target <= 80; fp16 sdpa_vector is bandwidth-bound at ~110).
// Ragged batches (per-row counts from `lens`, per-row constants) change only what is read before the loop
// (4 counts, the constants' row) and the fp16 block's source choice: the coded loop above is unchanged.
// The rescale path (a new running max somewhere in the simdgroup) costs ~45 more, taken rarely after the
// first keys of a block.
// RoPE-centred keys (RB > 0) add per step a load of kf for the lane's head, folded into the score by an fma
// instead of the norm's multiply, and the step of its index (an add: the lane's key moves NSG * KPI positions,
// FSTEP blocks, per step): +2 per step = +1 per key row (79), plus ~3.3 per key row in tq_rope_bias: ~82 in all.
// Where RB does not divide NSG * KPI (D = 256) the index is the block of the key's position (add, shift, add):
// +4 per step; a ring (RPOS) computes each slot's position (2 compares, 2 selects, 2 adds) and picks the front
// tile or the rest: +8 more.
// Trellis codes (KL = VL = 10 at KB = VB = 4) read windows instead of codes: per chunk a shuffle and a shift
// for the previous chunk's bits, 3 to join them, and 19 instead of 15 to cut 8 windows: +9 for K, +9 for V
// = 174 per step = 87 per key row.
    constexpr int NSG = 8;
    constexpr int NC = D / 8;  // 8-dim chunks per vector
    constexpr int LPK = NC <= 8 ? 8 : (NC <= 16 ? 16 : 32);
    constexpr int KPI = 32 / LPK;
    constexpr int WK = (D * KB + 31) / 32;
    constexpr int WV = (D * VB + 31) / 32;
    constexpr int HG = (G + GH - 1) / GH;
    constexpr int KN = 1 << (KL ? KL : KB);  // codebook or trellis table entries
    constexpr int VN = 1 << (VL ? VL : VB);
    constexpr int KLX = KL ? KL : KB + 1;  // window bits as a template argument (unused when KL = 0)
    constexpr int VLX = VL ? VL : VB + 1;

    threadgroup float kcb_tg[KN];
    threadgroup float vcb_tg[VN];
    threadgroup float qs_tg[GH * D];
    threadgroup float qr_tg[GH * D];
    threadgroup float qmk_tg[GH];
    threadgroup float red_m[NSG * GH];
    threadgroup float red_l[NSG * GH];
    threadgroup float red_o[NSG * D];

    const uint lane = thread_index_in_simdgroup;
    const uint sg = simdgroup_index_in_threadgroup;
    const uint tid = thread_index_in_threadgroup;
    const uint ntg = threads_per_threadgroup.x;
    const int H = kn_shape[1];
    const int cap = kn_shape[2];
    const int SC = sk_shape[2];
    const int RC = wk_shape[2];
    const int EC = ek_shape[2];
    const int bh = int(threadgroup_position_in_grid.y) / HG;
    const int hg = int(threadgroup_position_in_grid.y) % HG;
    const int h = bh % kmr_shape[0];  // the constants' row: the head, or the batch row's own head
    const int blk = int(threadgroup_position_in_grid.z);
    const int NB = int(threadgroups_per_grid.z) - 1;
    const bool fpb = blk == NB;  // uniform: the fp16 block
    const int lr = (bh / H) % lens_shape[0];
    const int T = lens[lr * 4];
    const int S = lens[lr * 4 + 1];
    const int R = lens[lr * 4 + 2];
    const int E = lens[lr * 4 + 3];
    const int BLK = params[0];
    const int NF = kf_shape[1];

    // 1. codebooks and the GH queries (scaled, base 2) into threadgroup memory
    for (uint i = tid; i < uint(KN); i += ntg) { kcb_tg[i] = kcb[i]; }
    for (uint i = tid; i < uint(VN); i += ntg) { vcb_tg[i] = vcb[i]; }
    for (uint i = tid; i < uint(GH * D); i += ntg) {
        const int g = hg * GH + int(i) / D;
        const float x = g < G ? float(q[(size_t(bh) * G + g) * D + int(i) % D]) * scale * TQ_LOG2E : 0.0f;
        qs_tg[i] = x;
        if (ROT == 0) { qr_tg[i] = x * qmap[h * D + int(i) % D]; }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // 2. queries into the stored domain (R (q / w)), and each head's key-mean shift <q', R mean_k>
    if (ROT == 0) {
        tq_hadamard_tg(qr_tg, D, GH, tid, ntg);
    } else {
        for (uint i = tid; i < uint(GH * D); i += ntg) {
            const int gg = int(i) / D;
            const int d = int(i) % D;
            float acc = 0.0f;
            for (int k = 0; k < D; ++k) { acc = fma(qmap[(size_t(h) * D + d) * D + k], qs_tg[gg * D + k], acc); }
            qr_tg[i] = acc;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    if (sg == 0) {
        for (int gg = 0; gg < GH; ++gg) {
            float acc = 0.0f;
            for (int d = int(lane); d < D; d += 32) { acc = fma(qr_tg[gg * D + d], kmr[h * D + d], acc); }
            acc = simd_sum(acc);
            if (lane == 0) { qmk_tg[gg] = acc; }
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // 3. lane roles: chunk c of key slot ks; after the reduce-scatter a lane keeps head `mine`,
    //    and lane src[gg] of each key slot holds head gg
    const int c = int(lane) % LPK;
    const int ks = int(lane) / LPK;
    const bool active = c < NC;
    const ushort prev_lane = ushort(ks * LPK + (c + NC - 1) % NC);  // trellis: the previous chunk's lane
    int mine = 0;
    int src[GH];
    for (int gg = 0; gg < GH; ++gg) { src[gg] = ks * LPK; }
    {
        int n = GH, off = LPK;
        while (n > 1) {
            n >>= 1;
            off >>= 1;
            if (int(lane) & off) { mine += n; }
            for (int gg = 0; gg < GH; ++gg) { src[gg] += (gg & n) ? off : 0; }
        }
    }
    float q8[GH][8];
    float o[GH][8];
    for (int gg = 0; gg < GH; ++gg) {
        for (int i = 0; i < 8; ++i) {
            q8[gg][i] = active ? (fpb ? qs_tg : qr_tg)[gg * D + 8 * c + i] : 0.0f;
            o[gg][i] = 0.0f;
        }
    }
    float m = TQ_NEG_BIG;
    float l = 0.0f;
    // RoPE-centred keys: this lane's row of kf (its head after the reduce-scatter) and the first block
    constexpr uint RBX = RB ? RB : 1;
    const size_t frow = (size_t(bh) * G + min(hg * GH + mine, G - 1)) * NF;
    const int front = params[2];
    const uint fsplit = front ? uint(TQ_ROPE_TILE * RBX) : 0u;
    const uint fshift = uint(front * TQ_ROPE_TILE - params[1]);  // added to t / RB past the front tile
    const int rrow = (kring_shape[0] > 1 ? int(bh / H) : 0) * 4;  // this row's ring layout (RPOS)
    const int rkeep = kring[rrow], rsplit = kring[rrow + 1], roff = kring[rrow + 2], rwrap = kring[rrow + 3];

    // 4. the block's keys: KPI per simdgroup step, simdgroups interleaved
    const int t0 = fpb ? 0 : blk * BLK;
    const int t1 = fpb ? S + R + E : min(T, t0 + BLK);
    // a lane's key moves NSG * KPI positions per step: with slots in position order (no RPOS) and RB dividing
    // that, its entry of kf moves FSTEP per step (kf's spare last column takes the last step's keys past t1)
    constexpr uint FSTEP = (RB && !RPOS && (NSG * KPI) % RBX == 0) ? uint(NSG * KPI) / RBX : 0u;
    uint fi = uint(frow) + uint(S + t0 + int(sg) * KPI + ks) / RBX + fshift;
    for (int base = t0 + int(sg) * KPI; base < t1; base += NSG * KPI) {
        const int t = base + ks;
        const bool valid = t < t1;
        const int tl = min(t, t1 - 1);  // loads stay in bounds; invalid keys are masked below
        float kv[8];
        float vv[8];
        float kscale = 1.0f;
        float vscale = 1.0f;
        if (fpb) {
            for (int i = 0; i < 8; ++i) {
                const int d = 8 * c + i;
                if (!active) {
                    kv[i] = 0.0f;
                    vv[i] = 0.0f;
                } else if (tl < S) {
                    kv[i] = float(sk[(size_t(bh) * SC + tl) * D + d]);
                    vv[i] = float(sv[(size_t(bh) * SC + tl) * D + d]);
                } else if (tl < S + R) {
                    kv[i] = float(wk[(size_t(bh) * RC + tl - S) * D + d]);
                    vv[i] = float(wv[(size_t(bh) * RC + tl - S) * D + d]);
                } else {
                    kv[i] = float(ek[(size_t(bh) * EC + tl - S - R) * D + d]);
                    vv[i] = float(ev[(size_t(bh) * EC + tl - S - R) * D + d]);
                }
            }
        } else {
            const size_t r = size_t(bh) * cap + tl;
            const uint2 xk = active ? tq_chunk_bits<KB>(kc + r * WK, c) : uint2(0u, 0u);
            const uint2 xv = active ? tq_chunk_bits<VB>(vc + r * WV, c) : uint2(0u, 0u);
            const uint2 wk8 = tq_trellis_bits<KB, KLX>(xk, KL ? simd_shuffle(xk.x, prev_lane) : 0u);
            const uint2 wv8 = tq_trellis_bits<VB, VLX>(xv, VL ? simd_shuffle(xv.x, prev_lane) : 0u);
            for (int i = 0; i < 8; ++i) {
                const uint ik = KL ? tq_window<KB, KLX>(wk8, i) : tq_code<KB>(xk, i);
                const uint iv = VL ? tq_window<VB, VLX>(wv8, i) : tq_code<VB>(xv, i);
                kv[i] = active ? kcb_tg[ik] : 0.0f;
                vv[i] = active ? vcb_tg[iv] : 0.0f;
            }
            kscale = float(kn[r]);
            vscale = float(vn[r]);
        }
        float s[GH];
        for (int gg = 0; gg < GH; ++gg) {
            float acc = 0.0f;
            for (int i = 0; i < 8; ++i) { acc = fma(q8[gg][i], kv[i], acc); }
            s[gg] = acc;
        }
        {  // reduce-scatter over this key's LPK lanes: the lane keeps the full score of head `mine`
            int n = GH, off = LPK;
            while (n > 1) {
                n >>= 1;
                off >>= 1;
                const bool up = (int(lane) & off) != 0;
                for (int i = 0; i < n; ++i) {
                    const float send = up ? s[i] : s[i + n];
                    const float keep = up ? s[i + n] : s[i];
                    s[i] = keep + simd_shuffle_xor(send, ushort(off));
                }
            }
            while (off > 1) {
                off >>= 1;
                s[0] += simd_shuffle_xor(s[0], ushort(off));
            }
        }
        const int pos = (RPOS && !fpb) ? (tl < rkeep ? tl : tl + roff + (tl < rsplit ? rwrap : 0)) : S + tl;
        const size_t fat = FSTEP ? size_t(fi) : frow + uint(pos) / RBX + (uint(pos) < fsplit ? 0u : fshift);
        const float fmean = (RB && !fpb) ? kf[fat] : 0.0f;
        fi += FSTEP;
        const float score = valid ? fma(s[0], kscale, fmean) : -INFINITY;
        if (simd_any(score > m)) {  // a new running max somewhere: rescale (uniform branch)
            const float mn = max(m, score);
            const float f = fast::exp2(m - mn);
            l *= f;
            m = mn;
            for (int gg = 0; gg < GH; ++gg) {
                const float fg = simd_shuffle(f, ushort(src[gg]));
                for (int i = 0; i < 8; ++i) { o[gg][i] *= fg; }
            }
        }
        const float p = fast::exp2(score - m);
        l += p;
        for (int gg = 0; gg < GH; ++gg) {
            const float pg = simd_shuffle(p, ushort(src[gg])) * vscale;
            for (int i = 0; i < 8; ++i) { o[gg][i] = fma(pg, vv[i], o[gg][i]); }
        }
    }

    // 5. combine the KPI key slots of the simdgroup (same chunk, same head ownership, other slot)
    for (int off = LPK; off < 32; off <<= 1) {
        const float mo = simd_shuffle_xor(m, ushort(off));
        const float lo = simd_shuffle_xor(l, ushort(off));
        const float mn = max(m, mo);
        const float f = fast::exp2(m - mn);
        const float fo = fast::exp2(mo - mn);
        for (int gg = 0; gg < GH; ++gg) {
            const float fg = simd_shuffle(f, ushort(src[gg]));
            const float fog = simd_shuffle(fo, ushort(src[gg]));
            for (int i = 0; i < 8; ++i) { o[gg][i] = o[gg][i] * fg + simd_shuffle_xor(o[gg][i], ushort(off)) * fog; }
        }
        l = l * f + lo * fo;
        m = mn;
    }

    // 6. combine the simdgroups through threadgroup memory, one head at a time, and write the partials
    for (int gg = 0; gg < GH; ++gg) {
        if (int(lane) == src[gg] && ks == 0) {
            red_m[sg * GH + gg] = m;
            red_l[sg * GH + gg] = l;
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int gg = 0; gg < GH; ++gg) {
        float M = TQ_NEG_BIG;
        for (int j = 0; j < NSG; ++j) { M = max(M, red_m[j * GH + gg]); }
        const float f = fast::exp2(red_m[sg * GH + gg] - M);
        if (ks == 0 && active) {
            for (int i = 0; i < 8; ++i) { red_o[sg * D + 8 * c + i] = o[gg][i] * f; }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        const int g = hg * GH + gg;
        if (g < G) {
            const size_t orow = (size_t(bh) * G + g) * (NB + 1) + blk;
            for (uint d = tid; d < uint(D); d += ntg) {
                float acc = 0.0f;
                for (int j = 0; j < NSG; ++j) { acc += red_o[j * D + d]; }
                po[orow * D + d] = acc;
            }
            if (tid == 0) {
                float L = 0.0f;
                for (int j = 0; j < NSG; ++j) { L += red_l[j * GH + gg] * fast::exp2(red_m[j * GH + gg] - M); }
                pm[orow] = fpb ? M : M + qmk_tg[gg];
                pl[orow] = L;
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }

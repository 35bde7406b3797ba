// The key-mean term of RoPE-centred keys (tq_mlx/rope_mean.py) for decode attention, per block of RB
// positions: f[r, b] = log2(e) * scale * <q_r, R_c mu_h>, c = RB * (b0 + b) + (RB - 1) / 2 the centre of
// block b0 + b, the mean mu_h of query row r's KV head turned there.  tq_decode adds f to the (base 2)
// scores of the block's keys, as the codes were encoded less R_c mu.
// Template: QT (query dtype), D, G (query heads per KV head), NP (pairs, <= D), RB (positions per block).
// Inputs:  q (B*H*G*D) QT raw queries; scale (float); ra (CH, NP, 2) f32: per head (or batch row and head,
//          row bh % CH) and pair (i, p) the scaled mean a_i = s_i mu_i, a_p = s_p mu_p; rp (NP, 2) int32 the
//          pair's coordinates (p = i: a coordinate on its own); rang (NP) f32: the angle coordinate i turns
//          by per position (p by minus it); params int32 [b0, NB, FRONT]: entry e = t * TB + k of tile t is
//          block b0 + e, or with FRONT = 1 (a ring that keeps its first tokens) tile 0 holds blocks 0 .. TB - 1
//          and entry e >= TB block b0 + e - TB.
//          With (R_c mu)_i = a_i cos(c w) - a_p sin(c w), (R_c mu)_p = a_p cos(c w) + a_i sin(c w):
//          <q, R_c mu> = sum over pairs of cos(c w) A + sin(c w) B, A = a_i q_i + a_p q_p, B = a_i q_p - a_p q_i
//          (a lone coordinate: A = a_i q_i, B = 0 as its angle is 0).
// Output:  f (B*H*G, NB + 1) f32: column NB is not written (tq_decode's last step may read it for keys past the end).
// Grid (256, B*H, ceil(NB / TB)) threads, threadgroup (256, 1, 1): a tile of TB blocks of one KV head.
//
// Instructions per key row, by hand, at G = 4, D = 128 (NP = 64), TB = 16 blocks of RB = 16 (256 keys):
//   pair phasors: 64 threads x (sincos twice ~60, 15 complex steps x 4 + 16 stores x 2) ~150, 2 simdgroups
//   sums: 64 (head, block) threads x 64 pairs x (2 loads + 2 fma) = 256 each, 2 simdgroups
//   = (300 + 512 + ~40 setup) / 256 keys ~ 3.3 per key row (tq_decode adds ~2 per key row to read it).
    constexpr int TB = TQ_ROPE_TILE;  // blocks per threadgroup
    threadgroup float2 w_tg[G * NP];  // (A, B) per head and pair
    threadgroup float2 z_tg[TB * NP];  // (cos, sin) of c w per block and pair

    const uint tid = thread_index_in_threadgroup;
    const uint ntg = threads_per_threadgroup.x;
    const int bh = int(threadgroup_position_in_grid.y);
    const int h = bh % ra_shape[0];
    const int NB = params[1];
    const int bt = int(threadgroup_position_in_grid.z) * TB;  // the tile's first entry
    const int nb = min(TB, NB - bt);
    const int front = params[2];
    const int first = (front && bt == 0) ? 0 : params[0] + bt - front * TB;  // the tile's first block
    const float qs = scale * TQ_LOG2E;

    // 1. per head and pair: A and B
    for (uint k = tid; k < uint(G * NP); k += ntg) {
        const int g = int(k) / NP;
        const int j = int(k) % NP;
        const int i = rp[2 * j];
        const int p = rp[2 * j + 1];
        const float ai = ra[(size_t(h) * NP + j) * 2];
        const float ap = ra[(size_t(h) * NP + j) * 2 + 1];
        const size_t row = (size_t(bh) * G + g) * D;
        const float qi = float(q[row + i]) * qs;
        const float qp = float(q[row + p]) * qs;
        w_tg[k] = i == p ? float2(ai * qi, 0.0f) : float2(ai * qi + ap * qp, ai * qp - ap * qi);
    }

    // 2. per pair: the phasor at the tile's first centre, then turned by RB * w block after block
    for (uint j = tid; j < uint(NP); j += ntg) {
        const float w = rang[j];
        const float c0 = float(RB * first) + 0.5f * float(RB - 1);
        float2 z = float2(precise::cos(c0 * w), precise::sin(c0 * w));
        const float2 step = float2(precise::cos(float(RB) * w), precise::sin(float(RB) * w));
        for (int b = 0; b < nb; ++b) {
            z_tg[b * NP + int(j)] = z;
            z = float2(z.x * step.x - z.y * step.y, z.x * step.y + z.y * step.x);
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // 3. per head and block: the sum over pairs
    for (uint k = tid; k < uint(G * TB); k += ntg) {
        const int g = int(k) / TB;
        const int b = int(k) % TB;
        if (b < nb) {
            float acc = 0.0f;
            for (int j = 0; j < NP; ++j) {
                const float2 z = z_tg[b * NP + j];
                const float2 w = w_tg[g * NP + j];
                acc = fma(w.x, z.x, fma(w.y, z.y, acc));
            }
            f[(size_t(bh) * G + g) * (NB + 1) + bt + b] = acc;
        }
    }

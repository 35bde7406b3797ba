// TurboQuant encode: raw vectors in, packed codes + norms out (one Lloyd-Max segment, no QJL).
// Template: XT (input dtype), NT (norm dtype), D, BITS, ROT (0: randomized Hadamard, `map` (H, D) scales x
//           before the unnormalised transform; 1: dense, `map` (H, D, D), y = map[h] x), NC (1: norm
//           correction, store n / |c[idx]|; 0: store n), RPT (rows per threadgroup).
// Inputs:  x (R, D) rows r = (b*H + h)*L + t; mean (CH, D) f32 (subtracted first); map (CH, D) or (CH, D, D);
//          levels (2^BITS) f32; edges (2^BITS - 1) f32 sorted decision edges; params int32 [L, CH]: CH = H
//          constant rows (one per head), or B*H (each batch row its own codec: row b*H + h).
// Outputs: codes (R, W) uint32, W = ceil(D*BITS/32), dense little-endian bit strings (tq_mlx/packing.py);
//          norm (R,) NT.
// Grid (32, R, 1) threads, threadgroup (32, RPT, 1): one simdgroup per row; the last threadgroup may be partial.
    constexpr int NV = (D + 31) / 32;  // values per lane: lane owns dims lane + 32 j
    constexpr int W = (D * BITS + 31) / 32;
    constexpr int NL = 1 << BITS;

    threadgroup float lv_tg[NL];
    threadgroup float ed_tg[NL];
    threadgroup uchar code_tg[RPT * D];

    const uint lane = thread_index_in_simdgroup;
    const uint tid = thread_index_in_threadgroup;
    const uint ntg = threads_per_threadgroup.x * threads_per_threadgroup.y;
    const int lrow = int(thread_position_in_threadgroup.y);
    const int row = int(thread_position_in_grid.y);
    const int rows = x_shape[0];
    const bool live = row < rows;  // whole simdgroups are in or out: simd ops stay uniform
    const int h = live ? (row / params[0]) % params[1] : 0;

    // 1. codebook and edges into threadgroup memory
    for (uint i = tid; i < uint(NL); i += ntg) {
        lv_tg[i] = levels[i];
        ed_tg[i] = i + 1 < uint(NL) ? edges[i] : INFINITY;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // 2. centre and rotate: v = R (w * (x - mean)) in the stored domain
    float v[NV];
    for (int j = 0; j < NV; ++j) {
        const int d = 32 * j + int(lane);
        v[j] = 0.0f;
        if (live && d < D) {
            if (ROT == 0) {
                v[j] = (float(x[size_t(row) * D + d]) - mean[h * D + d]) * map[h * D + d];
            } else {
                float acc = 0.0f;
                for (int k = 0; k < D; ++k) {
                    acc = fma(map[(size_t(h) * D + d) * D + k], float(x[size_t(row) * D + k]) - mean[h * D + k], acc);
                }
                v[j] = acc;
            }
        }
    }
    if (ROT == 0) {  // butterflies: dim bits 0-4 across lanes, bits 5+ across this lane's values
        for (int s = 1; s < 32; s <<= 1) {
            for (int j = 0; j < NV; ++j) {
                const float p = simd_shuffle_xor(v[j], ushort(s));
                v[j] = (lane & uint(s)) ? p - v[j] : v[j] + p;
            }
        }
        for (int t = 1; t < NV; t <<= 1) {
            for (int j = 0; j < NV; ++j) {
                if (!(j & t)) {
                    const float a = v[j];
                    const float b = v[j + t];
                    v[j] = a + b;
                    v[j + t] = a - b;
                }
            }
        }
    }

    // 3. norm, then the nearest level of each coordinate of v / |v| (binary search over the edges)
    float ss = 0.0f;
    for (int j = 0; j < NV; ++j) { ss = fma(v[j], v[j], ss); }
    const float n = metal::sqrt(simd_sum(ss));
    const float inv = 1.0f / max(n, 1e-30f);
    float cs = 0.0f;
    for (int j = 0; j < NV; ++j) {
        const int d = 32 * j + int(lane);
        const float u = v[j] * inv;
        uint k = 0;
        for (int b = BITS - 1; b >= 0; --b) {
            const uint cand = k + (1u << b);
            k = u > ed_tg[cand - 1] ? cand : k;
        }
        if (d < D) {
            code_tg[lrow * D + d] = uchar(k);
            cs = fma(lv_tg[k], lv_tg[k], cs);
        }
    }
    const float cn = metal::sqrt(simd_sum(cs));
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // 4. pack: word w holds the bits [32 w, 32 w + 32) of the row's bit string
    if (live) {
        for (int w = int(lane); w < W; w += 32) {
            uint word = 0u;
            const int j1 = min(D - 1, (32 * w + 31) / BITS);
            for (int j = (32 * w) / BITS; j <= j1; ++j) {
                const int s = BITS * j - 32 * w;
                const uint c = uint(code_tg[lrow * D + j]);
                word |= s >= 0 ? c << uint(s) : c >> uint(-s);
            }
            codes[size_t(row) * W + w] = word;
        }
        if (lane == 0) { norm[row] = static_cast<NT>(NC ? n / max(cn, 1e-30f) : n); }
    }

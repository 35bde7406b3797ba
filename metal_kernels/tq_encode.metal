// TurboQuant encode: rotated vectors in, packed bit-plane codes + norms out (one segment, no QJL).
// Template: NT (norm dtype), D (vector length), BITS, NC (1: norm correction, store n / |c[idx]|; 0: store n).
// Inputs: y (R, D) float32 rotated (not yet normalised) vectors, R = B*H*T rows; levels (2^BITS,) float32
//         codebook; edges (2^BITS - 1,) float32 sorted decision boundaries.
// Outputs: codes (R, NG*BITS) uint32 (bit-plane groups of 32, see tq_mlx/packing.py); norm (R,) NT.
// Grid (32, R, 1) threads, threadgroup (32, TY, 1): one simdgroup per vector; the last threadgroup may be partial.
    constexpr int NG = (D + 31) / 32;
    constexpr int NL = 1 << BITS;

    threadgroup float lv_tg[NL];
    threadgroup float ed_tg[NL];

    const uint lane = thread_index_in_simdgroup;
    const uint tid = thread_index_in_threadgroup;
    const uint ntg = threads_per_threadgroup.x * threads_per_threadgroup.y;
    const int row = int(thread_position_in_grid.y);
    const int rows = y_shape[0];

    // 1. codebook and edges into threadgroup memory
    for (uint i = tid; i < uint(NL); i += ntg) {
        lv_tg[i] = levels[i];
        ed_tg[i] = i + 1 < uint(NL) ? edges[i] : INFINITY;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // 2. one vector per simdgroup (whole simdgroups are in or out: simd ops stay uniform)
    if (row < rows) {
        float v[NG];
        float ss = 0.0f;
        for (int i = 0; i < NG; ++i) {
            const int d = 32 * i + int(lane);
            v[i] = d < D ? y[size_t(row) * D + d] : 0.0f;
            ss = fma(v[i], v[i], ss);
        }
        const float n = metal::sqrt(simd_sum(ss));
        const float inv = 1.0f / max(n, 1e-30f);
        // 3. nearest level: binary search over the sorted edges (index = number of edges below u)
        uint idx[NG];
        float cs = 0.0f;
        for (int i = 0; i < NG; ++i) {
            const float u = v[i] * inv;
            uint k = 0;
            for (int j = BITS - 1; j >= 0; --j) {
                const uint cand = k + (1u << j);
                k = u > ed_tg[cand - 1] ? cand : k;
            }
            const bool valid = 32 * i + int(lane) < D;
            idx[i] = valid ? k : 0u;
            const float c = lv_tg[idx[i]];
            cs = valid ? fma(c, c, cs) : cs;
        }
        // 4. pack bit planes: word j of group i holds bit j of code 32*i + lane at bit `lane`
        device uint32_t* w = codes + size_t(row) * (NG * BITS);
        for (int i = 0; i < NG; ++i) {
            for (int j = 0; j < BITS; ++j) {
                const uint word = simd_or(((idx[i] >> j) & 1u) << lane);
                if (lane == 0) { w[i * BITS + j] = word; }
            }
        }
        const float cn = metal::sqrt(simd_sum(cs));
        if (lane == 0) { norm[row] = static_cast<NT>(NC ? n / max(cn, 1e-30f) : n); }
    }

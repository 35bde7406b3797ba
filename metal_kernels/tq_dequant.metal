// Dequantize packed TurboQuant codes into the rotated domain, y_t = n_t * c[idx_t], for prefill.
// Template: NT (norm dtype), OT (output dtype), D (vector length), BITS.
// Inputs: codes (B, H, cap, NG*BITS) uint32; norm (B, H, cap) NT; cb (2^BITS,) float32; params int32 [T].
// Output: y (B, H, T, D) OT.  Grid (32, B*H*T, 1) threads, threadgroup (32, TY, 1): one simdgroup per token,
// lane l writes dims 32*i + l; the last threadgroup in y may be partial (rows >= B*H*T only help load the codebook).
    constexpr int NG = (D + 31) / 32;
    constexpr int W = NG * BITS;
    constexpr int NC = 1 << BITS;

    threadgroup float cb_tg[NC];

    const uint lane = thread_index_in_simdgroup;
    const uint tid = thread_index_in_threadgroup;
    const uint ntg = threads_per_threadgroup.x * threads_per_threadgroup.y;
    const int row = int(thread_position_in_grid.y);
    const int T = params[0];
    const int cap = norm_shape[2];
    const int rows = norm_shape[0] * norm_shape[1] * T;

    // 1. codebook into threadgroup memory
    for (uint i = tid; i < uint(NC); i += ntg) { cb_tg[i] = cb[i]; }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // 2. one token per simdgroup: unpack each 32-group's bit planes, scale by the norm
    if (row < rows) {
        const int bh = row / T;
        const int t = row - bh * T;
        const size_t src = size_t(bh) * cap + t;
        const device uint32_t* w = codes + src * W;
        const float n = float(norm[src]);
        for (int i = 0; i < NG; ++i) {
            uint code = 0;
            for (int j = 0; j < BITS; ++j) { code |= ((w[i * BITS + j] >> lane) & 1u) << j; }
            const int d = 32 * i + int(lane);
            if (d < D) { y[size_t(row) * D + d] = static_cast<OT>(cb_tg[code] * n); }
        }
    }

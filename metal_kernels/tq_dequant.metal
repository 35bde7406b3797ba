// Dequantize packed TurboQuant codes into the stored domain, y_t = n_t * c[idx_t], for prefill.
// Template: NT (norm dtype), OT (output dtype), D (multiple of 8), BITS, TL (0: Lloyd-Max codes, idx = the
//           code; else trellis codes, idx = the TL-bit window ending with the code).
// Inputs:  codes (B, H, cap, W) u32 (dense little-endian bit strings); norm (B, H, cap) NT; cb (2^BITS or
//          2^TL,) f32: the codebook or the trellis table; params int32 [T].
// Output:  y (B, H, T, D) OT.
// Grid (NC, B*H*T, 1) threads, NC = D / 8, threadgroup (NC, TY, 1): one thread per 8-dim chunk of one token;
// the last threadgroup may be partial.
    constexpr int NC = D / 8;
    constexpr int W = (D * BITS + 31) / 32;
    constexpr int NL = 1 << (TL ? TL : BITS);

    threadgroup float cb_tg[NL];

    const uint tid = thread_index_in_threadgroup;
    const uint ntg = threads_per_threadgroup.x * threads_per_threadgroup.y;
    const int c = int(thread_position_in_grid.x);
    const int row = int(thread_position_in_grid.y);
    const int T = params[0];
    const int cap = norm_shape[2];
    const int rows = norm_shape[0] * norm_shape[1] * T;

    // 1. codebook into threadgroup memory
    for (uint i = tid; i < uint(NL); i += ntg) { cb_tg[i] = cb[i]; }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // 2. one chunk of 8 codes per thread, scaled by the token's norm
    if (row < rows && c < NC) {
        const size_t src = size_t(row / T) * cap + row % T;
        const uint2 x = tq_chunk_bits<BITS>(codes + src * W, c);
        const float n = float(norm[src]);
        if (TL) {
            const uint prev = tq_chunk_bits<BITS>(codes + src * W, (c + NC - 1) % NC).x;
            const uint2 xw = tq_trellis_bits<BITS, TL ? TL : BITS + 1>(x, prev);
            for (int i = 0; i < 8; ++i) {
                y[size_t(row) * D + 8 * c + i] = static_cast<OT>(cb_tg[tq_window<BITS, TL ? TL : BITS + 1>(xw, i)] * n);
            }
        } else {
            for (int i = 0; i < 8; ++i) {
                y[size_t(row) * D + 8 * c + i] = static_cast<OT>(cb_tg[tq_code<BITS>(x, i)] * n);
            }
        }
    }

// TurboQuant decode attention (L = 1) on packed bit-plane codes, one partial block per threadgroup.
//
// Template: NT (norm dtype), D (head dim, multiple of 16), KB / VB (K / V code bits), G (query heads per KV head).
// Inputs:  q (BH, G, D) float32, pre-rotated and pre-scaled; kc (B, H, cap, NG*KB) uint32; kn (B, H, cap) NT;
//          vc (B, H, cap, NG*VB) uint32; vn (B, H, cap) NT; kcb (2^KB,) / vcb (2^VB,) float32 codebooks;
//          params int32 [T, BLK]: tokens held and keys per block, read at run time (no recompiles per step).
// Outputs: o (BH, NB, G, D) float32 un-normalised sum_t e^(s_t - m) v_t in the rotated domain;
//          m (BH, NB, G) running max; l (BH, NB, G) sum-exp.  NB = 1: single pass; NB > 1: split-K, merged by tq_merge.
// Grid (32*NSG, BH, NB) threads, threadgroup (32*NSG, 1, 1): one threadgroup per (batch*kv head, key block).
    constexpr int NSG = 8;                // simdgroups per threadgroup (must match the launch)
    constexpr int NG = (D + 31) / 32;     // 32-code groups per vector; lane l owns code 32*i + l of group i
    constexpr int WK = NG * KB;           // packed words per key
    constexpr int WV = NG * VB;           // packed words per value
    constexpr int NKC = 1 << KB;
    constexpr int NVC = 1 << VB;

    threadgroup float kcb_tg[NKC];
    threadgroup float vcb_tg[NVC];
    threadgroup float red_m[NSG * G];
    threadgroup float red_l[NSG * G];
    threadgroup float red_o[NSG * NG * 32];

    const uint lane = thread_index_in_simdgroup;
    const uint sg = simdgroup_index_in_threadgroup;
    const uint tid = thread_index_in_threadgroup;
    const uint ntg = threads_per_threadgroup.x;
    const int bh = int(threadgroup_position_in_grid.y);
    const int blk = int(threadgroup_position_in_grid.z);
    const int nblk = int(threadgroups_per_grid.z);
    const int T = params[0];
    const int BLK = params[1];
    const int cap = kn_shape[2];

    // 1. codebooks into threadgroup memory (no constant/device reads in the key loop)
    for (uint i = tid; i < uint(NKC); i += ntg) { kcb_tg[i] = kcb[i]; }
    for (uint i = tid; i < uint(NVC); i += ntg) { vcb_tg[i] = vcb[i]; }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // 2. the G queries sharing this KV head into registers (lane owns dims 32*i + lane; padding dims are 0)
    float qr[G][NG];
    for (int g = 0; g < G; ++g) {
        for (int i = 0; i < NG; ++i) {
            const int d = 32 * i + int(lane);
            qr[g][i] = d < D ? q[(size_t(bh) * G + g) * D + d] : 0.0f;
        }
    }
    float m[G], l[G], o[G][NG];
    for (int g = 0; g < G; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
        for (int i = 0; i < NG; ++i) { o[g][i] = 0.0f; }
    }

    // 3. simdgroups stride over the block's keys: unpack K once for all G queries, online softmax, accumulate V
    const int t0 = blk * BLK;
    const int t1 = min(t0 + BLK, T);
    for (int t = t0 + int(sg); t < t1; t += NSG) {
        const size_t row = size_t(bh) * cap + t;
        const device uint32_t* kw = kc + row * WK;
        const device uint32_t* vw = vc + row * WV;
        float kv[NG];
        for (int i = 0; i < NG; ++i) {
            uint code = 0;
            for (int j = 0; j < KB; ++j) { code |= ((kw[i * KB + j] >> lane) & 1u) << j; }
            kv[i] = kcb_tg[code];
        }
        const float knorm = float(kn[row]);
        float vv[NG];
        const float vnorm = float(vn[row]);
        for (int i = 0; i < NG; ++i) {
            uint code = 0;
            for (int j = 0; j < VB; ++j) { code |= ((vw[i * VB + j] >> lane) & 1u) << j; }
            vv[i] = vcb_tg[code] * vnorm;
        }
        for (int g = 0; g < G; ++g) {
            float s = 0.0f;
            for (int i = 0; i < NG; ++i) { s = fma(qr[g][i], kv[i], s); }
            s = simd_sum(s) * knorm;
            const float nm = max(m[g], s);
            const float f = metal::exp(m[g] - nm);
            const float p = metal::exp(s - nm);
            m[g] = nm;
            l[g] = l[g] * f + p;
            for (int i = 0; i < NG; ++i) { o[g][i] = fma(o[g][i], f, p * vv[i]); }
        }
    }

    // 4. combine the simdgroups through threadgroup memory, one query head at a time
    if (lane == 0) {
        for (int g = 0; g < G; ++g) {
            red_m[sg * G + g] = m[g];
            red_l[sg * G + g] = l[g];
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int g = 0; g < G; ++g) {
        float M = -INFINITY;
        for (int s = 0; s < NSG; ++s) { M = max(M, red_m[s * G + g]); }
        float L = 0.0f;
        for (int s = 0; s < NSG; ++s) {
            const float ms = red_m[s * G + g];
            L += ms == -INFINITY ? 0.0f : red_l[s * G + g] * metal::exp(ms - M);
        }
        const float f = m[g] == -INFINITY ? 0.0f : metal::exp(m[g] - M);
        for (int i = 0; i < NG; ++i) { red_o[sg * NG * 32 + 32 * i + lane] = o[g][i] * f; }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        const size_t orow = (size_t(bh) * nblk + blk) * G + g;
        for (uint d = tid; d < uint(D); d += ntg) {
            float acc = 0.0f;
            for (int s = 0; s < NSG; ++s) { acc += red_o[s * NG * 32 + d]; }
            out_o[orow * D + d] = acc;
        }
        if (tid == 0) {
            out_m[orow] = M;
            out_l[orow] = L;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }

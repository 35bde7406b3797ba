// Merge tq_decode's partial blocks into the attention output: one threadgroup per output row (batch, query head).
// Template: OT (output dtype), D, G (query heads per KV head), ROT (0: Hadamard, `omap` (H, D) scales the
//           unnormalised transform's result; 1: dense, x = omap[h] y).
// Inputs:  po (R, NB + 1, D), pm, pl (R, NB + 1) f32 from tq_decode (base-2 scores; block NB = fp16 tokens);
//          vmr (CH, D) f32 value mean in the stored domain and omap (CH, D(, D)): CH = H, or B*H when each batch
//          row has codecs of its own (row b*H + h); sinks (Hq,) f32 attention-sink logits (any 1-element array
//          without them); params int32 [has_sinks].
// Output:  out (R, D) OT, R = B * H * G rows in (B, Hq, 1, D) order: softmax-normalised, original domain.
// Grid (D, R, 1) threads, threadgroup (D, 1, 1).
    threadgroup float y_tg[D];

    const int d = int(thread_position_in_threadgroup.x);
    const int row = int(threadgroup_position_in_grid.y);
    const int NB1 = pm_shape[1];
    const int CH = vmr_shape[0];
    const int h = (row / G) % CH;  // the constants' row: the head, or the batch row's own head

    // 1. the coded blocks: common max, rescaled sums (stored domain)
    float Mc = TQ_NEG_BIG;
    for (int b = 0; b + 1 < NB1; ++b) { Mc = max(Mc, pm[row * NB1 + b]); }
    float Lc = 0.0f;
    float y = 0.0f;
    for (int b = 0; b + 1 < NB1; ++b) {
        const float f = fast::exp2(pm[row * NB1 + b] - Mc);
        Lc = fma(pl[row * NB1 + b], f, Lc);
        y = fma(po[(size_t(row) * NB1 + b) * D + d], f, y);
    }

    // 2. centred values: sum_t p_t (y_t + R mean_v)
    y = fma(Lc, vmr[h * D + d], y);

    // 3. back to the original domain
    y_tg[d] = y;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float x;
    if (ROT == 0) {
        tq_hadamard_tg(y_tg, D, 1, uint(d), uint(D));
        x = y_tg[d] * omap[h * D + d];
    } else {
        x = 0.0f;
        for (int k = 0; k < D; ++k) { x = fma(omap[(size_t(h) * D + d) * D + k], y_tg[k], x); }
    }

    // 4. the fp16 tokens (original domain) and the attention sinks join; normalise
    const float mf = pm[row * NB1 + NB1 - 1];
    const float lf = pl[row * NB1 + NB1 - 1];
    const float of = po[(size_t(row) * NB1 + NB1 - 1) * D + d];
    const float ms = params[0] ? sinks[row % sinks_shape[0]] * TQ_LOG2E : TQ_NEG_BIG;
    const float M = max(max(Mc, mf), ms);
    const float fc = fast::exp2(Mc - M);
    const float ff = fast::exp2(mf - M);
    const float fs = params[0] ? fast::exp2(ms - M) : 0.0f;
    out[size_t(row) * D + d] = static_cast<OT>((x * fc + of * ff) / (Lc * fc + lf * ff + fs));

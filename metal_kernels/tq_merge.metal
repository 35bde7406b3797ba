// Split-K merge: combine NB partial (o, m, l) blocks of tq_decode into one per (batch*kv head, query head).
// Inputs: po (R, NB, D) float32, pm (R, NB), pl (R, NB) with R = BH*G rows (shapes read at run time: no template).
// Outputs: o (R, D) un-normalised, m (R,), l (R,).
// Grid (D, R, 1) threads, threadgroup (TX, 1, 1): thread (d, row); the last threadgroup in x may be partial.
    const int d = int(thread_position_in_grid.x);
    const int row = int(thread_position_in_grid.y);
    const int NB = pm_shape[1];
    const int D = po_shape[2];
    const int R = pm_shape[0];

    // 1. global max over the blocks (every thread of the row computes it: NB is small)
    if (row < R && d < D) {
        float M = -INFINITY;
        for (int b = 0; b < NB; ++b) { M = max(M, pm[row * NB + b]); }
        // 2. rescale and sum the partial sums and outputs
        float L = 0.0f, acc = 0.0f;
        for (int b = 0; b < NB; ++b) {
            const float mb = pm[row * NB + b];
            const float f = mb == -INFINITY ? 0.0f : metal::exp(mb - M);
            L += pl[row * NB + b] * f;
            acc += po[(size_t(row) * NB + b) * D + d] * f;
        }
        out_o[size_t(row) * D + d] = acc;
        if (d == 0) {
            out_m[row] = M;
            out_l[row] = L;
        }
    }

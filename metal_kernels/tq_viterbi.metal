// Trellis-coded encode (tq_mlx/trellis.py): raw vectors in, packed symbols + norms out, by the tail-biting
// Viterbi search of trellis.search run in one threadgroup per vector (one thread per trellis state).
// Template: XT (input dtype), NT (norm dtype), D (coordinates, <= 256), BITS (b, symbol bits: 2..4), ROT
//           (0: randomized Hadamard, `map` (H, D) scales x - mean before the unnormalised transform; 1: dense,
//           `map` (H, D, D), y = map[h] (x - mean); 2: no transform and no scaling, the rows of x are the
//           coordinates z that trellis.search takes: the search alone, for tests), NC (1: norm correction,
//           store |y| / |table[w]|; 0: store |y| / sqrt(D)).
// Inputs:  x (R, D) rows r = (b*H + h)*L + t; mean (H, D) f32; map; tbl (2^(BITS+6)) f32 the trellis table;
//          params int32 [L, H].
// Outputs: codes (R, W) uint32, W = ceil(D*BITS/32): symbol j (the top BITS bits of window j) in bits
//          [BITS j, BITS j + BITS), as tq_encode packs Lloyd-Max codes; norm (R,) NT.
// Grid (64, R, 1) threads, threadgroup (64, 1, 1): always whole threadgroups (one per row).
//
// The trellis: window w (TL = BITS + 6 bits) = s * NB + t, s = w >> BITS the state after the coordinate
// (NS = 64 states), t its low BITS bits, the previous state w & (NS - 1) = (s mod NS/NB) * NB + t.  Step j:
// cost'[s] = min_t cost[(s mod NS/NB) NB + t] + (z_j - tbl[s NB + t])^2, back[j][s] = the first minimising t
// (MLX's argmin).  Pass 1 starts free (all costs 0), ends in the first cheapest state and is backtracked to
// the state after coordinate m - 1 (m = D / 2); pass 2 runs on z rotated by m (z'_j = z_{(j+m) mod D})
// started and ended in that state (other states cost 1e30: never on the path), and its backtrack gives the
// windows, rotated back.
//
// Work per vector: 2 D steps, each a threadgroup barrier plus, per thread, NB candidates (a threadgroup
// read, sub, fma, compare, 2 selects: ~6 instructions): ~6 NB + 8 per step, so at D = 128, BITS = 4 about
// 2 x 128 x 104 = 27K instructions per thread (64 threads), and two serial backtracks of D + D / 2 dependent
// threadgroup reads by one thread.  Threadgroup memory: D * 64 back-pointer bytes (16 KiB at D = 256) +
// 5 D + 516 bytes.
    constexpr int NS = 64;              // trellis states: 2^(TL - BITS)
    constexpr int NB = 1 << BITS;       // candidates per state (the dropped low bits of a window)
    constexpr int TL = BITS + 6;        // window bits
    constexpr int W = (D * BITS + 31) / 32;
    constexpr int M = D / 2;            // pass 2 starts at coordinate M
    constexpr float FAR = 1.0e30f;      // a finite "unreachable" cost (fast math may assume no infinities)

    threadgroup float z_tg[D];
    threadgroup float cost_tg[2 * NS];
    threadgroup uchar back_tg[D * NS];
    threadgroup uchar sym_tg[D];
    threadgroup uint mid_tg[1];

    const uint s = thread_index_in_threadgroup;  // this thread's state, 0..63
    const int row = int(threadgroup_position_in_grid.y);
    const int h = (row / params[0]) % params[1];
    const size_t xo = size_t(row) * D;

    // 1. centre and rotate the row into z_tg: y = R (w * (x - mean)) in the stored domain (ROT 2: z as given)
    for (int d = int(s); d < D; d += NS) {
        if (ROT == 0) {
            z_tg[d] = (float(x[xo + d]) - mean[h * D + d]) * map[h * D + d];
        } else if (ROT == 1) {
            float acc = 0.0f;
            for (int k = 0; k < D; ++k) {
                acc = fma(map[(size_t(h) * D + d) * D + k], float(x[xo + k]) - mean[h * D + k], acc);
            }
            z_tg[d] = acc;
        } else {
            z_tg[d] = float(x[xo + d]);
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (ROT == 0) {
        tq_hadamard_tg(z_tg, D, 1, s, NS);  // ends with a barrier
    }

    // 2. the norm (every thread sums the same values in the same order) and the scale to z = sqrt(D) y / |y|
    float ss = 0.0f;
    for (int d = 0; d < D; ++d) { ss = fma(z_tg[d], z_tg[d], ss); }
    const float n = metal::sqrt(ss);
    const float rd = metal::sqrt(float(D));
    const float zs = ROT == 2 ? 1.0f : rd / max(n, 1e-30f);

    // 3. this state's NB table entries (its windows s * NB + t) into registers
    float tv[NB];
    for (int t = 0; t < NB; ++t) { tv[t] = tbl[s * NB + t]; }
    const uint base = (s % uint(NS / NB)) * uint(NB);  // the first previous state

    // 4. pass 1, free start: one forward step per coordinate, costs double-buffered, one barrier per step
    cost_tg[s] = 0.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int j = 0; j < D; ++j) {
        const threadgroup float* prev = cost_tg + (j & 1) * NS;
        const float zj = z_tg[j] * zs;
        float best = FAR * 4.0f;
        uint bt = 0;
        for (int t = 0; t < NB; ++t) {
            const float e = zj - tv[t];
            const float c = prev[base + t] + e * e;
            bt = c < best ? uint(t) : bt;
            best = c < best ? c : best;
        }
        cost_tg[((j + 1) & 1) * NS + s] = best;
        back_tg[j * NS + s] = uchar(bt);
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    // 5. pass 1 backtrack (one thread): the first cheapest end state, back to the state after coordinate M - 1
    if (s == 0) {
        const threadgroup float* fin = cost_tg + (D & 1) * NS;
        uint st = 0;
        float best = fin[0];
        for (int k = 1; k < NS; ++k) {
            st = fin[k] < best ? uint(k) : st;
            best = fin[k] < best ? fin[k] : best;
        }
        for (int j = D - 1; j >= M; --j) {
            st = (st * NB + uint(back_tg[j * NS + st])) & uint(NS - 1);
        }
        mid_tg[0] = st;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const uint mid = mid_tg[0];

    // 6. pass 2 on z rotated by M, started in `mid`
    cost_tg[s] = s == mid ? 0.0f : FAR;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int j = 0; j < D; ++j) {
        const threadgroup float* prev = cost_tg + (j & 1) * NS;
        const float zj = z_tg[(j + M) % D] * zs;
        float best = FAR * 4.0f;
        uint bt = 0;
        for (int t = 0; t < NB; ++t) {
            const float e = zj - tv[t];
            const float c = prev[base + t] + e * e;
            bt = c < best ? uint(t) : bt;
            best = c < best ? c : best;
        }
        cost_tg[((j + 1) & 1) * NS + s] = best;
        back_tg[j * NS + s] = uchar(bt);
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    // 7. pass 2 backtrack from `mid` (one thread): symbols rotated back, and |table[w]| for the norm correction
    if (s == 0) {
        uint st = mid;
        float cs = 0.0f;
        for (int j = D - 1; j >= 0; --j) {
            const uint w = st * NB + uint(back_tg[j * NS + st]);
            sym_tg[(j + M) % D] = uchar(w >> (TL - BITS));
            cs = fma(tbl[w], tbl[w], cs);
            st = w & uint(NS - 1);
        }
        norm[row] = static_cast<NT>(NC ? n / max(metal::sqrt(cs), 1e-30f) : n / rd);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // 8. pack: word w holds the bits [32 w, 32 w + 32) of the row's symbol string
    for (int w = int(s); w < W; w += NS) {
        uint word = 0u;
        const int j1 = min(D - 1, (32 * w + 31) / BITS);
        for (int j = (32 * w) / BITS; j <= j1; ++j) {
            const int sh = BITS * j - 32 * w;
            const uint c = uint(sym_tg[j]);
            word |= sh >= 0 ? c << uint(sh) : c >> uint(-sh);
        }
        codes[size_t(row) * W + w] = word;
    }

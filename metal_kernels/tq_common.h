// Helpers shared by the TurboQuant kernels (passed to mx.fast.metal_kernel as `header`).
//
// Code layout (tq_mlx/packing.py): one dense little-endian bit string per vector; the 8 codes
// of dims [8c, 8c + 8) are the 8*BITS bits from bit 8*BITS*c, i.e. BITS whole bytes.
// Pointer arguments are templates so the same helper reads `device` buffers and the
// `constant` ones MLX makes of inputs with fewer than 8 elements.

constexpr constant float TQ_LOG2E = 1.4426950408889634f;
constexpr constant float TQ_NEG_BIG = -3.0e38f;  // a finite "no score yet" (exp2 of a difference stays 0)
constexpr constant int TQ_ROPE_TILE = 16;  // tq_rope_bias: blocks per threadgroup (a ring's front: one tile)

// The 8*BITS bits of chunk c of the row that starts at `row` (BITS <= 8: at most 64 bits, 3 words).
template <int BITS, typename P>
METAL_FUNC uint2 tq_chunk_bits(P row, int c) {
  constexpr int NB = 8 * BITS;
  const int o = NB * c;
  const int w = o >> 5;
  const int s = o & 31;
  uint lo = row[w] >> s;
  uint hi = 0u;
  if (NB + s > 32) {
    const uint x = row[w + 1];
    lo |= s ? x << (32 - s) : 0u;
    hi = x >> s;
  }
  if (NB + s > 64) {
    hi |= row[w + 2] << (32 - s);
  }
  return uint2(lo, hi);
}

// Code i (0..7) of a chunk from tq_chunk_bits; i is a compile-time constant after unrolling,
// so the branches fold away.
template <int BITS>
METAL_FUNC uint tq_code(uint2 x, int i) {
  constexpr uint M = (1u << BITS) - 1u;
  const int o = BITS * i;
  if (o + BITS <= 32) {
    return (x.x >> o) & M;
  }
  if (o >= 32) {
    return (x.y >> (o - 32)) & M;
  }
  return ((x.x >> o) | (x.y << (32 - o))) & M;
}

// Trellis codes (tq_mlx/trellis.py): code i of a chunk is read through the L-bit window that ends with its
// B bits, so a chunk also needs the top P = L - B bits of the previous chunk (circularly: chunk 0 takes the
// last chunk's).  tq_trellis_bits joins them, (prefix | chunk << P) as a 64-bit (lo, hi) pair, for B <= 4
// (a chunk's 8B bits then sit in chunk.x, and the previous chunk's in prev.x).
template <int B, int L>
METAL_FUNC uint2 tq_trellis_bits(uint2 chunk, uint prev) {
  constexpr int P = L - B;  // 1..31 (kernels instantiate this with a placeholder L when TL = 0)
  constexpr int SH = (8 * B - P) & 31;
  const uint prefix = (prev >> SH) & ((1u << P) - 1u);
  return uint2(prefix | (chunk.x << P), chunk.x >> (32 - P));
}

// Window i (0..7) of tq_trellis_bits: bits [B i, B i + L), the table index of code i.
template <int B, int L>
METAL_FUNC uint tq_window(uint2 x, int i) {
  constexpr uint M = (1u << L) - 1u;
  const int o = B * i;
  if (o + L <= 32) {
    return (x.x >> o) & M;
  }
  if (o >= 32) {
    return (x.y >> (o - 32)) & M;
  }
  return ((x.x >> o) | (x.y << (32 - o))) & M;
}

// In-place unnormalised Walsh-Hadamard transform (Sylvester order) of `count` vectors of n = 2^k
// floats, contiguous in threadgroup memory, by `nthreads` threads; every thread of the threadgroup
// must call it (it has barriers).
METAL_FUNC void tq_hadamard_tg(threadgroup float* v, int n, int count, uint tid, uint nthreads) {
  const uint pairs = uint(count * (n / 2));
  for (int h = 1; h < n; h <<= 1) {
    for (uint j = tid; j < pairs; j += nthreads) {
      const uint vec = j / uint(n / 2);
      const uint k = j % uint(n / 2);
      const uint i = vec * uint(n) + (k / h) * (2 * h) + (k % h);
      const float a = v[i];
      const float b = v[i + h];
      v[i] = a + b;
      v[i + h] = a - b;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
}

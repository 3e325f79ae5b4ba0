// NEON kernel for aarch64 (Advanced SIMD is mandatory there, so it is chosen whenever it is built).
// Same plan as gemm_avx2.cc, and checked against gemm_scalar.cc (the reference) by tests/kernel_test.cc:
// M == 1 (decode): per column, 32 codes at a time (read a chunk at a time, FORMAT.md §4) become 32 int8
// levels through shifts, masks and one vqtbl1q_s8 table lookup per 16 codes (8-, 5- and 6-bit codes need no
// table: c - 128 is c ^ 0x80 read as int8); they are widened to floats and FMA'd against the activations;
// the block scale is applied once per block and the offset through the precomputed block sums.
// M > 1 (prefill): a tile of 16 columns is decoded into a cache-resident [K][16] float buffer (four
// columns at a time, transposed in registers so every store is a whole vector) that feeds a 4-row x
// 16-column FMA micro-kernel, so each weight is decoded once per tile, not once per row.
// The int8 path (accuracy_level 4) is at the end of the file.
#include <arm_neon.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels_internal.h"

namespace rbe {
namespace {

// The 32 byte-codes of one packing group of 2-, 4-, 5-, 6- or 8-bit codes (FORMAT.md §4): codes 0..15 in lo,
// 16..31 in hi; kByteCodes widths as L + 128. Each branch names the scalar loop of unpack_block_codes
// (format.cc) it replaces.
template <int BITS>
inline void group_codes(const uint8_t* p, uint8x16_t& lo, uint8x16_t& hi) {
  static_assert(BITS != 3, "3-bit codes come in chunks: chunk_codes");
  if constexpr (BITS == 8) {
    // scalar: o[t] = p[t]
    lo = vld1q_u8(p);
    hi = vld1q_u8(p + 16);
  } else if constexpr (BITS == 5 || BITS == 6) {
    // scalar: o[j] = p[j] & 0xF, o[j + 16] = p[j] >> 4, then the top bits (5: bit j % 8 of p[16 + j / 8]; 6:
    // bits 2q of p[16 + j] for code j + 8q) at bit 4, then L + 128 = (c << (8 − BITS)) | 2^(7 − BITS).
    const uint8x16_t v = vld1q_u8(p);
    uint8x16_t top_lo, top_hi;
    if constexpr (BITS == 5) {
      // The plane's byte j copied to codes 8j .. 8j+7, each testing its own bit.
      uint32_t plane;
      std::memcpy(&plane, p + 16, 4);
      const uint8x16_t bytes = vreinterpretq_u8_u32(vdupq_n_u32(plane));
      static const uint8_t kCopy[32] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                        2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3};
      const uint8x16_t bit = vreinterpretq_u8_u64(vdupq_n_u64(0x8040201008040201ull));
      top_lo = vshrq_n_u8(vtstq_u8(vqtbl1q_u8(bytes, vld1q_u8(kCopy)), bit), 7);
      top_hi = vshrq_n_u8(vtstq_u8(vqtbl1q_u8(bytes, vld1q_u8(kCopy + 16)), bit), 7);
    } else {
      // The 2-bit layout, as group_codes<2>.
      const uint8x8_t t = vld1_u8(p + 16), m = vdup_n_u8(0x03);
      top_lo = vcombine_u8(vand_u8(t, m), vand_u8(vshr_n_u8(t, 2), m));
      top_hi = vcombine_u8(vand_u8(vshr_n_u8(t, 4), m), vshr_n_u8(t, 6));
    }
    const uint8x16_t c_lo = vsliq_n_u8(vandq_u8(v, vdupq_n_u8(0x0F)), top_lo, 4);
    const uint8x16_t c_hi = vsliq_n_u8(vshrq_n_u8(v, 4), top_hi, 4);
    const uint8x16_t base = vdupq_n_u8(1 << (7 - BITS));
    lo = vsliq_n_u8(base, c_lo, 8 - BITS);
    hi = vsliq_n_u8(base, c_hi, 8 - BITS);
  } else if constexpr (BITS == 4) {
    // scalar: o[j] = p[j] & 0xF; o[j + 16] = p[j] >> 4. The layout puts the two halves of the group in
    // the two nibbles of the same 16 bytes, so one load and two ALU ops give all 32 codes in order.
    const uint8x16_t v = vld1q_u8(p);
    lo = vandq_u8(v, vdupq_n_u8(0x0F));
    hi = vshrq_n_u8(v, 4);
  } else {
    // scalar: o[j + 8q] = (p[j] >> 2q) & 3 for q = 0..3: each shift of the same 8 bytes yields the next
    // 8 codes, so concatenating the four shifted copies puts them in order.
    const uint8x8_t v = vld1_u8(p);
    const uint8x8_t m = vdup_n_u8(0x03);
    lo = vcombine_u8(vand_u8(v, m), vand_u8(vshr_n_u8(v, 2), m));
    hi = vcombine_u8(vand_u8(vshr_n_u8(v, 4), m), vshr_n_u8(v, 6));
  }
}

// 16 3-bit codes from low-plane bytes holding their low bits in field F (bits 2F, 2F+1) and high-plane bytes
// holding their bit 2 in bit U. The shift-left-and-insert keeps only bits 0-1 of the first operand, so the
// low bits need no mask.
template <int F, int U>
inline uint8x16_t codes3(uint8x16_t low, uint8x16_t high) {
  uint8x16_t l = low, h = high;
  if constexpr (F > 0) l = vshrq_n_u8(low, 2 * F);
  if constexpr (U > 0) h = vshrq_n_u8(high, U);
  return vsliq_n_u8(l, vandq_u8(h, vdupq_n_u8(1)), 2);
}

// The byte-codes of one chunk of CH codes (CH = chunk_of<BITS>): codes 16i .. 16i+15 in out[i].
// scalar (3 bits): low = (p[t % (CH/4)] >> 2·(t / (CH/4))) & 3, high = (p[CH/4 + t % (CH/8)] >> (t / (CH/8))) & 1.
template <int BITS, int CH>
inline void chunk_codes(const uint8_t* p, uint8x16_t out[CH / 16]) {
  if constexpr (BITS != 3) {
    group_codes<BITS>(p, out[0], out[1]);
  } else if constexpr (CH == 128) {
    // Codes 16i + t: low-plane byte 16·(i%2) + t, field i/2; high-plane byte t, bit i.
    const uint8x16_t l0 = vld1q_u8(p), l1 = vld1q_u8(p + 16), h = vld1q_u8(p + 32);
    out[0] = codes3<0, 0>(l0, h);
    out[1] = codes3<0, 1>(l1, h);
    out[2] = codes3<1, 2>(l0, h);
    out[3] = codes3<1, 3>(l1, h);
    out[4] = codes3<2, 4>(l0, h);
    out[5] = codes3<2, 5>(l1, h);
    out[6] = codes3<3, 6>(l0, h);
    out[7] = codes3<3, 7>(l1, h);
  } else if constexpr (CH == 64) {
    // Codes 16i + t: low-plane byte t, field i; high-plane byte t%8, bit 2i + t/8, i.e. bit 2i of the
    // 8 bytes followed by the same 8 bytes shifted right by 1.
    const uint8x16_t l = vld1q_u8(p);
    const uint8x8_t h8 = vld1_u8(p + 16);
    const uint8x16_t h = vcombine_u8(h8, vshr_n_u8(h8, 1));
    out[0] = codes3<0, 0>(l, h);
    out[1] = codes3<1, 2>(l, h);
    out[2] = codes3<2, 4>(l, h);
    out[3] = codes3<3, 6>(l, h);
  } else {
    // Codes t: low-plane byte t%8, field t/8 (the 2-bit group layout); high-plane byte t%4, bit t/4, by a
    // per-byte shift of the 4 bytes repeated. memcpy, not an 8-byte vld1_u8: the high plane ends the chunk,
    // possibly the codes.
    const uint8x8_t l = vld1_u8(p);
    uint32_t high;
    std::memcpy(&high, p + 8, 4);
    const uint8x16_t h = vreinterpretq_u8_u32(vdupq_n_u32(high));
    static const int8_t kShift[32] = {0,  0,  0,  0,  -1, -1, -1, -1, -2, -2, -2, -2, -3, -3, -3, -3,
                                      -4, -4, -4, -4, -5, -5, -5, -5, -6, -6, -6, -6, -7, -7, -7, -7};
    const uint8x16_t one = vdupq_n_u8(1);
    out[0] = vsliq_n_u8(vcombine_u8(l, vshr_n_u8(l, 2)), vandq_u8(vshlq_u8(h, vld1q_s8(kShift)), one), 2);
    out[1] = vsliq_n_u8(vcombine_u8(vshr_n_u8(l, 4), vshr_n_u8(l, 6)),
                        vandq_u8(vshlq_u8(h, vld1q_s8(kShift + 16)), one), 2);
  }
}

// int8 levels L[c] of 16 byte-codes (FORMAT.md §5). 2/3/4-bit codes are < 16, so one 16-byte table
// (w.lut[theta]) serves them all through vqtbl1q_s8; kByteCodes levels are c - 128 = (c ^ 0x80) as int8.
template <int BITS>
inline int8x16_t code_levels(uint8x16_t codes, int8x16_t lut) {
  if constexpr (kByteCodes<BITS>) return vreinterpretq_s8_u8(veorq_u8(codes, vdupq_n_u8(0x80)));
  else return vqtbl1q_s8(lut, codes);
}

// 16 int8 levels -> four float32x4 (levels are in [-128, 127], exact in float).
inline void widen(int8x16_t v, float32x4_t out[4]) {
  const int16x8_t l = vmovl_s8(vget_low_s8(v)), h = vmovl_s8(vget_high_s8(v));
  out[0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(l)));
  out[1] = vcvtq_f32_s32(vmovl_s16(vget_high_s16(l)));
  out[2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(h)));
  out[3] = vcvtq_f32_s32(vmovl_s16(vget_high_s16(h)));
}

// The levels of 32 byte-codes (lo: codes 0..15, hi: 16..31) as eight float32x4: lanes of f[q] are codes
// 4q .. 4q+3.
template <int BITS>
inline void code_floats(uint8x16_t lo, uint8x16_t hi, int8x16_t lut, float32x4_t f[8]) {
  widen(code_levels<BITS>(lo, lut), f);
  widen(code_levels<BITS>(hi, lut), f + 4);
}

inline int8x16_t block_lut(const PreparedWeight& w, int64_t blk) { return vld1q_s8(w.lut[w.theta[blk]]); }

// scalar: Y[n] = Σ_b d_b · (Σ_k L[c_k]·a_k + o_b · Σ_k a_k) + bias[n], the same sum as gemm_scalar.cc
// written block by block so the scale multiplies once per block. CH = chunk_of<BITS>(block_size).
template <int BITS, int CH>
void gemv(const GemmProblem& p, int64_t n0, int64_t n1) {
  const PreparedWeight& w = *p.w;
  const int64_t nb = w.shape.blocks_per_column(), bs = w.shape.block_size, bb = w.shape.block_bytes();
  const float* a = p.a_pad;
  const int64_t column_bytes = nb * bb;
  for (int64_t n = n0; n < n1; ++n) {
    // As in the AVX2 kernel: one column's codes are too short a stream for the hardware prefetcher to get
    // ahead of, so ask for the codes two columns ahead.
    if (n + 2 < n1) {
      const uint8_t* ahead = w.codes + (n + 2) * column_bytes;
      for (int64_t off = 0; off < column_bytes; off += 64) __builtin_prefetch(ahead + off, 0, 3);
    }
    float32x4_t acc = vdupq_n_f32(0.f);
    float offset_acc = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t blk = n * nb + b;
      const uint8_t* codes = w.codes + blk * bb;
      const int8x16_t lut = block_lut(w, blk);
      const float* ab = a + b * bs;
      // Four independent accumulators: a group is 8 FMAs, and one chain would wait on FMA latency.
      float32x4_t d0 = vdupq_n_f32(0.f), d1 = d0, d2 = d0, d3 = d0;
      for (int64_t k0 = 0; k0 < bs; k0 += CH) {
        uint8x16_t cv[CH / 16];
        chunk_codes<BITS, CH>(codes + k0 * BITS / 8, cv);
        for (int v = 0; v < CH / 32; ++v) {
          float32x4_t f[8];
          code_floats<BITS>(cv[2 * v], cv[2 * v + 1], lut, f);
          const float* ag = ab + k0 + 32 * v;
          d0 = vfmaq_f32(d0, f[0], vld1q_f32(ag));
          d1 = vfmaq_f32(d1, f[1], vld1q_f32(ag + 4));
          d2 = vfmaq_f32(d2, f[2], vld1q_f32(ag + 8));
          d3 = vfmaq_f32(d3, f[3], vld1q_f32(ag + 12));
          d0 = vfmaq_f32(d0, f[4], vld1q_f32(ag + 16));
          d1 = vfmaq_f32(d1, f[5], vld1q_f32(ag + 20));
          d2 = vfmaq_f32(d2, f[6], vld1q_f32(ag + 24));
          d3 = vfmaq_f32(d3, f[7], vld1q_f32(ag + 28));
        }
      }
      const float32x4_t dsum = vaddq_f32(vaddq_f32(d0, d1), vaddq_f32(d2, d3));
      acc = vfmaq_n_f32(acc, dsum, w.scale[blk]);
      offset_acc += w.scale[blk] * w.offset[blk] * p.a_sums[b];
    }
    p.Y[n] = vaddvq_f32(acc) + offset_acc + (p.bias ? p.bias[n] : 0.f);
  }
}

constexpr int kTileN = 16;

// 4x4 float transpose: r[i] lane j -> out[j] lane i.
inline void transpose4(const float32x4_t r[4], float32x4_t out[4]) {
  const float32x4_t t0 = vtrn1q_f32(r[0], r[1]), t1 = vtrn2q_f32(r[0], r[1]);
  const float32x4_t t2 = vtrn1q_f32(r[2], r[3]), t3 = vtrn2q_f32(r[2], r[3]);
  out[0] = vreinterpretq_f32_f64(vtrn1q_f64(vreinterpretq_f64_f32(t0), vreinterpretq_f64_f32(t2)));
  out[1] = vreinterpretq_f32_f64(vtrn1q_f64(vreinterpretq_f64_f32(t1), vreinterpretq_f64_f32(t3)));
  out[2] = vreinterpretq_f32_f64(vtrn2q_f64(vreinterpretq_f64_f32(t0), vreinterpretq_f64_f32(t2)));
  out[3] = vreinterpretq_f32_f64(vtrn2q_f64(vreinterpretq_f64_f32(t1), vreinterpretq_f64_f32(t3)));
}

// Decodes columns [n0, n0+16) (zeros past N) into tile[k][16] as full float weights d·(L[c]+o), for
// k < padded_K (scalar: decode_block per column, then tile[k][j] = column_j[k]).
// Four columns are decoded side by side: each gives eight float32x4 per group (k along the lanes), and a
// 4x4 transpose (trn1/trn2, cheap on NEON) turns them into vectors along the tile row (4 columns at one
// k), stored whole, instead of 32 strided scalar stores per column and group. CH = chunk_of<BITS>(block_size).
template <int BITS, int CH>
void decode_tile(const PreparedWeight& w, int64_t n0, float* tile) {
  const int64_t nb = w.shape.blocks_per_column(), bs = w.shape.block_size, bb = w.shape.block_bytes();
  const int64_t N = w.shape.N;
  for (int j0 = 0; j0 < kTileN; j0 += 4) {
    const int live = static_cast<int>(std::clamp<int64_t>(N - (n0 + j0), 0, 4));  // columns < N here
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* codes[4];
      int8x16_t lut[4];
      float32x4_t d[4], o[4];
      for (int c = 0; c < live; ++c) {
        const int64_t blk = (n0 + j0 + c) * nb + b;
        codes[c] = w.codes + blk * bb;
        lut[c] = block_lut(w, blk);
        d[c] = vdupq_n_f32(w.scale[blk]);
        o[c] = vdupq_n_f32(w.offset[blk]);
      }
      for (int64_t k0 = 0; k0 < bs; k0 += CH) {
        uint8x16_t cv[4][CH / 16];
        for (int c = 0; c < live; ++c) chunk_codes<BITS, CH>(codes[c] + k0 * BITS / 8, cv[c]);
        for (int v = 0; v < CH / 32; ++v) {
          float32x4_t f[4][8];  // f[column][q]: k = 4q .. 4q+3 of these 32 codes
          for (int c = 0; c < 4; ++c) {
            if (c < live) {
              code_floats<BITS>(cv[c][2 * v], cv[c][2 * v + 1], lut[c], f[c]);
              for (int q = 0; q < 8; ++q) f[c][q] = vmulq_f32(d[c], vaddq_f32(f[c][q], o[c]));
            } else {
              for (int q = 0; q < 8; ++q) f[c][q] = vdupq_n_f32(0.f);
            }
          }
          float* dst = tile + (b * bs + k0 + 32 * v) * kTileN + j0;
          for (int q = 0; q < 8; ++q) {
            const float32x4_t r[4] = {f[0][q], f[1][q], f[2][q], f[3][q]};
            float32x4_t t[4];
            transpose4(r, t);
            for (int i = 0; i < 4; ++i) vst1q_f32(dst + (4 * q + i) * kTileN, t[i]);
          }
        }
      }
    }
  }
}

// acc[r][0..3] = Σ_k a[r][k] · tile[k][0..15] over k < K4 (a multiple of 4). The activations are read
// four k at a time and broadcast from a lane (vfmaq_laneq_f32), which saves a load per FMA group;
// 4 rows x 4 vectors = 16 accumulators + 4 tile vectors + 4 activation vectors fit NEON's 32 registers.
template <int ROWS>
inline void micro_kernel(const float* a, int64_t lda, const float* tile, int64_t K4, float32x4_t acc[][4]) {
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < 4; ++v) acc[r][v] = vdupq_n_f32(0.f);
  for (int64_t k = 0; k < K4; k += 4) {
    float32x4_t av[ROWS];
    for (int r = 0; r < ROWS; ++r) av[r] = vld1q_f32(a + r * lda + k);
    const float* t = tile + k * kTileN;
#define RBE_NEON_STEP(LANE)                                                          \
    {                                                                                \
      const float* tl = t + (LANE) * kTileN;                                         \
      const float32x4_t b0 = vld1q_f32(tl), b1 = vld1q_f32(tl + 4);                  \
      const float32x4_t b2 = vld1q_f32(tl + 8), b3 = vld1q_f32(tl + 12);             \
      for (int r = 0; r < ROWS; ++r) {                                               \
        acc[r][0] = vfmaq_laneq_f32(acc[r][0], b0, av[r], LANE);                     \
        acc[r][1] = vfmaq_laneq_f32(acc[r][1], b1, av[r], LANE);                     \
        acc[r][2] = vfmaq_laneq_f32(acc[r][2], b2, av[r], LANE);                     \
        acc[r][3] = vfmaq_laneq_f32(acc[r][3], b3, av[r], LANE);                     \
      }                                                                              \
    }
    // The lane of vfmaq_laneq_f32 must be a compile-time constant, hence the macro rather than a loop.
    RBE_NEON_STEP(0)
    RBE_NEON_STEP(1)
    RBE_NEON_STEP(2)
    RBE_NEON_STEP(3)
#undef RBE_NEON_STEP
  }
}

template <int BITS, int CH>
void gemm_tiles(const GemmProblem& p, int64_t n0, int64_t n1) {
  const PreparedWeight& w = *p.w;
  const int64_t Kp = w.shape.padded_K(), K = w.shape.K, N = w.shape.N;
  // K rounded up to 4 for the micro-kernel's 4-wide steps. Kp is a multiple of 32, so K4 <= Kp: the extra
  // k meet zero padding in a_pad and finite decoded tail codes in the tile, adding exact zeros.
  const int64_t K4 = (K + 3) & ~int64_t{3};
  thread_local std::vector<float> storage;
  storage.resize(static_cast<size_t>(Kp * kTileN));
  float* tile = storage.data();
  float out[kTileN];
  for (int64_t t0 = n0; t0 < n1; t0 += kTileN) {
    decode_tile<BITS, CH>(w, t0, tile);
    const int64_t cols = std::min<int64_t>(kTileN, N - t0);
    auto store = [&](int64_t m, const float32x4_t* acc) {
      for (int v = 0; v < 4; ++v) vst1q_f32(out + 4 * v, acc[v]);
      float* y = p.Y + m * N + t0;
      for (int64_t j = 0; j < cols; ++j) y[j] = out[j] + (p.bias ? p.bias[t0 + j] : 0.f);
    };
    int64_t m = 0;
    float32x4_t acc[4][4];
    for (; m + 4 <= p.M; m += 4) {
      micro_kernel<4>(p.a_pad + m * Kp, Kp, tile, K4, acc);
      for (int r = 0; r < 4; ++r) store(m + r, acc[r]);
    }
    for (; m < p.M; ++m) {
      micro_kernel<1>(p.a_pad + m * Kp, Kp, tile, K4, acc);
      store(m, acc[0]);
    }
  }
}

// ---- int8 path (accuracy_level 4, FORMAT.md §2.1) ------------------------------------------------------
// The activations come quantized (q int8 in [-127, 127], one scale s and Σq per row and block). A group's
// 32 int8 levels L (vqtbl1q_s8, as above) meet q through vmull_s8/vmlal_s8 (two products per int16 lane:
// |L·q| <= 128·127, a pair fits int16) and vpadalq_s16 into int32: the block's Σ L·q exactly, as the
// scalar reference computes it, started at o·Σq so that it ends at §2.1's bracket Σ L·q + o·Σq (the offset
// costs one scalar multiply per block). Per block: Y += d·s·(Σ L·q + o·Σq).

// acc += Σ over 16 lanes of l·q, pairwise into four int32 lanes.
inline int32x4_t dot16(int32x4_t acc, int8x16_t l, int8x16_t q) {
  int16x8_t pr = vmull_s8(vget_low_s8(l), vget_low_s8(q));
  pr = vmlal_s8(pr, vget_high_s8(l), vget_high_s8(q));
  return vpadalq_s16(acc, pr);
}

// Rows [m0, m0+R) against columns [n0, n1); each group of levels is decoded once for all R rows.
template <int BITS, int CH, int R>
void gemv_int8(const GemmProblem& p, int64_t m0, int64_t n0, int64_t n1) {
  const PreparedWeight& w = *p.w;
  const int64_t nb = w.shape.blocks_per_column(), bs = w.shape.block_size, bb = w.shape.block_bytes();
  const int64_t Kp = w.shape.padded_K(), N = w.shape.N;
  const int8_t* q = p.a_q + m0 * Kp;
  const float* sa = p.a_scale + m0 * nb;
  const int32_t* qsum = p.a_qsum + m0 * nb;
  const int64_t column_bytes = nb * bb;
  for (int64_t n = n0; n < n1; ++n) {
    if (n + 2 < n1) {
      const uint8_t* ahead = w.codes + (n + 2) * column_bytes;
      for (int64_t off = 0; off < column_bytes; off += 64) __builtin_prefetch(ahead + off, 0, 3);
    }
    float32x4_t acc[R];
    for (int r = 0; r < R; ++r) acc[r] = vdupq_n_f32(0.f);
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t blk = n * nb + b;
      const uint8_t* codes = w.codes + blk * bb;
      const int8x16_t lut = block_lut(w, blk);
      const int32_t o = static_cast<int32_t>(w.offset[blk]);
      int32x4_t d0[R], d1[R];
      for (int r = 0; r < R; ++r) {
        d0[r] = vsetq_lane_s32(o * qsum[r * nb + b], vdupq_n_s32(0), 0);
        d1[r] = vdupq_n_s32(0);
      }
      for (int64_t k0 = 0; k0 < bs; k0 += CH) {
        uint8x16_t cv[CH / 16];
        chunk_codes<BITS, CH>(codes + k0 * BITS / 8, cv);
        for (int v = 0; v < CH / 32; ++v) {
          const int8x16_t lo = code_levels<BITS>(cv[2 * v], lut), hi = code_levels<BITS>(cv[2 * v + 1], lut);
          for (int r = 0; r < R; ++r) {
            const int8_t* qg = q + r * Kp + b * bs + k0 + 32 * v;
            d0[r] = dot16(d0[r], lo, vld1q_s8(qg));
            d1[r] = dot16(d1[r], hi, vld1q_s8(qg + 16));
          }
        }
      }
      const float d = w.scale[blk];
      for (int r = 0; r < R; ++r)
        acc[r] = vfmaq_n_f32(acc[r], vcvtq_f32_s32(vaddq_s32(d0[r], d1[r])), d * sa[r * nb + b]);
    }
    for (int r = 0; r < R; ++r) p.Y[(m0 + r) * N + n] = vaddvq_f32(acc[r]) + (p.bias ? p.bias[n] : 0.f);
  }
}

// Any M: four rows at a time share each decoded group (a tile path like the float one would decode each
// weight once per call instead of once per four rows; on ARM this path has not been tuned yet).
template <int BITS, int CH>
void run_int8(const GemmProblem& p, int64_t n0, int64_t n1) {
  int64_t m = 0;
  for (; m + 4 <= p.M; m += 4) gemv_int8<BITS, CH, 4>(p, m, n0, n1);
  switch (p.M - m) {
    case 3: gemv_int8<BITS, CH, 3>(p, m, n0, n1); break;
    case 2: gemv_int8<BITS, CH, 2>(p, m, n0, n1); break;
    case 1: gemv_int8<BITS, CH, 1>(p, m, n0, n1); break;
    default: break;
  }
}

template <int BITS, int CH>
void run(const GemmProblem& p, int64_t n0, int64_t n1) {
  if (p.a_q) run_int8<BITS, CH>(p, n0, n1);
  else if (p.M == 1) gemv<BITS, CH>(p, n0, n1);
  else gemm_tiles<BITS, CH>(p, n0, n1);
}

template <int BITS>
void run_bits(const GemmProblem& p, int64_t n0, int64_t n1) {
  if constexpr (BITS != 3) {
    run<BITS, kGroup>(p, n0, n1);
  } else {
    switch (chunk_of<BITS>(p.w->shape.block_size)) {
      case 32: return run<BITS, 32>(p, n0, n1);
      case 64: return run<BITS, 64>(p, n0, n1);
      default: return run<BITS, 128>(p, n0, n1);
    }
  }
}

}  // namespace

void gemm_columns_neon(const GemmProblem& p, int64_t n0, int64_t n1) {
  switch (p.w->shape.bits) {
    case 2: return run_bits<2>(p, n0, n1);
    case 3: return run_bits<3>(p, n0, n1);
    case 4: return run_bits<4>(p, n0, n1);
    case 5: return run_bits<5>(p, n0, n1);
    case 6: return run_bits<6>(p, n0, n1);
    default: return run_bits<8>(p, n0, n1);
  }
}

}  // namespace rbe

// AVX2/FMA kernel (compiled with -mavx2 -mfma, chosen at run time by CPUID).
// M == 1 (decode): per column, 32 codes at a time become 32 int8 levels through shifts, masks and one
// pshufb table lookup; they are widened to floats and FMA'd against the activations; the block scale is
// applied once per block and the offset through the precomputed block sums.
// M > 1 (prefill): a tile of 16 columns is decoded into a cache-resident [K][16] float buffer that feeds a
// 4-row x 16-column FMA micro-kernel, so each weight is decoded once per tile, not once per row.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels_internal.h"

namespace rbe {
namespace {

// 32 byte-codes of one packing group (FORMAT.md §4), in order 0..31.
template <int BITS>
inline __m256i group_codes(const uint8_t* p) {
  if constexpr (BITS == 8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  } else if constexpr (BITS == 4) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i m = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
  } else {
    const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    const __m128i m = _mm_set1_epi8(0x03);
    const __m128i lo = _mm_and_si128(_mm_unpacklo_epi64(v, _mm_srli_epi16(v, 2)), m);
    const __m128i hi = _mm_and_si128(_mm_unpacklo_epi64(_mm_srli_epi16(v, 4), _mm_srli_epi16(v, 6)), m);
    __m256i codes = _mm256_set_m128i(hi, lo);
    if constexpr (BITS == 3) {
      uint32_t high;
      std::memcpy(&high, p + 8, 4);
      // Byte t takes byte t/8 of `high`, then keeps bit t%8 of it.
      const __m256i spread = _mm256_shuffle_epi8(
          _mm256_set1_epi32(static_cast<int>(high)),
          _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                           2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
      const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ULL));
      const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
      codes = _mm256_or_si256(codes, _mm256_and_si256(set, _mm256_set1_epi8(4)));
    }
    return codes;
  }
}

// int8 levels L[c] of a group's 32 codes.
template <int BITS>
inline __m256i group_levels(const uint8_t* p, __m256i lut) {
  const __m256i codes = group_codes<BITS>(p);
  if constexpr (BITS == 8) return _mm256_xor_si256(codes, _mm256_set1_epi8(static_cast<char>(0x80)));
  else return _mm256_shuffle_epi8(lut, codes);
}

inline __m256 widen(__m128i bytes8) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes8)); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256i block_lut(const PreparedWeight& w, int64_t blk) {
  return _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(w.lut[w.theta[blk]])));
}

// Rows [m0, m0+R) against columns [n0, n1): each group of codes is decoded once into four float vectors
// and used by all R rows, so batched decoding (R = batch size) costs little more than one row.
template <int BITS, int R>
void gemv_rows(const GemmProblem& p, int64_t m0, int64_t n0, int64_t n1) {
  const PreparedWeight& w = *p.w;
  const int64_t nb = w.shape.blocks_per_column(), bs = w.shape.block_size, bb = w.shape.block_bytes();
  const int64_t Kp = w.shape.padded_K(), N = w.shape.N;
  const float* a = p.a_pad + m0 * Kp;
  const float* sums = p.a_sums + m0 * nb;
  const int64_t column_bytes = nb * bb;
  for (int64_t n = n0; n < n1; ++n) {
    // One column's codes are a stream too short for the hardware prefetcher to get ahead of: ask for the
    // column two ahead explicitly (measured: 2.5 -> 6.4 GB/s streaming a GPT-2-small from DRAM).
    if (n + 2 < n1) {
      const char* ahead = reinterpret_cast<const char*>(w.codes + (n + 2) * column_bytes);
      for (int64_t off = 0; off < column_bytes; off += 64) _mm_prefetch(ahead + off, _MM_HINT_T0);
    }
    __m256 acc[R];
    float offset_acc[R];
    for (int r = 0; r < R; ++r) { acc[r] = _mm256_setzero_ps(); offset_acc[r] = 0.f; }
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t blk = n * nb + b;
      const uint8_t* codes = w.codes + blk * bb;
      const __m256i lut = block_lut(w, blk);
      __m256 d0[R], d1[R];  // two chains per row hide the FMA latency
      for (int r = 0; r < R; ++r) d0[r] = d1[r] = _mm256_setzero_ps();
      for (int64_t g = 0; g < bs; g += 32) {
        const __m256i lv = group_levels<BITS>(codes + g * BITS / 8, lut);
        const __m128i lo = _mm256_castsi256_si128(lv), hi = _mm256_extracti128_si256(lv, 1);
        const __m256 w0 = widen(lo), w1 = widen(_mm_srli_si128(lo, 8));
        const __m256 w2 = widen(hi), w3 = widen(_mm_srli_si128(hi, 8));
        for (int r = 0; r < R; ++r) {
          const float* ab = a + r * Kp + b * bs + g;
          d0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(ab), d0[r]);
          d1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(ab + 8), d1[r]);
          d0[r] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(ab + 16), d0[r]);
          d1[r] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(ab + 24), d1[r]);
        }
      }
      const __m256 d = _mm256_set1_ps(w.scale[blk]);
      const float d_o = w.scale[blk] * w.offset[blk];
      for (int r = 0; r < R; ++r) {
        acc[r] = _mm256_fmadd_ps(_mm256_add_ps(d0[r], d1[r]), d, acc[r]);
        offset_acc[r] += d_o * sums[r * nb + b];
      }
    }
    for (int r = 0; r < R; ++r)
      p.Y[(m0 + r) * N + n] = hsum(acc[r]) + offset_acc[r] + (p.bias ? p.bias[n] : 0.f);
  }
}

constexpr int kTileN = 16;
constexpr int64_t kChunkK = 256;

inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20); r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20); r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31); r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31); r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// Decodes columns [n0, n0+16) (zeros past N) into tile[k][16] as full float weights d·(L[c]+o). Eight
// columns are decoded side by side and turned with 8x8 register transposes: one vector store per 8 weights
// instead of a scattered scalar store per weight.
template <int BITS>
void decode_tile(const PreparedWeight& w, int64_t n0, float* tile) {
  const int64_t nb = w.shape.blocks_per_column(), bs = w.shape.block_size, bb = w.shape.block_bytes();
  for (int half = 0; half < kTileN / 8; ++half) {
    const int64_t c0 = n0 + 8 * half;
    const int live = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(8, w.shape.N - c0)));
    for (int64_t b = 0; b < nb; ++b) {
      __m256 d[8], o[8];
      __m256i lut[8];
      const uint8_t* codes[8];
      for (int j = 0; j < 8; ++j) {
        const int64_t blk = (c0 + std::min(j, std::max(live - 1, 0))) * nb + b;
        const bool ok = j < live;
        d[j] = _mm256_set1_ps(ok ? w.scale[blk] : 0.f);  // dead columns decode to exact zeros
        o[j] = _mm256_set1_ps(ok ? w.offset[blk] : 0.f);
        lut[j] = live ? block_lut(w, blk) : _mm256_setzero_si256();
        codes[j] = live ? w.codes + blk * bb : nullptr;
      }
      for (int64_t g = 0; g < bs; g += 32) {
        __m256i lv[8];
        for (int j = 0; j < 8; ++j)
          lv[j] = codes[j] ? group_levels<BITS>(codes[j] + g * BITS / 8, lut[j]) : _mm256_setzero_si256();
        for (int q = 0; q < 4; ++q) {
          __m256 v[8];
          for (int j = 0; j < 8; ++j) {
            const __m128i half128 = q < 2 ? _mm256_castsi256_si128(lv[j]) : _mm256_extracti128_si256(lv[j], 1);
            const __m128i bytes = (q & 1) ? _mm_srli_si128(half128, 8) : half128;
            v[j] = _mm256_mul_ps(d[j], _mm256_add_ps(widen(bytes), o[j]));
          }
          transpose8(v);
          float* dst = tile + (b * bs + g + 8 * q) * kTileN + 8 * half;
          for (int t = 0; t < 8; ++t) _mm256_store_ps(dst + t * kTileN, v[t]);
        }
      }
    }
  }
}

// ROWS x 16 outputs: 2·ROWS accumulators + 2 weight vectors + 1 broadcast fit the 16 ymm registers at
// ROWS = 6, the usual AVX2 shape that keeps both FMA ports busy.
// Accumulates over k in [k0, k1) into y (first chunk: starts from the bias instead).
template <int ROWS>
inline void micro_kernel(const float* a, int64_t lda, const float* tile, int64_t k0, int64_t k1, float* y,
                         int64_t ldy, int64_t cols, const float* bias, bool first) {
  __m256 acc[ROWS][2];
  for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = k0; k < k1; ++k) {
    const __m256 b0 = _mm256_load_ps(tile + k * kTileN), b1 = _mm256_load_ps(tile + k * kTileN + 8);
    for (int r = 0; r < ROWS; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * lda + k);
      acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
    }
  }
  alignas(32) float out[kTileN];
  for (int r = 0; r < ROWS; ++r) {
    _mm256_store_ps(out, acc[r][0]);
    _mm256_store_ps(out + 8, acc[r][1]);
    float* dst = y + r * ldy;
    if (first)
      for (int64_t j = 0; j < cols; ++j) dst[j] = out[j] + (bias ? bias[j] : 0.f);
    else
      for (int64_t j = 0; j < cols; ++j) dst[j] += out[j];
  }
}

template <int BITS>
void gemm_tiles(const GemmProblem& p, int64_t n0, int64_t n1) {
  const PreparedWeight& w = *p.w;
  const int64_t Kp = w.shape.padded_K(), K = w.shape.K, N = w.shape.N;
  thread_local std::vector<float> storage;
  storage.resize(Kp * kTileN + 8);
  float* tile = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(storage.data()) + 31) & ~uintptr_t{31});
  for (int64_t t0 = n0; t0 < n1; t0 += kTileN) {
    decode_tile<BITS>(w, t0, tile);
    const int64_t cols = std::min<int64_t>(kTileN, N - t0);
    const float* bias = p.bias ? p.bias + t0 : nullptr;
    // K in chunks so the tile slice (16 KB) and the activation rows stay in L1 across a row block.
    for (int64_t k0 = 0; k0 < K; k0 += kChunkK) {
      const int64_t k1 = std::min(K, k0 + kChunkK);
      const bool first = k0 == 0;
      int64_t m = 0;
      for (; m + 6 <= p.M; m += 6)
        micro_kernel<6>(p.a_pad + m * Kp, Kp, tile, k0, k1, p.Y + m * N + t0, N, cols, bias, first);
      const float* a = p.a_pad + m * Kp;
      float* y = p.Y + m * N + t0;
      switch (p.M - m) {
        case 5: micro_kernel<5>(a, Kp, tile, k0, k1, y, N, cols, bias, first); break;
        case 4: micro_kernel<4>(a, Kp, tile, k0, k1, y, N, cols, bias, first); break;
        case 3: micro_kernel<3>(a, Kp, tile, k0, k1, y, N, cols, bias, first); break;
        case 2: micro_kernel<2>(a, Kp, tile, k0, k1, y, N, cols, bias, first); break;
        case 1: micro_kernel<1>(a, Kp, tile, k0, k1, y, N, cols, bias, first); break;
        default: break;
      }
    }
  }
}

// Up to this many rows the register GEMV wins: it decodes each weight once per call, the tile path
// pays a tile decode plus stores; beyond it the micro-kernel's reuse of each decoded tile wins.
constexpr int64_t kMaxGemvRows = 4;

template <int BITS>
void run(const GemmProblem& p, int64_t n0, int64_t n1) {
  if (p.M > kMaxGemvRows) return gemm_tiles<BITS>(p, n0, n1);
  switch (p.M) {
    case 1: return gemv_rows<BITS, 1>(p, 0, n0, n1);
    case 2: return gemv_rows<BITS, 2>(p, 0, n0, n1);
    case 3: return gemv_rows<BITS, 3>(p, 0, n0, n1);
    default: return gemv_rows<BITS, 4>(p, 0, n0, n1);
  }
}

}  // namespace

void gemm_columns_avx2(const GemmProblem& p, int64_t n0, int64_t n1) {
  switch (p.w->shape.bits) {
    case 2: return run<2>(p, n0, n1);
    case 3: return run<3>(p, n0, n1);
    case 4: return run<4>(p, n0, n1);
    default: return run<8>(p, n0, n1);
  }
}

}  // namespace rbe

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

template <int BITS>
void gemv(const GemmProblem& p, int64_t n0, int64_t n1) {
  const PreparedWeight& w = *p.w;
  const int64_t nb = w.shape.blocks_per_column(), bs = w.shape.block_size, bb = w.shape.block_bytes();
  const float* a = p.a_pad;
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc = _mm256_setzero_ps();
    float offset_acc = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t blk = n * nb + b;
      const uint8_t* codes = w.codes + blk * bb;
      const __m256i lut = block_lut(w, blk);
      const float* ab = a + b * bs;
      __m256 d0 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps();
      for (int64_t g = 0; g < bs; g += 32) {
        const __m256i lv = group_levels<BITS>(codes + g * BITS / 8, lut);
        const __m128i lo = _mm256_castsi256_si128(lv), hi = _mm256_extracti128_si256(lv, 1);
        d0 = _mm256_fmadd_ps(widen(lo), _mm256_loadu_ps(ab + g), d0);
        d1 = _mm256_fmadd_ps(widen(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(ab + g + 8), d1);
        d0 = _mm256_fmadd_ps(widen(hi), _mm256_loadu_ps(ab + g + 16), d0);
        d1 = _mm256_fmadd_ps(widen(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(ab + g + 24), d1);
      }
      acc = _mm256_fmadd_ps(_mm256_add_ps(d0, d1), _mm256_set1_ps(w.scale[blk]), acc);
      offset_acc += w.scale[blk] * w.offset[blk] * p.a_sums[b];
    }
    p.Y[n] = hsum(acc) + offset_acc + (p.bias ? p.bias[n] : 0.f);
  }
}

constexpr int kTileN = 16;

// Decodes columns [n0, n0+16) (zeros past N) into tile[k][16] as full float weights d·(L[c]+o).
template <int BITS>
void decode_tile(const PreparedWeight& w, int64_t n0, float* tile) {
  const int64_t nb = w.shape.blocks_per_column(), bs = w.shape.block_size, bb = w.shape.block_bytes();
  const int64_t Kp = w.shape.padded_K();
  alignas(32) float vals[32];
  for (int j = 0; j < kTileN; ++j) {
    const int64_t n = n0 + j;
    if (n >= w.shape.N) {
      for (int64_t k = 0; k < Kp; ++k) tile[k * kTileN + j] = 0.f;
      continue;
    }
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t blk = n * nb + b;
      const uint8_t* codes = w.codes + blk * bb;
      const __m256i lut = block_lut(w, blk);
      const __m256 d = _mm256_set1_ps(w.scale[blk]), o = _mm256_set1_ps(w.offset[blk]);
      for (int64_t g = 0; g < bs; g += 32) {
        const __m256i lv = group_levels<BITS>(codes + g * BITS / 8, lut);
        const __m128i lo = _mm256_castsi256_si128(lv), hi = _mm256_extracti128_si256(lv, 1);
        _mm256_store_ps(vals, _mm256_mul_ps(d, _mm256_add_ps(widen(lo), o)));
        _mm256_store_ps(vals + 8, _mm256_mul_ps(d, _mm256_add_ps(widen(_mm_srli_si128(lo, 8)), o)));
        _mm256_store_ps(vals + 16, _mm256_mul_ps(d, _mm256_add_ps(widen(hi), o)));
        _mm256_store_ps(vals + 24, _mm256_mul_ps(d, _mm256_add_ps(widen(_mm_srli_si128(hi, 8)), o)));
        float* dst = tile + (b * bs + g) * kTileN + j;
        for (int t = 0; t < 32; ++t) dst[t * kTileN] = vals[t];
      }
    }
  }
}

template <int ROWS>
inline void micro_kernel(const float* a, int64_t lda, const float* tile, int64_t K, __m256 acc[][2]) {
  for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_load_ps(tile + k * kTileN), b1 = _mm256_load_ps(tile + k * kTileN + 8);
    for (int r = 0; r < ROWS; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * lda + k);
      acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
    }
  }
}

template <int BITS>
void gemm_tiles(const GemmProblem& p, int64_t n0, int64_t n1) {
  const PreparedWeight& w = *p.w;
  const int64_t Kp = w.shape.padded_K(), K = w.shape.K, N = w.shape.N;
  thread_local std::vector<float, std::allocator<float>> storage;
  storage.resize(Kp * kTileN + 8);
  float* tile = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(storage.data()) + 31) & ~uintptr_t{31});
  alignas(32) float out[kTileN];
  for (int64_t t0 = n0; t0 < n1; t0 += kTileN) {
    decode_tile<BITS>(w, t0, tile);
    const int64_t cols = std::min<int64_t>(kTileN, N - t0);
    auto store = [&](int64_t m, __m256 lo, __m256 hi) {
      _mm256_store_ps(out, lo);
      _mm256_store_ps(out + 8, hi);
      float* y = p.Y + m * N + t0;
      for (int64_t j = 0; j < cols; ++j) y[j] = out[j] + (p.bias ? p.bias[t0 + j] : 0.f);
    };
    int64_t m = 0;
    __m256 acc[4][2];
    for (; m + 4 <= p.M; m += 4) {
      micro_kernel<4>(p.a_pad + m * Kp, Kp, tile, K, acc);
      for (int r = 0; r < 4; ++r) store(m + r, acc[r][0], acc[r][1]);
    }
    for (; m < p.M; ++m) {
      micro_kernel<1>(p.a_pad + m * Kp, Kp, tile, K, acc);
      store(m, acc[0][0], acc[0][1]);
    }
  }
}

template <int BITS>
void run(const GemmProblem& p, int64_t n0, int64_t n1) {
  if (p.M == 1) gemv<BITS>(p, n0, n1);
  else gemm_tiles<BITS>(p, n0, n1);
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

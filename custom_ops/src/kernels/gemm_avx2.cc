// AVX2/FMA kernel (compiled with -mavx2 -mfma, chosen at run time by CPUID).
// Float path (accuracy_level 0):
// M == 1 (decode): per column, 32 codes at a time (read a chunk at a time, FORMAT.md §4) become 32 int8
// levels through shifts, masks and one pshufb table lookup; they are widened to floats and FMA'd against
// the activations; the block scale is applied once per block and the offset through the precomputed block
// sums.
// M > 1 (prefill): a tile of 16 columns is decoded into a cache-resident [K][16] float buffer that feeds a
// 6-row x 16-column FMA micro-kernel, so each weight is decoded once per tile, not once per row.
// Int8 path (accuracy_level 4, activations quantized by the dispatcher): gemm_avx2_int8.inc, compiled three
// times: on AVX2 (pmaddubsw with the sign trick), for AVX-VNNI (vpdpbusd) and for AVX-512 F/BW/VL/VNNI/VBMI
// (vpdpbusd, and vpermb / vpternlogd in the GEMV's decoding; the GEMV on 512-bit registers where the code
// layout allows, the prefill tiles on 256-bit ones).
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels_internal.h"

namespace rbe {
namespace {

// 32 byte-codes of one packing group of 2-, 4-, 5-, 6- or 8-bit codes (FORMAT.md §4), in order 0..31. 2- and
// 4-bit codes are shifted into place but not masked: bits 0 to BITS-1 of byte i are code i, the bits above
// are whatever the shift brought in (the AVX-512 GEMV's vpermb table ignores them; group_codes masks them
// off). The other widths come as L + 128 (kByteCodes).
template <int BITS>
inline __m256i group_fields(const uint8_t* p) {
  static_assert(BITS != 3, "3-bit codes come in chunks: chunk3_planes");
  if constexpr (BITS == 8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  } else if constexpr (BITS == 5 || BITS == 6) {
    // L + 128 = 2^(8−BITS)·c + 2^(7−BITS): the nibble half (16 bytes, as 4-bit codes) with each nibble moved
    // to bit 8 − BITS of its byte, the top bits above it, the constant below.
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    constexpr int up = 8 - BITS, down = BITS - 4;
    const __m256i placed =
        _mm256_sllv_epi32(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, down, down, down, down)),
                          _mm256_setr_epi32(up, up, up, up, 0, 0, 0, 0));
    __m256i top;
    if constexpr (BITS == 5) {
      // Bit i of plane byte j is code 8j + i: byte j copied to codes 8j .. 8j+7, each testing its own bit.
      uint32_t plane;
      std::memcpy(&plane, p + 16, 4);
      const __m256i bytes = _mm256_shuffle_epi8(
          _mm256_set1_epi32(static_cast<int>(plane)),
          _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                           2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
      const __m256i select = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ull));
      top = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(bytes, select), select),
                             _mm256_set1_epi8(static_cast<char>(0x80)));
    } else {
      // 2-bit layout (byte j: codes j, j+8, j+16, j+24 in bits 0-1, 2-3, 4-5, 6-7): 64-bit lane q shifted
      // left by 6 − 2q puts code j + 8q's top bits at bits 6-7 of byte j.
      uint64_t tops;
      std::memcpy(&tops, p + 16, 8);
      top = _mm256_and_si256(_mm256_sllv_epi64(_mm256_set1_epi64x(static_cast<long long>(tops)),
                                               _mm256_setr_epi64x(6, 4, 2, 0)),
                             _mm256_set1_epi8(static_cast<char>(0xC0)));
    }
    const __m256i nibble = _mm256_set1_epi8(static_cast<char>(0x0F << up));
    return _mm256_or_si256(_mm256_or_si256(_mm256_and_si256(placed, nibble), top),
                           _mm256_set1_epi8(static_cast<char>(1 << (7 - BITS))));
  } else if constexpr (BITS == 4) {
    // The 16 bytes in both lanes (one broadcast load); the high lane shifted by 4: low nibbles are codes
    // 0..15, high nibbles 16..31.
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
  } else {
    // The 8 bytes in all four 64-bit lanes, lane q shifted by 2q: bits 0-1 of byte j are code j + 8q.
    uint64_t bytes;
    std::memcpy(&bytes, p, 8);
    return _mm256_srlv_epi64(_mm256_set1_epi64x(static_cast<long long>(bytes)), _mm256_setr_epi64x(0, 2, 4, 6));
  }
}

// group_fields with the bits above each code cleared.
template <int BITS>
inline __m256i group_codes(const uint8_t* p) {
  if constexpr (kByteCodes<BITS>) return group_fields<BITS>(p);
  else return _mm256_and_si256(group_fields<BITS>(p), _mm256_set1_epi8(static_cast<char>((1 << BITS) - 1)));
}

// The two planes of a 3-bit chunk of CH codes, shifted into place but not masked: index i of the chunk's
// byte-codes is built from low[i] (code bits 0-1 at bits 0-1; at 128 codes also the next-but-one run's at
// bits 4-5) and high[i] (the code's bit 2 at bit 2; at 128 codes also at bit 6), the other bits of both
// being whatever the shifts left there. CH / 32 pairs, except at 128 codes: two pairs, each holding two runs
// in the two nibbles of a byte. How the pairs are merged is up to the caller: chunk_codes masks and ors,
// the AVX-512 GEMV selects with one vpternlogd.
// Per vector, the low bits are a shift of the low plane; the high bit is a per-lane variable shift of a
// broadcast of the high plane that brings the bit this lane needs to bit 2 of every byte. A right shift by s
// puts bit 2 + s of each byte at bit 2; a left shift by s puts bit 2 − s there (bits of a lane's top byte
// shifted out are never needed).
template <int CH>
inline void chunk3_planes(const uint8_t* p, __m256i low[], __m256i high[]) {
  if constexpr (CH == 128) {
    // Low plane: 32 bytes, field v (bits 2v, 2v+1) of byte t is code 32v + t. High plane: 16 bytes, bit u
    // of byte j is code j + 16u, so vector v needs bit 2v in the low lane (codes 32v .. 32v+15) and 2v + 1
    // in the high lane. The vectors are built in pairs (0, 2) and (1, 3) in the two nibbles of one byte:
    // fields v and v + 2 sit 4 bits apart in the low plane, and so do the high bits the pair needs in the
    // high plane (bits 2v, 2v + 4 of the low lane; 2v + 1, 2v + 5 of the high lane), so one shift of the
    // high plane puts both at bits 2 and 6.
    const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i hi = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32)));
    low[0] = lo;
    low[1] = _mm256_srli_epi16(lo, 2);
    high[0] = _mm256_sllv_epi32(hi, _mm256_setr_epi32(2, 2, 2, 2, 1, 1, 1, 1));
    high[1] = _mm256_srlv_epi32(hi, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
  } else if constexpr (CH == 64) {
    // Low plane: 16 bytes, field f of byte j is code 16f + j: in both lanes, lane L of vector v shifted by
    // 2·(2v + L). High plane: 8 bytes, bit u of byte j is code j + 8u: in all four 64-bit lanes, lane q
    // of vector v needs bit 4v + q (for v = 0 from a copy shifted left by 2, as bits 0 and 1 need a left
    // shift and bits 2 and 3 a right one).
    const __m256i lo = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    uint64_t bits;
    std::memcpy(&bits, p + 16, 8);
    const __m256i hi = _mm256_set1_epi64x(static_cast<long long>(bits));
    low[0] = _mm256_srlv_epi32(lo, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2));
    low[1] = _mm256_srlv_epi32(lo, _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6));
    high[0] = _mm256_srlv_epi64(_mm256_slli_epi64(hi, 2), _mm256_setr_epi64x(0, 1, 2, 3));
    high[1] = _mm256_srlv_epi64(hi, _mm256_setr_epi64x(2, 3, 4, 5));
  } else {
    // Low plane: the 2-bit group layout (bits 2q of byte j are code j + 8q). High plane: 4 bytes, bit u of
    // byte j is code j + 4u: in all eight 32-bit lanes, lane u needs bit u (two shifts, as for lanes 0 and 1
    // it is a left one).
    uint32_t bits;
    std::memcpy(&bits, p + 8, 4);
    const __m256i hi = _mm256_set1_epi32(static_cast<int>(bits));
    low[0] = group_fields<2>(p);
    high[0] = _mm256_srlv_epi32(_mm256_sllv_epi32(hi, _mm256_setr_epi32(2, 1, 0, 0, 2, 1, 0, 0)),
                                _mm256_setr_epi32(0, 0, 0, 1, 4, 4, 4, 5));
  }
}

// The byte-codes of one chunk of CH codes (CH = chunk_of<BITS>): codes 32v .. 32v+31 in out[v], as pshufb
// indices: a code in bits 0-3 and bit 7 clear, bits 4-6 possibly not zero (pshufb ignores them, and every
// consumer is a table lookup); kByteCodes widths as L + 128.
template <int BITS, int CH>
inline void chunk_codes(const uint8_t* p, __m256i out[CH / 32]) {
  if constexpr (BITS != 3) {
    out[0] = group_codes<BITS>(p);
  } else {
    __m256i low[CH / 32], high[CH / 32];
    chunk3_planes<CH>(p, low, high);
    if constexpr (CH == 128) {
      // Both nibbles of each pair at once: (low & 0x33) | (high & 0x44). Vector v + 2 is that byte's high
      // nibble shifted down by a 16-bit shift, which drags the next byte's low bits into bits 4-7: bit 7 is
      // the next byte's bit 3, masked to 0, and bits 4-6 are ignored by pshufb. 11 operations per 128 codes
      // (17 when each vector was masked clean).
      const __m256i fields = _mm256_set1_epi8(0x33), high_bits = _mm256_set1_epi8(0x44);
      for (int v = 0; v < 2; ++v)
        out[v] = _mm256_or_si256(_mm256_and_si256(low[v], fields), _mm256_and_si256(high[v], high_bits));
      out[2] = _mm256_srli_epi16(out[0], 4);
      out[3] = _mm256_srli_epi16(out[1], 4);
    } else {
      const __m256i m3 = _mm256_set1_epi8(3), m4 = _mm256_set1_epi8(4);
      for (int v = 0; v < CH / 32; ++v)
        out[v] = _mm256_or_si256(_mm256_and_si256(low[v], m3), _mm256_and_si256(high[v], m4));
    }
  }
}

// int8 levels L[c] of 32 byte-codes.
template <int BITS>
inline __m256i code_levels(__m256i codes, __m256i lut) {
  if constexpr (kByteCodes<BITS>) return _mm256_xor_si256(codes, _mm256_set1_epi8(static_cast<char>(0x80)));
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

// Σ_b e_b·t_b over a column's nb blocks (e: the column's d·o; t: one row's per-block activation sums),
// eight blocks per step: two vector operations per eight blocks instead of a scalar chain per block.
// offset_lanes leaves the eight partial sums in a vector, for a caller whose accumulator is summed anyway.
inline __m256 offset_lanes(const float* e, const float* t, int64_t nb) {
  __m256 acc = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(e + b), _mm256_loadu_ps(t + b), acc);
  if (b < nb) {
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(nb - b)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    acc = _mm256_fmadd_ps(_mm256_maskload_ps(e + b, mask), _mm256_maskload_ps(t + b, mask), acc);
  }
  return acc;
}

inline float offset_term(const float* e, const float* t, int64_t nb) { return hsum(offset_lanes(e, t, nb)); }

// How far ahead of the codes being read the GEMVs prefetch. Measured on the GPT-2-small decode set, int8
// path, one thread: 768 B (the old "two columns ahead" at K = 768) 10.6 GB/s, 1 KiB 12.8, 2 KiB 14.4,
// 4-8 KiB 15.2, 16 KiB 14.4.
constexpr int64_t kPrefetchBytes = 4096;
// Into L2, not L1: 4 KiB ahead is 64 lines in flight, more than the core's L1 fill buffers hold, while L2
// tracks more misses and the decoder's loads then hit L2. rbe_gemv_bench, cold, four interleaved rounds of
// each (ms per step, 3-bit/256 int8): T0 5.45-5.74 (1 thread), 2.63-2.79 (2 threads); T1 4.85-4.91 and
// 2.57-2.66. 8 and 16 KiB into L2, or T2, measured no better than 4 KiB.
constexpr auto kPrefetchHint = _MM_HINT_T1;

// A task's codes are one contiguous stream (columns are stored one after the other, §4): the GEMVs keep
// explicit prefetches kPrefetchBytes ahead of the block being read (short per-column streams never let the
// hardware prefetcher get far enough ahead; prefetch_block), and touch the block tables of the column being
// prefetched (Prefetcher), one set of prefetches per column.
struct Prefetcher {
  const PreparedWeight& w;
  int64_t column_bytes, nb;
  // Columns between the one being read and the one being prefetched, worked out once per task: done per
  // column it cost a division (idiv, 10+ cycles, against ~60 cycles of decoding for a 3-bit/256 column at
  // K = 768; seen in objdump).
  int64_t ahead_columns = kPrefetchBytes / column_bytes;

  // always_inline: a function holding nothing but prefetches looks side-effect free to GCC's IPA, which
  // then deletes the calls (it did: the object had no prefetch instruction left).
  __attribute__((always_inline)) void tables(int64_t n) const {
    const int64_t blk = (n + ahead_columns) * nb;
    if (blk < w.shape.N * nb) {
      _mm_prefetch(reinterpret_cast<const char*>(w.scale.data() + blk), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w.scaled_offset.data() + blk), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w.theta.data() + blk), _MM_HINT_T0);
    }
  }
};

// The codes kPrefetchBytes ahead of a block of BB bytes being read, one prefetch per 64 bytes of the block:
// consecutive blocks are contiguous, so every line of the stream is touched. Inside the block loop this
// costs one or two instructions per block where a per-column loop (with its bound checks) cost ~35 per
// 288-byte 3-bit/256 column at K = 768. PREFETCHh never faults, so the last blocks need no bound check.
template <int64_t BB>
__attribute__((always_inline)) inline void prefetch_block(const uint8_t* block) {
  for (int64_t off = 0; off < BB; off += 64)
    _mm_prefetch(reinterpret_cast<const char*>(block) + kPrefetchBytes + off, kPrefetchHint);
}

// Rows [m0, m0+R) against columns [n0, n1): each group of codes is decoded once into four float vectors
// and used by all R rows, so batched decoding (R = batch size) costs little more than one row. BS (the
// block size) is a template parameter so that a block's chunks unroll completely.
template <int BITS, int BS, int R>
void gemv_rows(const GemmProblem& p, int64_t m0, int64_t n0, int64_t n1) {
  const PreparedWeight& w = *p.w;
  constexpr int64_t bb = BS * BITS / 8;
  constexpr int CH = chunk_of<BITS>(BS);
  const int64_t nb = w.shape.blocks_per_column(), Kp = w.shape.padded_K(), N = w.shape.N;
  const float* a = p.a_pad + m0 * Kp;
  const float* sums = p.a_sums + m0 * nb;
  const int64_t column_bytes = nb * bb;
  const Prefetcher prefetch_ahead{w, column_bytes, nb};
  for (int64_t n = n0; n < n1; ++n) {
    prefetch_ahead.tables(n);
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    const uint8_t* codes = w.codes + n * column_bytes;
    const float* dcol = w.scale.data() + n * nb;
    for (int64_t b = 0; b < nb; ++b, codes += bb) {
      prefetch_block<bb>(codes);
      const __m256i lut = block_lut(w, n * nb + b);
      __m256 d0[R], d1[R];  // two chains per row hide the FMA latency
      for (int r = 0; r < R; ++r) d0[r] = d1[r] = _mm256_setzero_ps();
      for (int k0 = 0; k0 < BS; k0 += CH) {
        __m256i cv[CH / 32];
        chunk_codes<BITS, CH>(codes + k0 * BITS / 8, cv);
        for (int v = 0; v < CH / 32; ++v) {
          const __m256i lv = code_levels<BITS>(cv[v], lut);
          const __m128i lo = _mm256_castsi256_si128(lv), hi = _mm256_extracti128_si256(lv, 1);
          const __m256 w0 = widen(lo), w1 = widen(_mm_srli_si128(lo, 8));
          const __m256 w2 = widen(hi), w3 = widen(_mm_srli_si128(hi, 8));
          for (int r = 0; r < R; ++r) {
            const float* ab = a + r * Kp + b * BS + k0 + 32 * v;
            d0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(ab), d0[r]);
            d1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(ab + 8), d1[r]);
            d0[r] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(ab + 16), d0[r]);
            d1[r] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(ab + 24), d1[r]);
          }
        }
      }
      const __m256 d = _mm256_broadcast_ss(dcol + b);
      for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_add_ps(d0[r], d1[r]), d, acc[r]);
    }
    const float* ecol = w.scaled_offset.data() + n * nb;
    for (int r = 0; r < R; ++r)
      p.Y[(m0 + r) * N + n] = hsum(acc[r]) + offset_term(ecol, sums + r * nb, nb) + (p.bias ? p.bias[n] : 0.f);
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
// instead of a scattered scalar store per weight. CH = chunk_of<BITS>(block_size).
template <int BITS, int CH>
void decode_tile_chunks(const PreparedWeight& w, int64_t n0, float* tile) {
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
      for (int64_t k0 = 0; k0 < bs; k0 += CH) {
        __m256i lv[8][CH / 32];
        for (int j = 0; j < 8; ++j) {
          if (codes[j]) chunk_codes<BITS, CH>(codes[j] + k0 * BITS / 8, lv[j]);
          for (int u = 0; u < CH / 32; ++u)
            lv[j][u] = codes[j] ? code_levels<BITS>(lv[j][u], lut[j]) : _mm256_setzero_si256();
        }
        for (int u = 0; u < CH / 32; ++u)
          for (int q = 0; q < 4; ++q) {
            __m256 v[8];
            for (int j = 0; j < 8; ++j) {
              const __m128i half128 = q < 2 ? _mm256_castsi256_si128(lv[j][u]) : _mm256_extracti128_si256(lv[j][u], 1);
              const __m128i bytes = (q & 1) ? _mm_srli_si128(half128, 8) : half128;
              v[j] = _mm256_mul_ps(d[j], _mm256_add_ps(widen(bytes), o[j]));
            }
            transpose8(v);
            float* dst = tile + (b * bs + k0 + 32 * u + 8 * q) * kTileN + 8 * half;
            for (int t = 0; t < 8; ++t) _mm256_store_ps(dst + t * kTileN, v[t]);
          }
      }
    }
  }
}

template <int BITS>
void decode_tile(const PreparedWeight& w, int64_t n0, float* tile) {
  if constexpr (BITS != 3) {
    decode_tile_chunks<BITS, kGroup>(w, n0, tile);
  } else {
    switch (chunk_of<BITS>(w.shape.block_size)) {
      case 32: return decode_tile_chunks<BITS, 32>(w, n0, tile);
      case 64: return decode_tile_chunks<BITS, 64>(w, n0, tile);
      default: return decode_tile_chunks<BITS, 128>(w, n0, tile);
    }
  }
}

// ROWS x 16 outputs: 2·ROWS accumulators + 2 weight vectors + 1 broadcast fit the 16 ymm registers at
// ROWS = 6, the usual AVX2 shape that keeps both FMA ports busy. The accumulators are named variables:
// as an array, GCC kept it in memory and stored all twelve on every k (store-port bound, half speed).
// Accumulates over k in [k0, k1) into y (first chunk: starts from the bias instead).
#define RBE_F_ROW(r)                                                                \
  if constexpr (ROWS > r) {                                                         \
    const __m256 av = _mm256_broadcast_ss(a + r * lda + k);                         \
    c##r##0 = _mm256_fmadd_ps(av, b0, c##r##0);                                     \
    c##r##1 = _mm256_fmadd_ps(av, b1, c##r##1);                                     \
  }
#define RBE_F_OUT(r) \
  if constexpr (ROWS > r) { _mm256_store_ps(out + 16 * r, c##r##0); _mm256_store_ps(out + 16 * r + 8, c##r##1); }
template <int ROWS>
inline void micro_kernel(const float* a, int64_t lda, const float* tile, int64_t k0, int64_t k1, float* y,
                         int64_t ldy, int64_t cols, const float* bias, bool first) {
  __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
  c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = _mm256_setzero_ps();
  for (int64_t k = k0; k < k1; ++k) {
    const __m256 b0 = _mm256_load_ps(tile + k * kTileN), b1 = _mm256_load_ps(tile + k * kTileN + 8);
    RBE_F_ROW(0) RBE_F_ROW(1) RBE_F_ROW(2) RBE_F_ROW(3) RBE_F_ROW(4) RBE_F_ROW(5)
  }
  alignas(32) float out[ROWS * kTileN];
  RBE_F_OUT(0) RBE_F_OUT(1) RBE_F_OUT(2) RBE_F_OUT(3) RBE_F_OUT(4) RBE_F_OUT(5)
  for (int r = 0; r < ROWS; ++r) {
    float* dst = y + r * ldy;
    if (first)
      for (int64_t j = 0; j < cols; ++j) dst[j] = out[16 * r + j] + (bias ? bias[j] : 0.f);
    else
      for (int64_t j = 0; j < cols; ++j) dst[j] += out[16 * r + j];
  }
}
#undef RBE_F_ROW
#undef RBE_F_OUT

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

template <int BITS, int BS>
void run_gemv(const GemmProblem& p, int64_t n0, int64_t n1) {
  switch (p.M) {
    case 1: return gemv_rows<BITS, BS, 1>(p, 0, n0, n1);
    case 2: return gemv_rows<BITS, BS, 2>(p, 0, n0, n1);
    case 3: return gemv_rows<BITS, BS, 3>(p, 0, n0, n1);
    default: return gemv_rows<BITS, BS, 4>(p, 0, n0, n1);
  }
}

template <int BITS>
void run(const GemmProblem& p, int64_t n0, int64_t n1) {
  if (p.M > kMaxGemvRows) return gemm_tiles<BITS>(p, n0, n1);
  switch (p.w->shape.block_size) {
    case 32: return run_gemv<BITS, 32>(p, n0, n1);
    case 64: return run_gemv<BITS, 64>(p, n0, n1);
    case 128: return run_gemv<BITS, 128>(p, n0, n1);
    default: return run_gemv<BITS, 256>(p, n0, n1);
  }
}

void run_float(const GemmProblem& p, int64_t n0, int64_t n1) {
  switch (p.w->shape.bits) {
    case 2: return run<2>(p, n0, n1);
    case 3: return run<3>(p, n0, n1);
    case 4: return run<4>(p, n0, n1);
    case 5: return run<5>(p, n0, n1);
    case 6: return run<6>(p, n0, n1);
    default: return run<8>(p, n0, n1);
  }
}

// The int8 path three times: plain AVX2; with AVX-VNNI; with AVX-512 F/BW/VL/VNNI/VBMI.
// Function attributes, not file flags, so the rest of this file runs on any AVX2 CPU.
#define RBE_I8_NS i8_avx2
#define RBE_I8_VNNI 0
#define RBE_I8_VBMI 0
#define RBE_I8_TARGET
#include "gemm_avx2_int8.inc"
#undef RBE_I8_NS
#undef RBE_I8_VNNI
#undef RBE_I8_VBMI
#undef RBE_I8_TARGET

#define RBE_I8_NS i8_vnni
#define RBE_I8_VNNI 1
#define RBE_I8_VBMI 0
#define RBE_I8_TARGET __attribute__((target("avx2,fma,avxvnni")))
#include "gemm_avx2_int8.inc"
#undef RBE_I8_NS
#undef RBE_I8_VNNI
#undef RBE_I8_VBMI
#undef RBE_I8_TARGET

#define RBE_I8_NS i8_avx512
#define RBE_I8_VNNI 1
#define RBE_I8_VBMI 1
#define RBE_I8_TARGET __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")))
#include "gemm_avx2_int8.inc"
#undef RBE_I8_NS
#undef RBE_I8_VNNI
#undef RBE_I8_VBMI
#undef RBE_I8_TARGET

}  // namespace

void gemm_columns_avx2(const GemmProblem& p, int64_t n0, int64_t n1) {
  if (p.a_q) return i8_avx2::run_int8(p, n0, n1);
  run_float(p, n0, n1);
}

void gemm_columns_avx2vnni(const GemmProblem& p, int64_t n0, int64_t n1) {
  if (p.a_q) return i8_vnni::run_int8(p, n0, n1);
  run_float(p, n0, n1);
}

void gemm_columns_avx512(const GemmProblem& p, int64_t n0, int64_t n1) {
  if (p.a_q) return i8_avx512::run_int8(p, n0, n1);
  run_float(p, n0, n1);
}

}  // namespace rbe

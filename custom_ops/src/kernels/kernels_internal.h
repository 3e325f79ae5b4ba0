// What the dispatcher hands each per-ISA kernel: activations already padded to whole blocks (so tail
// blocks need no special case: padded codes meet zero activations) and their per-block sums (the offset o
// of a block contributes d·o·Σa, computed once per row instead of once per weight).
// On the int8 path (accuracy_level 4) the activations come quantized instead (FORMAT.md §2.1): int8 codes
// q, a scale s and the integer sum Σq per row and block; a_pad and a_sums are then null.
#pragma once

#include "rbe/format.h"

namespace rbe {

// Codes per chunk, the unit the SIMD kernels read a block in (FORMAT.md §4): a 32-code group, or for 3-bit
// codes min(block_size, 128), whose two bit planes are each loaded once. The kernels take it as a template
// parameter so that a chunk's shifts are immediates.
template <int BITS>
constexpr int chunk_of(int64_t block_size) { return BITS == 3 ? chunk_3bit(block_size) : kGroup; }

// Widths whose byte-codes the SIMD kernels build as the 8-bit path's L + 128 (§5) and read without a table:
// 8-bit codes as stored, and 5- and 6-bit ones, whose one uniform table's L + 128 is the code shifted to 8
// bits (has_uniform_table, at compile time).
template <int BITS>
constexpr bool kByteCodes = BITS == 8 || BITS == 5 || BITS == 6;

// Up to this many rows the register GEMV wins: it decodes each weight once per call, where the tile path
// pays a tile decode plus stores; beyond it the micro-kernel's reuse of each decoded tile wins (x86).
constexpr int64_t kMaxGemvRows = 4;

// int32 lanes of the x86 int8 GEMV's accumulators: one 256-bit register, or one 512-bit register in the
// AVX-512 GEMV's wide form.
constexpr int64_t kGemvLanes = 8;
constexpr int64_t kWideLanes = 16;

struct GemmProblem {
  const PreparedWeight* w;
  const float* a_pad;   // float path: M x padded_K
  const float* a_sums;  // float path: M x nb, sum of a_pad over each block
  int64_t M;
  const float* bias;    // N or null
  float* Y;             // M x N
  // int8 path only (null on the float path):
  const int8_t* a_q;          // M x padded_K, zero past K
  const float* a_scale;       // M x nb: s
  const int32_t* a_qsum;      // M x nb: Σ q over the block
  const float* a_qsum_scaled; // M x nb: s · Σ q (float), for the offset term d·o·s·Σq
  const int32_t* a_qsum_init; // M x nb: -128 · Σ q, where a VNNI accumulator of Σ (L + 128)·q starts
  // For the GEMV, whose 8 int32 lanes each sum 4 of every 32 consecutive k (lane j: k mod 32 in [4j, 4j+4)).
  // The start is each lane's own -128·Σq over its k, a vector load per block: then every lane ends at its
  // exact Σ L·q. An even split (-16·Σq each) ends with the same total, but the lanes then hold partial sums up
  // to 128/|L| times larger that cancel only after each was rounded in float (the fuzzer found an all-zero
  // column giving -7.5e-9).
  const int32_t* a_qsum_init_lane;  // M x nb x 8: -128 · Σ q over lane j's k of the block (VNNI GEMV, else null)
  // The same for the wide GEMV's 16 lanes (lane j: k mod 64 in [4j, 4j+4)).
  const int32_t* a_qsum_init_wide;  // M x nb x 16 (AVX-512 GEMV, else null)
};

// Each kernel computes columns [n0, n1) of Y for all M rows, on the float path or, when p.a_q is set, the
// int8 path.
void gemm_columns_scalar(const GemmProblem& p, int64_t n0, int64_t n1);  // float path only
void gemm_columns_scalar_int8(const GemmProblem& p, int64_t n0, int64_t n1);
void gemm_columns_avx2(const GemmProblem& p, int64_t n0, int64_t n1);
void gemm_columns_avx2vnni(const GemmProblem& p, int64_t n0, int64_t n1);
void gemm_columns_avx512(const GemmProblem& p, int64_t n0, int64_t n1);
void gemm_columns_neon(const GemmProblem& p, int64_t n0, int64_t n1);
// rotate_row (FORMAT.md §5.3) on AVX2, the same bits.
void rotate_row_avx2(const PreparedWeight& w, const float* a, float* out);

}  // namespace rbe

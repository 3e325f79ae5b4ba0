// What the dispatcher hands each per-ISA kernel: activations already padded to whole blocks (so tail
// blocks need no special case: padded codes meet zero activations) and their per-block sums (the offset o
// of a block contributes d·o·Σa, computed once per row instead of once per weight).
#pragma once

#include "rbe/format.h"

namespace rbe {

struct GemmProblem {
  const PreparedWeight* w;
  const float* a_pad;   // M x padded_K
  const float* a_sums;  // M x nb, sum of a_pad over each block
  int64_t M;
  const float* bias;    // N or null
  float* Y;             // M x N
};

// Each kernel computes columns [n0, n1) of Y for all M rows.
void gemm_columns_scalar(const GemmProblem& p, int64_t n0, int64_t n1);
void gemm_columns_avx2(const GemmProblem& p, int64_t n0, int64_t n1);
void gemm_columns_neon(const GemmProblem& p, int64_t n0, int64_t n1);

}  // namespace rbe

// Scalar reference kernel: decodes every weight as FORMAT.md §5 writes it (w = d·(L[c]+o)) and accumulates
// in double. It is the yardstick the SIMD kernels are tested against, not a fast path.
#include <vector>

#include "kernels_internal.h"

namespace rbe {

void gemm_columns_scalar(const GemmProblem& p, int64_t n0, int64_t n1) {
  const PreparedWeight& w = *p.w;
  const WeightShape& s = w.shape;
  const int64_t nb = s.blocks_per_column(), Kp = s.padded_K();
  std::vector<float> column(Kp);
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t b = 0; b < nb; ++b) decode_block(w, n * nb + b, column.data() + b * s.block_size);
    for (int64_t m = 0; m < p.M; ++m) {
      const float* a = p.a_pad + m * Kp;
      double acc = 0.0;
      for (int64_t k = 0; k < s.K; ++k) acc += static_cast<double>(a[k]) * column[k];
      if (p.bias) acc += p.bias[n];
      p.Y[m * s.N + n] = static_cast<float>(acc);
    }
  }
}

}  // namespace rbe

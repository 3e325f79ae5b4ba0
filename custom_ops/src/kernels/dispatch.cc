// One entry point over the per-ISA kernels (as MLAS does): pads the activations to whole blocks, computes
// block sums once, splits the output columns into tasks and runs them through the caller's thread pool.
#include <algorithm>
#include <string>
#include <vector>

#include "kernels_internal.h"
#include "rbe/kernels.h"

namespace rbe {

bool isa_available(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return true;
    case Isa::Avx2:
#if defined(RBE_HAVE_AVX2)
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
      return false;
#endif
    case Isa::Neon:
#if defined(RBE_HAVE_NEON)
      return true;
#else
      return false;
#endif
  }
  return false;
}

Isa best_isa() {
  if (isa_available(Isa::Avx2)) return Isa::Avx2;
  if (isa_available(Isa::Neon)) return Isa::Neon;
  return Isa::Scalar;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx2: return "avx2";
    case Isa::Neon: return "neon";
    default: return "scalar";
  }
}

Isa isa_from_name(const std::string& name) {
  if (name == "auto") return best_isa();
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Neon})
    if (name == isa_name(isa)) return isa;
  throw FormatError("unknown kernel ISA '" + name + "' (scalar, avx2, neon or auto)");
}

void serial_for(size_t n, const std::function<void(size_t)>& task) {
  for (size_t i = 0; i < n; ++i) task(i);
}

#if !defined(RBE_HAVE_AVX2)
void gemm_columns_avx2(const GemmProblem&, int64_t, int64_t) { throw FormatError("AVX2 kernel not built"); }
#endif
#if !defined(RBE_HAVE_NEON)
void gemm_columns_neon(const GemmProblem&, int64_t, int64_t) { throw FormatError("NEON kernel not built"); }
#endif

void gemm(const PreparedWeight& w, const float* A, int64_t M, const float* bias, float* Y, Isa isa,
          const ParallelFor& parallel_for) {
  if (!isa_available(isa)) throw FormatError(std::string("kernel ISA ") + isa_name(isa) + " not available here");
  if (M <= 0) return;
  const WeightShape& s = w.shape;
  const int64_t nb = s.blocks_per_column(), Kp = s.padded_K();
  std::vector<float> a_pad(static_cast<size_t>(M * Kp), 0.f), a_sums(static_cast<size_t>(M * nb));
  for (int64_t m = 0; m < M; ++m) {
    std::copy(A + m * s.K, A + (m + 1) * s.K, a_pad.begin() + m * Kp);
    for (int64_t b = 0; b < nb; ++b) {
      float sum = 0.f;
      for (int64_t i = 0; i < s.block_size; ++i) sum += a_pad[m * Kp + b * s.block_size + i];
      a_sums[m * nb + b] = sum;
    }
  }
  const GemmProblem p{&w, a_pad.data(), a_sums.data(), M, bias, Y};
  auto kernel = isa == Isa::Avx2 ? gemm_columns_avx2 : isa == Isa::Neon ? gemm_columns_neon : gemm_columns_scalar;
  // Column chunks: whole 16-column tiles, small enough to balance the pool, large enough to amortise a task.
  const int64_t chunk = M <= 4 ? 64 : 32;
  const int64_t tasks = (s.N + chunk - 1) / chunk;
  parallel_for(static_cast<size_t>(tasks), [&](size_t t) {
    const int64_t n0 = static_cast<int64_t>(t) * chunk;
    kernel(p, n0, std::min(s.N, n0 + chunk));
  });
}

void decode_weight(const PreparedWeight& w, float* W) {
  const WeightShape& s = w.shape;
  const int64_t nb = s.blocks_per_column();
  std::vector<float> block(s.block_size);
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t b = 0; b < nb; ++b) {
      decode_block(w, n * nb + b, block.data());
      for (int64_t i = 0; i < s.block_size && b * s.block_size + i < s.K; ++i)
        W[(b * s.block_size + i) * s.N + n] = block[i];
    }
}

}  // namespace rbe

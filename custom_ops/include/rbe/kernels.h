// Y = A · W (+ bias) for an RBE-coded W, with one dispatch over per-ISA kernels (scalar reference, AVX2/FMA,
// NEON). The kernels decode codes in registers or small tiles; the fp32 W is never materialised whole.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

#include "rbe/format.h"

namespace rbe {

enum class Isa { Scalar, Avx2, Neon };

bool isa_available(Isa isa);
Isa best_isa();
const char* isa_name(Isa isa);
Isa isa_from_name(const std::string& name);  // "scalar", "avx2", "neon", "auto"; throws on others

// Runs task(i) for every i in [0, n), possibly in parallel (ORT's intra-op pool in the op library).
using ParallelFor = std::function<void(size_t n, const std::function<void(size_t)>& task)>;
void serial_for(size_t n, const std::function<void(size_t)>& task);

// A: M x K row-major, Y: M x N row-major, bias: N or null. Throws FormatError if isa is not available.
void gemm(const PreparedWeight& w, const float* A, int64_t M, const float* bias, float* Y, Isa isa,
          const ParallelFor& parallel_for = serial_for);

// The whole K x N matrix, row-major, by the scalar reference decoder (for tests and tools only).
void decode_weight(const PreparedWeight& w, float* W);

}  // namespace rbe

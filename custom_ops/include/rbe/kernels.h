// Y = A · W (+ bias) for an RBE-coded W, with one dispatch over per-ISA kernels (scalar reference, AVX2/FMA,
// AVX2 + AVX-VNNI, NEON). The kernels decode codes in registers or small tiles; the fp32 W is never
// materialised whole.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

#include "rbe/format.h"

namespace rbe {

// Avx2Vnni: the AVX2/FMA kernels, with the int8 path (accuracy_level 4) on VPDPBUSD (AVX-VNNI, VEX
// encoded, 256-bit; no AVX-512 needed). Its float path is the Avx2 one.
// Avx512: Avx2Vnni's kernels with AVX-512 F/BW/VL/VNNI/VBMI instructions where they shorten the int8 GEMV
// (vpermb lookups, vpternlogd merges, 512-bit registers for whole 64-code steps); everything else as Avx2Vnni.
enum class Isa { Scalar, Avx2, Neon, Avx2Vnni, Avx512 };

bool isa_available(Isa isa);
Isa best_isa();
const char* isa_name(Isa isa);               // "scalar", "avx2", "neon", "avxvnni", "avx512"
Isa isa_from_name(const std::string& name);  // one of those or "auto"; throws on others

// Runs task(i) for every i in [0, n), possibly in parallel (ORT's intra-op pool in the op library).
using ParallelFor = std::function<void(size_t n, const std::function<void(size_t)>& task)>;
void serial_for(size_t n, const std::function<void(size_t)>& task);

// Arithmetic of the product (the node's `accuracy_level`, FORMAT.md §2):
//   0 (and 1-3): float32 activations times the decoded float32 weights, the exact path;
//   4: activations quantized to int8 per row and block (FORMAT.md §2.1), integer dot products per block,
//      scaled once per block. Every ISA computes the same integer Σ L·q per block; the offset term o·Σq
//      (exact in the scalar reference and NEON, float in the x86 kernels) and the float sum of the
//      per-block terms may round differently (FORMAT.md §2.1).
constexpr int kAccuracyFloat = 0;
constexpr int kAccuracyInt8 = 4;
bool is_supported_accuracy_level(int64_t level);  // 0..4

// A: M x K row-major, Y: M x N row-major, bias: N or null. Throws FormatError if isa is not available or
// accuracy_level is not supported.
void gemm(const PreparedWeight& w, const float* A, int64_t M, const float* bias, float* Y, Isa isa,
          const ParallelFor& parallel_for = serial_for, int accuracy_level = kAccuracyFloat);

// The activation quantization of accuracy_level 4 for one row (FORMAT.md §2.1): `a` holds K floats; writes
// q (nb·block_size int8, zero past K), scale (nb floats) and qsum (nb ints, Σ q over the block).
void quantize_row_int8(const float* a, int64_t K, int64_t block_size, int8_t* q, float* scale, int32_t* qsum);

// The whole K x N matrix the product stands for (Q·W with an input rotation, FORMAT.md §5.3), row-major, by
// the scalar reference decoder (for tests and tools only).
void decode_weight(const PreparedWeight& w, float* W);

}  // namespace rbe

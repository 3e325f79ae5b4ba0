// Diagnostic builds only (CMake -DRBE_OP_TIMING=ON, driven by tools/decode_breakdown.py): the wall time spent
// inside RBEFusedGemm calls, read through the exported RbeOpTiming, so that a decode step splits into its
// weight products and everything else as they run in the full graph. A stand-in graph without the products
// (tools/bench.py) cannot give that split: there the rest of the step runs with warm caches, while in the real
// step the weight stream evicts the rest's working set (KV cache, activations, ORT's own state) and the rest
// pays for it.
#pragma once

#if RBE_OP_TIMING
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>

namespace rbe {
namespace op_timing {

inline std::atomic<int64_t> g_ns{0}, g_calls{0};

// Adds the lifetime of the enclosing call to the totals.
class Scope {
 public:
  Scope() : start_(std::chrono::steady_clock::now()) {}
  ~Scope() {
    g_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start_).count();
    g_calls += 1;
  }

 private:
  std::chrono::steady_clock::time_point start_;
};

// RBE_SKIP_PRODUCTS=1, read at every call: write zeros instead of the product. The same graph with near-free
// products, so the rest of a step can be timed without the weight stream in between.
inline bool skip_products() {
  const char* v = std::getenv("RBE_SKIP_PRODUCTS");
  return v != nullptr && v[0] == '1';
}

}  // namespace op_timing
}  // namespace rbe
#endif

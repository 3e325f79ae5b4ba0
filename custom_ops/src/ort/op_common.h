// Plumbing shared by the ai.rbe ops on the ORT C API: status/exception conversion, attribute and tensor
// access, and reading an RBE weight (attributes + constant codes input) into a PreparedWeight.
#pragma once

#include <onnxruntime_c_api.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "rbe/format.h"
#include "rbe/rice.h"

namespace rbe {

// An error with the ORT code it should surface as.
struct OpError : std::runtime_error {
  OrtErrorCode code;
  OpError(OrtErrorCode c, const std::string& m) : std::runtime_error(m), code(c) {}
};

// Throws OpError for a non-null status (and releases it).
void check(const OrtApi& api, OrtStatus* status);
std::string node_name(const OrtApi& api, const OrtKernelInfo* info);

struct TensorView {
  ONNXTensorElementDataType type;
  std::vector<int64_t> shape;
  int64_t size() const;
};
TensorView describe(const OrtApi& api, const OrtValue* value);
const void* raw_data(const OrtApi& api, const OrtValue* value);
template <typename T>
const T* tensor_data(const OrtApi& api, const OrtValue* value) {
  return static_cast<const T*>(raw_data(api, value));
}

// Node input `index` as a constant initializer, or a FormatError naming it (`what`, then `why`).
const OrtValue* constant_input(const OrtApi& api, const OrtKernelInfo* info, size_t index, const std::string& what,
                               const char* why = "");

// K, N, block_size, bits, scale0 attributes + the constant uint8 codes input at `codes_index` + the optional
// constant float32 [K] center input at `center_index` (FORMAT.md §5.1; absent or empty: none) + the seeds,
// either the `seeds` attribute or the optional constant int64 input at `seeds_index` (§2.2), not both, + the
// optional constant uint8 outlier records at `outliers_index` (§5.2).
PreparedWeight read_weight(const OrtApi& api, const OrtKernelInfo* info, size_t codes_index, size_t center_index,
                           size_t seeds_index, size_t outliers_index);

// An optional int attribute: its value, or nothing when the node does not set it.
std::optional<int64_t> optional_int_attr(const OrtApi& api, const OrtKernelInfo* info, const char* name);
// The `coding` attribute of an RBEGather (FORMAT.md §5.4): 0 (absent) for §4's codes, 1 for Rice-coded entries.
int64_t read_coding(const OrtApi& api, const OrtKernelInfo* info);
// The name of node input `index`, "" when the node has fewer inputs or leaves that optional one empty.
std::string input_name(const OrtApi& api, const OrtKernelInfo* info, size_t index);

// A Rice-coded table (§5.4): K, N, scale0 and the seeds as read_weight reads them (one per entry), the codes
// input and the constant uint16 [N] `lengths` input; `bits`, `block_size`, center and outliers must be absent.
RiceTable read_rice_table(const OrtApi& api, const OrtKernelInfo* info, size_t codes_index, size_t center_index,
                          size_t seeds_index, size_t outliers_index, size_t lengths_index);

// What every ai.rbe op shares: version 1 on the CPU EP, one float output, required non-variadic I/O,
// V2 (status-returning) kernel entry points only. Each op then sets its name, inputs and kernel functions.
void init_op_defaults(OrtCustomOp& op);

// Runs f, turning every exception into an OrtStatus prefixed with the op and node: nothing may unwind
// into ORT.
OrtStatus* guarded(const OrtApi* api, const char* op, const std::string& node, const std::function<void()>& f);

// The kernel entry points of an op whose kernel K holds `const OrtApi* api` and `std::string name`: Create
// fills a new K once those are set, Compute runs it, and no exception reaches ORT (guarded, naming kOpName
// and the node). ORT takes plain function pointers, hence template parameters rather than captures.
template <typename K, const char* kOpName, void (*Create)(K&, const OrtApi&, const OrtKernelInfo*),
          void (*Compute)(K&, OrtKernelContext*)>
void set_kernel_functions(OrtCustomOp& op) {
  op.CreateKernelV2 = [](const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info, void** out) -> OrtStatus* {
    *out = nullptr;
    const std::string name = node_name(*api, info);
    return guarded(api, kOpName, name, [&] {
      auto kernel = std::make_unique<K>();
      kernel->api = api;
      kernel->name = name;
      Create(*kernel, *api, info);
      *out = kernel.release();
    });
  };
  op.KernelComputeV2 = [](void* k, OrtKernelContext* ctx) -> OrtStatus* {
    K& kernel = *static_cast<K*>(k);
    return guarded(kernel.api, kOpName, kernel.name, [&] { Compute(kernel, ctx); });
  };
  op.KernelDestroy = [](void* k) { delete static_cast<K*>(k); };
}

}  // namespace rbe

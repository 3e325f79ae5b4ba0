// A token table split into its frequent and rare rows (passes/split_vocab.py) gives a tied LM head two
// products, whose logits must come back in vocabulary order. ONNX's Gather along the last axis does that one
// element at a time: 0.4 ms for one row of GPT-2's 50257 logits and 140 ms for 256 rows (2 threads), more than
// the whole decode step or prefill. Here each column's source is worked out once from the constant mask, and
// each output row is one pass over its columns.
#include "rbe_merge_columns.h"

#include <cstring>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "op_common.h"

namespace rbe {
namespace {

struct MergeKernel {
  const OrtApi* api;
  std::string name;
  int64_t first = 0, second = 0;          // columns taken from input 0 and from input 1
  std::vector<uint8_t> from_first;        // [first + second], 1 where the column comes from input 0
  // Each column's position in input 0 and in input 1; for the input it does not come from, a valid position
  // nearby, so that either side may be read for every column.
  std::vector<int32_t> first_at, second_at;
};

void read_mask(MergeKernel& k, const OrtApi& api, const OrtKernelInfo* info) {
  const OrtValue* value = constant_input(api, info, 2, "input 'from_first'", " (the split's row mask)");
  const TensorView view = describe(api, value);
  if (view.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 || view.shape.size() != 1 || view.shape[0] < 1 ||
      view.shape[0] > (int64_t{1} << 30))
    throw FormatError("input 'from_first' must be a 1-D uint8 tensor of 1 to 2^30 values");
  const uint8_t* mask = tensor_data<uint8_t>(api, value);
  const int64_t n = view.shape[0];
  k.from_first.assign(mask, mask + n);
  k.first_at.resize(n);
  k.second_at.resize(n);
  int32_t a = 0, b = 0;
  for (int64_t v = 0; v < n; ++v) {
    if (mask[v] > 1) {
      std::ostringstream m;
      m << "input 'from_first' must hold 0 or 1, found " << int(mask[v]) << " at " << v;
      throw FormatError(m.str());
    }
    k.first_at[v] = a > 0 && !mask[v] ? a - 1 : a;
    k.second_at[v] = b > 0 && mask[v] ? b - 1 : b;
    (mask[v] ? a : b) += 1;
  }
  k.first = a;
  k.second = b;
}

void compute(MergeKernel& k, OrtKernelContext* ctx) {
  const OrtApi& api = *k.api;
  const OrtValue* in[2] = {nullptr, nullptr};
  for (size_t i = 0; i < 2; ++i) {
    check(api, api.KernelContext_GetInput(ctx, i, &in[i]));
    if (in[i] == nullptr) throw OpError(ORT_INVALID_ARGUMENT, i ? "input 'second' missing" : "input 'first' missing");
  }
  const TensorView a = describe(api, in[0]), b = describe(api, in[1]);
  const bool leading_match = a.shape.size() == b.shape.size() && !a.shape.empty() &&
                             std::equal(a.shape.begin(), a.shape.end() - 1, b.shape.begin());
  if (!leading_match || a.shape.back() != k.first || b.shape.back() != k.second) {
    std::ostringstream m;
    auto shape = [&m](const std::vector<int64_t>& dims) {
      m << "[";
      for (size_t i = 0; i < dims.size(); ++i) m << (i ? ", " : "") << dims[i];
      m << "]";
    };
    m << "inputs must share their leading dimensions and end in " << k.first << " and " << k.second
      << " columns (the ones and zeros of 'from_first'), got ";
    shape(a.shape);
    m << " and ";
    shape(b.shape);
    throw OpError(ORT_INVALID_ARGUMENT, m.str());
  }
  const int64_t n = k.first + k.second;
  std::vector<int64_t> out_shape = a.shape;
  out_shape.back() = n;
  OrtValue* out_value = nullptr;
  check(api, api.KernelContext_GetOutput(ctx, 0, out_shape.data(), out_shape.size(), &out_value));
  float* out = nullptr;
  check(api, api.GetTensorMutableData(out_value, reinterpret_cast<void**>(&out)));
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < a.shape.size(); ++i) rows *= a.shape[i];
  const float* first = tensor_data<float>(api, in[0]);
  const float* second = tensor_data<float>(api, in[1]);
  auto merge_row = [&](int64_t r) {
    const float* x = first + r * k.first;
    const float* y = second + r * k.second;
    float* o = out + r * n;
    if (k.second == 0) { std::memcpy(o, x, sizeof(float) * n); return; }
    if (k.first == 0) { std::memcpy(o, y, sizeof(float) * n); return; }
    for (int64_t v = 0; v < n; ++v) o[v] = k.from_first[v] ? x[k.first_at[v]] : y[k.second_at[v]];
  };
  if (rows < 2) {
    for (int64_t r = 0; r < rows; ++r) merge_row(r);
    return;
  }
  struct Task {
    decltype(merge_row)* f;
    static void run(void* self, size_t r) { (*static_cast<Task*>(self)->f)(static_cast<int64_t>(r)); }
  } task{&merge_row};
  check(api, api.KernelContext_ParallelFor(ctx, &Task::run, static_cast<size_t>(rows), 0, &task));
}

constexpr char kOpName[] = "RBEMergeColumns";

struct RbeMergeColumnsOp : OrtCustomOp {
  RbeMergeColumnsOp() : OrtCustomOp{} {
    init_op_defaults(*this);
    GetName = [](const OrtCustomOp*) { return kOpName; };
    GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return 3; };  // first, second, from_first
    GetInputType = [](const OrtCustomOp*, size_t i) {
      return i == 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    };
    set_kernel_functions<MergeKernel, kOpName, read_mask, compute>(*this);
  }
};

}  // namespace

const OrtCustomOp* rbe_merge_columns_op() {
  static const RbeMergeColumnsOp op;
  return &op;
}

}  // namespace rbe

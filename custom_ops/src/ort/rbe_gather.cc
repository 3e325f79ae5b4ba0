// The table E [N, K] (N entries of K values) is stored as the RBE weight W = Eᵀ (K x N, FORMAT.md), so
// entry t is column t of W: one contiguous run of nb blocks. A tied GPT-2 lm_head (Y = X·wteᵀ) reads the very
// same codes and seeds initializers, so the table is stored once for both ops. A table only gathered may be
// Rice-coded instead (coding=1, §5.4): entry t is then one variable-length stream.
#include "rbe_gather.h"

#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "op_common.h"
#include "rbe/format.h"

namespace rbe {
namespace {

struct GatherKernel {
  const OrtApi* api;
  std::string name;
  int64_t K = 0, N = 0;
  bool rice = false;
  PreparedWeight weight;  // coding 0
  RiceTable table;        // coding 1
};

// Entry t (in [0, N)) into out[K].
void decode_entry(const GatherKernel& k, int64_t t, float* column, float* out) {
  if (k.rice) {
    decode_rice_entry(k.table, t, out);
    return;
  }
  // decode_block adds α·c_k itself when the table has a center (§5.1) and puts in the outliers (§5.2): the rows
  // are the numpy decoder's bits.
  const WeightShape& s = k.weight.shape;
  const int64_t nb = s.blocks_per_column();
  for (int64_t b = 0; b < nb; ++b) decode_block(k.weight, t * nb + b, column + b * s.block_size);
  std::copy(column, column + s.K, out);
}

void compute(GatherKernel& k, OrtKernelContext* ctx) {
  const OrtApi& api = *k.api;
  const OrtValue* ids_value = nullptr;
  check(api, api.KernelContext_GetInput(ctx, 0, &ids_value));
  if (ids_value == nullptr) throw OpError(ORT_INVALID_ARGUMENT, "input 'indices' missing");
  const TensorView ids = describe(api, ids_value);
  std::vector<int64_t> out_shape = ids.shape;
  out_shape.push_back(k.K);
  OrtValue* out_value = nullptr;
  check(api, api.KernelContext_GetOutput(ctx, 0, out_shape.data(), out_shape.size(), &out_value));
  float* out = nullptr;
  check(api, api.GetTensorMutableData(out_value, reinterpret_cast<void**>(&out)));
  const int64_t* index = tensor_data<int64_t>(api, ids_value);
  std::vector<float> column(k.rice ? 0 : k.weight.shape.padded_K());
  for (int64_t i = 0; i < ids.size(); ++i) {
    int64_t t = index[i];
    if (t < -k.N || t >= k.N) {
      std::ostringstream m;
      m << "index " << t << " out of range [-" << k.N << ", " << k.N - 1 << "]";
      throw OpError(ORT_INVALID_ARGUMENT, m.str());
    }
    if (t < 0) t += k.N;  // ONNX Gather counts negative indices from the end
    decode_entry(k, t, column.data(), out + i * k.K);
  }
}

void create(GatherKernel& kernel, const OrtApi& api, const OrtKernelInfo* info) {
  kernel.rice = read_coding(api, info) == 1;
  if (kernel.rice) {
    kernel.table = read_rice_table(api, info, 1, 2, 3, 4, 5);
    kernel.K = kernel.table.K;
    kernel.N = kernel.table.N;
  } else {
    if (!input_name(api, info, 5).empty())
      throw FormatError("input 'lengths' given without coding=1 (it belongs to a Rice-coded table)");
    kernel.weight = read_weight(api, info, 1, 2, 3, 4);
    kernel.K = kernel.weight.shape.K;
    kernel.N = kernel.weight.shape.N;
  }
  // A rotated weight stores Qᵀ·W: its columns are not the table's rows (FORMAT.md §5.3).
  if (optional_int_attr(api, info, "rotation").value_or(0) != 0)
    throw FormatError("attribute 'rotation' is for RBEFusedGemm only: a gathered table is stored unrotated");
}

constexpr char kOpName[] = "RBEGather";

struct RbeGatherOp : OrtCustomOp {
  RbeGatherOp() : OrtCustomOp{} {
    init_op_defaults(*this);
    GetName = [](const OrtCustomOp*) { return kOpName; };
    // indices, codes, center (optional, FORMAT.md §5.1), seeds (optional, §2.2), outliers (optional, §5.2),
    // lengths (optional, §5.4).
    GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return 6; };
    GetInputType = [](const OrtCustomOp*, size_t i) {
      return i == 1 || i == 4 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8
             : i == 2         ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
             : i == 5         ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16
                              : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    };
    GetInputCharacteristic = [](const OrtCustomOp*, size_t i) {
      return i >= 2 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
    };
    set_kernel_functions<GatherKernel, kOpName, create, compute>(*this);
  }
};

}  // namespace

const OrtCustomOp* rbe_gather_op() {
  static const RbeGatherOp op;
  return &op;
}

}  // namespace rbe

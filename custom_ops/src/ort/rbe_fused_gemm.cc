#include "rbe_fused_gemm.h"

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <new>
#include <sstream>
#include <string>
#include <vector>

#include "op_common.h"
#include "op_timing.h"
#include "rbe/format.h"
#include "rbe/kernels.h"

namespace rbe {
namespace {

struct Kernel {
  const OrtApi* api;
  std::string name;
  PreparedWeight weight;
  Isa isa;
  int accuracy_level = kAccuracyFloat;  // FORMAT.md §2: 0-3 float path, 4 int8 activations
};

// The optional `accuracy_level` attribute (as MatMulNBits has it): absent means 0.
int accuracy_level_attr(const OrtApi& api, const OrtKernelInfo* info) {
  const int64_t v = optional_int_attr(api, info, "accuracy_level").value_or(kAccuracyFloat);
  if (!is_supported_accuracy_level(v))
    throw FormatError("attribute 'accuracy_level'=" + std::to_string(v) + " unsupported (0 to 4)");
  return static_cast<int>(v);
}

void create(Kernel& kernel, const OrtApi& api, const OrtKernelInfo* info) {
  kernel.weight = read_weight(api, info, 1, 3, 4, 5);
  kernel.accuracy_level = accuracy_level_attr(api, info);
  const char* forced = std::getenv("RBE_ISA");
  kernel.isa = isa_from_name(forced && *forced ? forced : "auto");
  if (!isa_available(kernel.isa))
    throw FormatError(std::string("RBE_ISA=") + forced + " is not available on this CPU");
}

struct PoolTask {
  const std::function<void(size_t)>* task;
  static void run(void* self, size_t i) { (*static_cast<PoolTask*>(self)->task)(i); }
};

void compute(Kernel& k, OrtKernelContext* ctx) {
#if RBE_OP_TIMING
  const op_timing::Scope timed;
#endif
  const OrtApi& api = *k.api;
  const WeightShape& s = k.weight.shape;
  size_t n_inputs = 0;
  check(api, api.KernelContext_GetInputCount(ctx, &n_inputs));
  const OrtValue* a_value = nullptr;
  check(api, api.KernelContext_GetInput(ctx, 0, &a_value));
  if (a_value == nullptr) throw OpError(ORT_INVALID_ARGUMENT, "input 'A' missing");
  const TensorView a = describe(api, a_value);
  if (a.shape.size() < 2) throw OpError(ORT_INVALID_ARGUMENT, "input 'A' must have rank >= 2");
  if (a.shape.back() != s.K) {
    std::ostringstream m;
    m << "input 'A' last dimension is " << a.shape.back() << ", expected K=" << s.K;
    throw OpError(ORT_INVALID_ARGUMENT, m.str());
  }
  const float* bias = nullptr;
  if (n_inputs > 2) {
    const OrtValue* b_value = nullptr;
    check(api, api.KernelContext_GetInput(ctx, 2, &b_value));
    if (b_value != nullptr) {
      const TensorView b = describe(api, b_value);
      if (b.shape.size() != 1 || b.shape[0] != s.N) {
        std::ostringstream m;
        m << "input 'bias' must have shape [" << s.N << "]";
        throw OpError(ORT_INVALID_ARGUMENT, m.str());
      }
      bias = tensor_data<float>(api, b_value);
    }
  }
  std::vector<int64_t> y_shape(a.shape.begin(), a.shape.end() - 1);
  y_shape.push_back(s.N);
  OrtValue* y_value = nullptr;
  check(api, api.KernelContext_GetOutput(ctx, 0, y_shape.data(), y_shape.size(), &y_value));
  float* y = nullptr;
  check(api, api.GetTensorMutableData(y_value, reinterpret_cast<void**>(&y)));
  const int64_t M = a.size() / s.K;
  if (M == 0) return;
#if RBE_OP_TIMING
  if (op_timing::skip_products()) {
    std::fill(y, y + M * s.N, 0.f);
    return;
  }
#endif
  const ParallelFor pool = [&](size_t n, const std::function<void(size_t)>& task) {
    PoolTask pt{&task};
    check(api, api.KernelContext_ParallelFor(ctx, &PoolTask::run, n, 0, &pt));
  };
  gemm(k.weight, tensor_data<float>(api, a_value), M, bias, y, k.isa, pool, k.accuracy_level);
}

constexpr char kOpName[] = "RBEFusedGemm";

struct RbeFusedGemmOp : OrtCustomOp {
  RbeFusedGemmOp() : OrtCustomOp{} {
    init_op_defaults(*this);
    GetName = [](const OrtCustomOp*) { return kOpName; };
    // A, codes, bias (optional), center (optional, FORMAT.md §5.1), seeds (optional, §2.2), outliers
    // (optional, §5.2).
    GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return 6; };
    GetInputType = [](const OrtCustomOp*, size_t i) {
      return i == 1 || i == 5 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8
                              : i == 4 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    };
    GetInputCharacteristic = [](const OrtCustomOp*, size_t i) {
      return i >= 2 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
    };
    set_kernel_functions<Kernel, kOpName, create, compute>(*this);
  }
};

}  // namespace

const OrtCustomOp* rbe_fused_gemm_op() {
  static const RbeFusedGemmOp op;
  return &op;
}

}  // namespace rbe

#if RBE_OP_TIMING
// Nanoseconds spent inside RBEFusedGemm calls and their number, since the library was loaded.
extern "C" __attribute__((visibility("default"))) void RbeOpTiming(int64_t* ns, int64_t* calls) {
  *ns = rbe::op_timing::g_ns.load();
  *calls = rbe::op_timing::g_calls.load();
}
#endif

#include "rbe_fused_gemm.h"

#include <climits>
#include <cstdlib>
#include <memory>
#include <new>
#include <sstream>
#include <string>
#include <vector>

#include "rbe/format.h"
#include "rbe/kernels.h"

namespace rbe {
namespace {

struct OpError : std::runtime_error {
  OrtErrorCode code;
  OpError(OrtErrorCode c, const std::string& m) : std::runtime_error(m), code(c) {}
};

void check(const OrtApi& api, OrtStatus* status) {
  if (status == nullptr) return;
  const std::string msg = api.GetErrorMessage(status);
  const OrtErrorCode code = api.GetErrorCode(status);
  api.ReleaseStatus(status);
  throw OpError(code, msg);
}

std::string node_name(const OrtApi& api, const OrtKernelInfo* info) {
  size_t size = 0;
  if (api.KernelInfo_GetNodeName(info, nullptr, &size) != nullptr || size == 0) return "?";
  std::string name(size, '\0');
  OrtStatus* st = api.KernelInfo_GetNodeName(info, name.data(), &size);
  if (st) { api.ReleaseStatus(st); return "?"; }
  name.resize(size > 0 ? size - 1 : 0);
  return name;
}

int64_t int_attr(const OrtApi& api, const OrtKernelInfo* info, const char* name) {
  int64_t v = 0;
  OrtStatus* st = api.KernelInfoGetAttribute_int64(info, name, &v);
  if (st) {
    api.ReleaseStatus(st);
    throw FormatError(std::string("missing or non-integer attribute '") + name + "'");
  }
  return v;
}

struct TensorView {
  ONNXTensorElementDataType type;
  std::vector<int64_t> shape;
  int64_t size() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

TensorView describe(const OrtApi& api, const OrtValue* value) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  check(api, api.GetTensorTypeAndShape(value, &info));
  TensorView v;
  size_t rank = 0;
  OrtStatus* st = api.GetTensorElementType(info, &v.type);
  if (!st) st = api.GetDimensionsCount(info, &rank);
  if (!st) { v.shape.resize(rank); st = api.GetDimensions(info, v.shape.data(), rank); }
  api.ReleaseTensorTypeAndShapeInfo(info);
  check(api, st);
  return v;
}

template <typename T>
const T* tensor_data(const OrtApi& api, const OrtValue* value) {
  void* p = nullptr;
  check(api, api.GetTensorMutableData(const_cast<OrtValue*>(value), &p));
  return static_cast<const T*>(p);
}

struct Kernel {
  const OrtApi* api;
  std::string name;
  PreparedWeight weight;
  Isa isa;
};

Kernel* create_kernel(const OrtApi& api, const OrtKernelInfo* info, const std::string& name) {
  WeightShape shape;
  shape.K = int_attr(api, info, "K");
  shape.N = int_attr(api, info, "N");
  shape.block_size = int_attr(api, info, "block_size");
  shape.bits = int_attr(api, info, "bits");
  OrtStatus* st = api.KernelInfoGetAttribute_float(info, "scale0", &shape.scale0);
  if (st) { api.ReleaseStatus(st); throw FormatError("missing or non-float attribute 'scale0'"); }
  validate_shape(shape);  // before anything is sized from these numbers

  OrtAllocator* alloc = nullptr;
  check(api, api.GetAllocatorWithDefaultOptions(&alloc));
  OrtValue* seeds_value = nullptr;
  st = api.KernelInfoGetAttribute_tensor(info, "seeds", alloc, &seeds_value);
  if (st) { api.ReleaseStatus(st); throw FormatError("missing attribute 'seeds' (an INT64 tensor)"); }
  std::unique_ptr<OrtValue, decltype(api.ReleaseValue)> seeds_owner(seeds_value, api.ReleaseValue);
  const TensorView seeds = describe(api, seeds_value);
  if (seeds.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64)
    throw FormatError("attribute 'seeds' must be an INT64 tensor");
  if (seeds.shape.size() != 2 || seeds.shape[0] != shape.N)
    throw FormatError("attribute 'seeds' must have shape [N, ceil(K / block_size)]");

  size_t n_inputs = 0;
  check(api, api.KernelInfo_GetInputCount(info, &n_inputs));
  if (n_inputs < 2) throw FormatError("input 'codes' missing");
  int is_constant = 0;
  const OrtValue* codes_value = nullptr;
  check(api, api.KernelInfoGetConstantInput_tensor(info, 1, &is_constant, &codes_value));
  if (!is_constant || codes_value == nullptr)
    throw FormatError("input 'codes' must be a constant initializer (it is read in place, never copied)");
  const TensorView codes = describe(api, codes_value);
  if (codes.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 || codes.shape.size() != 1)
    throw FormatError("input 'codes' must be a 1-D uint8 tensor");

  auto kernel = std::make_unique<Kernel>();
  kernel->api = &api;
  kernel->name = name;
  kernel->weight = prepare_weight(shape, tensor_data<int64_t>(api, seeds_value), seeds.size(),
                                  tensor_data<uint8_t>(api, codes_value), codes.size());
  const char* forced = std::getenv("RBE_ISA");
  kernel->isa = isa_from_name(forced && *forced ? forced : "auto");
  if (!isa_available(kernel->isa))
    throw FormatError(std::string("RBE_ISA=") + forced + " is not available on this CPU");
  return kernel.release();
}

struct PoolTask {
  const std::function<void(size_t)>* task;
  static void run(void* self, size_t i) { (*static_cast<PoolTask*>(self)->task)(i); }
};

void compute(Kernel& k, OrtKernelContext* ctx) {
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
  const ParallelFor pool = [&](size_t n, const std::function<void(size_t)>& task) {
    PoolTask pt{&task};
    check(api, api.KernelContext_ParallelFor(ctx, &PoolTask::run, n, 0, &pt));
  };
  gemm(k.weight, tensor_data<float>(api, a_value), M, bias, y, k.isa, pool);
}

OrtStatus* to_status(const OrtApi* api, const std::string& node, OrtErrorCode code, const char* what) {
  return api->CreateStatus(code, ("RBEFusedGemm node '" + node + "': " + what).c_str());
}

// Every exception is turned into a status here: nothing may unwind into ORT.
template <typename F>
OrtStatus* guarded(const OrtApi* api, const std::string& node, F&& f) {
  try {
    f();
    return nullptr;
  } catch (const OpError& e) {
    return to_status(api, node, e.code, e.what());
  } catch (const FormatError& e) {
    return to_status(api, node, ORT_INVALID_GRAPH, e.what());
  } catch (const std::bad_alloc&) {
    return to_status(api, node, ORT_FAIL, "out of memory");
  } catch (const std::exception& e) {
    return to_status(api, node, ORT_FAIL, e.what());
  } catch (...) {
    return to_status(api, node, ORT_FAIL, "unknown error");
  }
}

struct RbeFusedGemmOp : OrtCustomOp {
  RbeFusedGemmOp() : OrtCustomOp{} {
    version = ORT_API_VERSION;
    GetName = [](const OrtCustomOp*) { return "RBEFusedGemm"; };
    GetExecutionProviderType = [](const OrtCustomOp*) { return "CPUExecutionProvider"; };
    GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return 3; };
    GetInputType = [](const OrtCustomOp*, size_t i) {
      return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    };
    GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 1; };
    GetOutputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; };
    GetInputCharacteristic = [](const OrtCustomOp*, size_t i) {
      return i == 2 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
    };
    GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
    GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
    GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
    GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 0; };
    GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
    GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 0; };
    GetStartVersion = [](const OrtCustomOp*) { return 1; };
    GetEndVersion = [](const OrtCustomOp*) { return INT_MAX; };
    CreateKernel = nullptr;
    KernelCompute = nullptr;
    CreateKernelV2 = [](const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info,
                        void** out) -> OrtStatus* {
      *out = nullptr;
      const std::string name = node_name(*api, info);
      return guarded(api, name, [&] { *out = create_kernel(*api, info, name); });
    };
    KernelComputeV2 = [](void* k, OrtKernelContext* ctx) -> OrtStatus* {
      Kernel& kernel = *static_cast<Kernel*>(k);
      return guarded(kernel.api, kernel.name, [&] { compute(kernel, ctx); });
    };
    KernelDestroy = [](void* k) { delete static_cast<Kernel*>(k); };
  }
};

}  // namespace

const OrtCustomOp* rbe_fused_gemm_op() {
  static const RbeFusedGemmOp op;
  return &op;
}

}  // namespace rbe

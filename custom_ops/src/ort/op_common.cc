#include "op_common.h"

#include <climits>
#include <memory>
#include <new>
#include <sstream>

namespace rbe {

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

std::string input_name(const OrtApi& api, const OrtKernelInfo* info, size_t index) {
  size_t n_inputs = 0;
  check(api, api.KernelInfo_GetInputCount(info, &n_inputs));
  if (index >= n_inputs) return "";
  size_t size = 0;
  check(api, api.KernelInfo_GetInputName(info, index, nullptr, &size));
  std::string name(size, '\0');
  check(api, api.KernelInfo_GetInputName(info, index, name.data(), &size));
  name.resize(size > 0 ? size - 1 : 0);
  return name;
}

std::optional<int64_t> optional_int_attr(const OrtApi& api, const OrtKernelInfo* info, const char* name) {
  int64_t v = 0;
  OrtStatus* st = api.KernelInfoGetAttribute_int64(info, name, &v);
  if (st) {
    api.ReleaseStatus(st);
    return std::nullopt;
  }
  return v;
}

namespace {
float scale0_attr(const OrtApi& api, const OrtKernelInfo* info) {
  float v = 0.f;
  OrtStatus* st = api.KernelInfoGetAttribute_float(info, "scale0", &v);
  if (st) { api.ReleaseStatus(st); throw FormatError("missing or non-float attribute 'scale0'"); }
  return v;
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

}  // namespace

// The weight inputs are read once, at kernel creation, so they cannot change between runs.
const OrtValue* constant_input(const OrtApi& api, const OrtKernelInfo* info, size_t index, const std::string& what,
                               const char* why) {
  int is_constant = 0;
  const OrtValue* value = nullptr;
  check(api, api.KernelInfoGetConstantInput_tensor(info, index, &is_constant, &value));
  if (!is_constant || value == nullptr) throw FormatError(what + " must be a constant initializer" + why);
  return value;
}

int64_t TensorView::size() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

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

const void* raw_data(const OrtApi& api, const OrtValue* value) {
  void* p = nullptr;
  check(api, api.GetTensorMutableData(const_cast<OrtValue*>(value), &p));
  return p;
}

namespace {
// The seeds, from the attribute or (a table two nodes share, FORMAT.md §2.2) from a constant input, not both;
// `owner` holds the attribute's copy while they are read.
struct SeedsInput {
  std::unique_ptr<OrtValue, decltype(OrtApi::ReleaseValue)> owner{nullptr, nullptr};
  const OrtValue* value = nullptr;
  TensorView view;
  const char* what = "attribute 'seeds'";
};

SeedsInput read_seeds(const OrtApi& api, const OrtKernelInfo* info, size_t seeds_index, int64_t N,
                      const char* shape_rule) {
  SeedsInput s;
  OrtAllocator* alloc = nullptr;
  check(api, api.GetAllocatorWithDefaultOptions(&alloc));
  OrtValue* attr_value = nullptr;
  OrtStatus* st = api.KernelInfoGetAttribute_tensor(info, "seeds", alloc, &attr_value);
  if (st) { api.ReleaseStatus(st); attr_value = nullptr; }
  s.owner = std::unique_ptr<OrtValue, decltype(OrtApi::ReleaseValue)>(attr_value, api.ReleaseValue);
  const bool seeds_input = !input_name(api, info, seeds_index).empty();
  if (attr_value && seeds_input)
    throw FormatError("seeds given twice: as attribute 'seeds' and as input 'seeds' (give one)");
  s.value = attr_value;
  if (seeds_input) {
    s.what = "input 'seeds'";
    s.value = constant_input(api, info, seeds_index, s.what);
  }
  if (s.value == nullptr)
    throw FormatError("missing attribute 'seeds' (an INT64 tensor; or a constant 'seeds' input)");
  s.view = describe(api, s.value);
  if (s.view.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64)
    throw FormatError(std::string(s.what) + " must be an INT64 tensor");
  if (s.view.shape.size() != 2 || s.view.shape[0] != N)
    throw FormatError(std::string(s.what) + " must have shape " + shape_rule);
  return s;
}

// A uint8 tensor's bytes. An empty tensor may have no data pointer though the input is given: it then points
// at kNoBytes, so that "given, empty" stays distinct from "absent" (null).
struct Bytes {
  const uint8_t* data;
  int64_t size;
};
const uint8_t kNoBytes = 0;

Bytes bytes_of(const OrtApi& api, const OrtValue* value, int64_t size) {
  return {size ? tensor_data<uint8_t>(api, value) : &kNoBytes, size};
}

// The constant uint8 1-D codes input, read in place.
Bytes read_codes(const OrtApi& api, const OrtKernelInfo* info, size_t codes_index) {
  size_t n_inputs = 0;
  check(api, api.KernelInfo_GetInputCount(info, &n_inputs));
  if (n_inputs <= codes_index) throw FormatError("input 'codes' missing");
  const OrtValue* codes_value =
      constant_input(api, info, codes_index, "input 'codes'", " (it is read in place, never copied)");
  const TensorView codes = describe(api, codes_value);
  if (codes.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 || codes.shape.size() != 1)
    throw FormatError("input 'codes' must be a 1-D uint8 tensor");
  return bytes_of(api, codes_value, codes.size());
}
}  // namespace

PreparedWeight read_weight(const OrtApi& api, const OrtKernelInfo* info, size_t codes_index, size_t center_index,
                           size_t seeds_index, size_t outliers_index) {
  WeightShape shape;
  shape.K = int_attr(api, info, "K");
  shape.N = int_attr(api, info, "N");
  shape.block_size = int_attr(api, info, "block_size");
  shape.bits = int_attr(api, info, "bits");
  shape.scale0 = scale0_attr(api, info);
  validate_shape(shape);  // before anything is sized from these numbers

  const SeedsInput seeds = read_seeds(api, info, seeds_index, shape.N, "[N, ceil(K / block_size)]");
  const Bytes codes = read_codes(api, info, codes_index);

  // The center is K floats, copied into the prepared weight, so it is read once here like the codes.
  const float* center = nullptr;
  int64_t n_center = 0;
  if (!input_name(api, info, center_index).empty()) {
    const OrtValue* center_value = constant_input(api, info, center_index, "input 'center'");
    const TensorView c = describe(api, center_value);
    if (c.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || c.shape.size() != 1 || c.shape[0] != shape.K) {
      std::ostringstream m;
      m << "input 'center' must be a float32 tensor of shape [" << shape.K << "] (K)";
      throw FormatError(m.str());
    }
    center = tensor_data<float>(api, center_value);
    n_center = c.size();
  }
  // The outlier records (§5.2) are decoded into the prepared weight once, like the center.
  const uint8_t* outliers = nullptr;
  int64_t n_outliers = 0;
  if (!input_name(api, info, outliers_index).empty()) {
    const OrtValue* value = constant_input(api, info, outliers_index, "input 'outliers'");
    const TensorView o = describe(api, value);
    if (o.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 || o.shape.size() != 1)
      throw FormatError("input 'outliers' must be a 1-D uint8 tensor");
    const Bytes records = bytes_of(api, value, o.size());
    outliers = records.data;
    n_outliers = records.size;
  }
  // The input rotation (§5.3): both attributes optional, absent meaning none.
  const int64_t rotation = optional_int_attr(api, info, "rotation").value_or(0);
  const int64_t rotation_seed = optional_int_attr(api, info, "rotation_seed").value_or(0);
  return prepare_weight(shape, tensor_data<int64_t>(api, seeds.value), seeds.view.size(),
                        codes.data, codes.size, center, n_center, outliers, n_outliers,
                        rotation, static_cast<uint64_t>(rotation_seed));
}

int64_t read_coding(const OrtApi& api, const OrtKernelInfo* info) {
  const int64_t coding = optional_int_attr(api, info, "coding").value_or(0);
  if (coding != 0 && coding != 1)
    throw FormatError("attribute 'coding'=" + std::to_string(coding) + " unsupported (0: fixed-width codes, 1: Rice)");
  return coding;
}

RiceTable read_rice_table(const OrtApi& api, const OrtKernelInfo* info, size_t codes_index, size_t center_index,
                          size_t seeds_index, size_t outliers_index, size_t lengths_index) {
  for (const char* name : {"bits", "block_size"})
    if (optional_int_attr(api, info, name))
      throw FormatError(std::string("attribute '") + name + "' given with coding=1 (a Rice-coded table has neither)");
  if (!input_name(api, info, center_index).empty()) throw FormatError("input 'center' given with coding=1");
  if (!input_name(api, info, outliers_index).empty()) throw FormatError("input 'outliers' given with coding=1");
  const int64_t K = int_attr(api, info, "K"), N = int_attr(api, info, "N");
  const float scale0 = scale0_attr(api, info);
  if (N < 1 || N > kMaxDim) throw FormatError("N=" + std::to_string(N) + " out of range [1, 2^24]");
  const SeedsInput seeds = read_seeds(api, info, seeds_index, N, "[N, 1] (one seed per entry)");
  if (seeds.view.shape[1] != 1) throw FormatError(std::string(seeds.what) + " must have shape [N, 1] (one seed per entry)");
  const Bytes codes = read_codes(api, info, codes_index);
  if (input_name(api, info, lengths_index).empty()) throw FormatError("input 'lengths' missing (required with coding=1)");
  const OrtValue* lengths_value = constant_input(api, info, lengths_index, "input 'lengths'");
  const TensorView lengths = describe(api, lengths_value);
  if (lengths.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16 || lengths.shape.size() != 1 || lengths.shape[0] != N)
    throw FormatError("input 'lengths' must be a uint16 tensor of shape [" + std::to_string(N) + "] (N)");
  return prepare_rice_table(K, N, scale0, tensor_data<int64_t>(api, seeds.value), seeds.view.size(),
                            codes.data, codes.size,
                            tensor_data<uint16_t>(api, lengths_value), lengths.size());
}

void init_op_defaults(OrtCustomOp& op) {
  op.version = ORT_API_VERSION;
  op.GetExecutionProviderType = [](const OrtCustomOp*) { return "CPUExecutionProvider"; };
  op.GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 1; };
  op.GetOutputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; };
  op.GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  op.GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  op.GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
  op.GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 0; };
  op.GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 0; };
  op.GetStartVersion = [](const OrtCustomOp*) { return 1; };
  op.GetEndVersion = [](const OrtCustomOp*) { return INT_MAX; };
  op.CreateKernel = nullptr;  // only the V2 entry points, which can return an error status
  op.KernelCompute = nullptr;
}

namespace {
OrtStatus* to_status(const OrtApi* api, const char* op, const std::string& node, OrtErrorCode code,
                     const char* what) {
  return api->CreateStatus(code, (std::string(op) + " node '" + node + "': " + what).c_str());
}
}  // namespace

OrtStatus* guarded(const OrtApi* api, const char* op, const std::string& node, const std::function<void()>& f) {
  try {
    f();
    return nullptr;
  } catch (const OpError& e) {
    return to_status(api, op, node, e.code, e.what());
  } catch (const FormatError& e) {
    return to_status(api, op, node, ORT_INVALID_GRAPH, e.what());
  } catch (const std::bad_alloc&) {
    return to_status(api, op, node, ORT_FAIL, "out of memory");
  } catch (const std::exception& e) {
    return to_status(api, op, node, ORT_FAIL, e.what());
  } catch (...) {
    return to_status(api, op, node, ORT_FAIL, "unknown error");
  }
}

}  // namespace rbe

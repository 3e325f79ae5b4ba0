// The library's one registration point, found by ORT's RegisterCustomOpsLibrary(_V2) and by
// SessionOptions.register_custom_ops_library.
#include <initializer_list>
#include <mutex>

#include <onnxruntime_c_api.h>

#include "rbe_fused_gemm.h"
#include "rbe_gather.h"
#include "rbe_merge_columns.h"

namespace {
// One domain for the life of the process: ORT does not take ownership, and sessions may outlive any
// particular SessionOptions, so the domain is created once and never released.
OrtCustomOpDomain* g_domain = nullptr;
std::mutex g_mutex;
}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {  // the runtime is older than the headers: report through the oldest API
    const OrtApi* api1 = api_base->GetApi(1);
    return api1 ? api1->CreateStatus(ORT_FAIL, "rbe_ops needs ONNX Runtime >= 1.21 (C API version 21)")
                : nullptr;
  }
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_domain == nullptr) {
    OrtCustomOpDomain* domain = nullptr;
    if (OrtStatus* st = api->CreateCustomOpDomain("ai.rbe", &domain)) return st;
    for (const OrtCustomOp* op : {rbe::rbe_fused_gemm_op(), rbe::rbe_gather_op(), rbe::rbe_merge_columns_op()}) {
      if (OrtStatus* st = api->CustomOpDomain_Add(domain, op)) {
        api->ReleaseCustomOpDomain(domain);
        return st;
      }
    }
    g_domain = domain;
  }
  return api->AddCustomOpDomain(options, g_domain);
}

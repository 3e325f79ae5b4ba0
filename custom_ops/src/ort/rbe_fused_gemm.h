// The RBEFusedGemm custom op (domain ai.rbe, version 1) on the ORT C API. Written against the C struct, not
// the C++ wrapper, so that every error crosses the library boundary as an OrtStatus (CreateKernelV2 /
// KernelComputeV2), never as a C++ exception.
#pragma once

#include <onnxruntime_c_api.h>

namespace rbe {

const OrtCustomOp* rbe_fused_gemm_op();

}  // namespace rbe

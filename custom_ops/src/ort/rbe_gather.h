// RBEGather (domain ai.rbe, version 1): rows of an RBE-coded embedding table, decoded on demand.
#pragma once

#include <onnxruntime_c_api.h>

namespace rbe {

const OrtCustomOp* rbe_gather_op();

}  // namespace rbe

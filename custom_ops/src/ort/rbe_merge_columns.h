// RBEMergeColumns (domain ai.rbe, version 1): two products' columns put back in one order.
#pragma once

#include <onnxruntime_c_api.h>

namespace rbe {

const OrtCustomOp* rbe_merge_columns_op();

}  // namespace rbe

// Rice-coded embedding tables (docs/FORMAT.md §5.4): RBEGather entries stored as variable-length streams,
// read value by value. Validated whole at preparation, so decoding an entry afterwards cannot fail.
#pragma once

#include <cstdint>
#include <vector>

#include "rbe/format.h"

namespace rbe {

constexpr int64_t kMaxRiceK = 16384;  // entries of at most 31 bits a value fit a uint16 length

struct RiceTable {
  int64_t K = 0, N = 0;
  const uint8_t* codes = nullptr;  // borrowed: the streams, back to back
  std::vector<int64_t> start;      // [N + 1]: byte offset of entry t's stream; start[N] = the codes' length
  std::vector<float> scale;        // [N]: d
  std::vector<int32_t> offset;     // [N]: o
  std::vector<uint8_t> rice_k;     // [N]: the Rice parameter
};

// Checks K, N, scale0, the seeds ([N] values, one per entry), the lengths ([N]) against the codes' length,
// and decodes every entry once (§6), throwing FormatError naming the first problem.
RiceTable prepare_rice_table(int64_t K, int64_t N, float scale0, const int64_t* seeds, int64_t n_seeds,
                             const uint8_t* codes, int64_t n_code_bytes, const uint16_t* lengths, int64_t n_lengths);

// Entry t's K values, bit for bit as the numpy decoder (rbe_onnx/codec/rice.py).
void decode_rice_entry(const RiceTable& table, int64_t t, float* out);

}  // namespace rbe

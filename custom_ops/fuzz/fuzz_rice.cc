// libFuzzer target for Rice-coded tables (docs/FORMAT.md §5.4): rbe::prepare_rice_table on carved-up seeds,
// lengths and streams, then rbe::decode_rice_entry on every entry it accepts.
//
// Oracles (any violation aborts, which libFuzzer reports as a crash):
//  - prepare_rice_table accepts exactly the tables a second, independent reading of §5.4 below accepts (the
//    stream expanded to one byte per bit, then parsed), and rejects the others with rbe::FormatError only;
//  - every accepted entry decodes to the reference's values bit for bit;
//  - ASan/UBSan: seeds, lengths and codes are heap buffers of exactly the size claimed.
//
// Input layout (little-endian; reading past the end yields zeros):
//   u16 K' (K = 1 + K' % 600, or K' itself when bit 0 of flags is set: 0 and > 16384 break §6)
//   u8  N' (N = 1 + N' % 48), u8 flags (bit0 RAW_K, bit1 LENGTH_DELTA), f32 scale0 (any pattern; 0 -> 0.01)
//   N x u64 seed masks, XORed onto a valid seed (tag 0xB2, theta 4, width k = mask bits 28-31 kept)
//   N x u16 lengths; with LENGTH_DELTA an i16 added to the codes' length afterwards
//   rest: the codes
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "rbe/format.h"
#include "rbe/rice.h"
#include "input_reader.h"

namespace {

[[noreturn]] void oracle(const char* what) {
  std::fprintf(stderr, "RBE_FUZZ oracle violated: %s\n", what);
  std::abort();
}

// §5.4 read again, independently: false when the table is not valid, else every entry's K values in `out`.
bool reference(int64_t K, int64_t N, float scale0, const std::vector<int64_t>& seeds,
               const std::vector<uint16_t>& lengths, const std::vector<uint8_t>& codes, std::vector<float>& out) {
  if (K < 1 || K > 16384 || !(std::isfinite(scale0) && scale0 > 0.f)) return false;
  uint64_t total = 0;
  for (uint16_t l : lengths) total += l;
  if (total != codes.size()) return false;
  std::vector<uint8_t> bits(codes.size() * 8);
  for (size_t i = 0; i < bits.size(); ++i) bits[i] = (codes[i / 8] >> (i % 8)) & 1;
  out.assign(static_cast<size_t>(K * N), 0.f);
  size_t start = 0;
  for (int64_t t = 0; t < N; ++t) {
    const uint64_t s = static_cast<uint64_t>(seeds[t]);
    const int rho = s & 0xFFFF, theta = (s >> 16) & 0xF, k = (s >> 28) & 0xF, outliers = (s >> 32) & 0xFF;
    const int alpha = (s >> 40) & 0xFFFF, tag = (s >> 56) & 0xFF;
    const int offset = static_cast<int8_t>((s >> 20) & 0xFF);
    if (tag != 0xB2 || theta != 4 || outliers != 0 || alpha != 0) return false;
    const float d = static_cast<float>(static_cast<double>(scale0) * std::exp(rho / 512.0));
    if (!std::isfinite(d)) return false;
    const size_t end = start + 8 * static_cast<size_t>(lengths[t]);  // start, end, pos: bit indices
    size_t pos = start;
    auto take = [&](int n, uint32_t& v) {
      v = 0;
      for (int i = 0; i < n; ++i) {
        if (pos >= end) return false;
        v |= static_cast<uint32_t>(bits[pos++]) << i;
      }
      return true;
    };
    for (int64_t i = 0; i < K; ++i) {
      int u = 0;
      for (;;) {
        if (u == 15) break;
        if (pos >= end) return false;
        if (!bits[pos++]) break;
        ++u;
      }
      uint32_t r = 0;
      if (!take(u == 15 ? 16 : k, r)) return false;
      const int64_t z = u == 15 ? r : (static_cast<int64_t>(u) << k) + r;
      const int64_t q = z % 2 == 0 ? z / 2 : -(z + 1) / 2;
      out[static_cast<size_t>(t * K + i)] = d * static_cast<float>(q + offset);
    }
    if (end - pos >= 8) return false;
    for (size_t i = pos; i < end; ++i)
      if (bits[i]) return false;
    start = end;
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Reader in{data, size};
  const uint16_t k_raw = in.take<uint16_t>();
  const int64_t N = 1 + in.take<uint8_t>() % 48;
  const uint8_t flags = in.take<uint8_t>();
  float scale0 = in.take<float>();
  if (scale0 == 0.f) scale0 = 0.01f;
  const int64_t K = (flags & 1) ? k_raw : 1 + k_raw % 600;
  std::vector<int64_t> seeds(static_cast<size_t>(N));
  for (auto& s : seeds) {
    const uint64_t mask = in.take<uint64_t>();
    const uint64_t valid = uint64_t{0xB2} << 56 | uint64_t{4} << 16;
    s = static_cast<int64_t>(valid ^ mask);
  }
  std::vector<uint16_t> lengths(static_cast<size_t>(N));
  uint64_t claimed = 0;
  for (auto& l : lengths) claimed += (l = in.take<uint16_t>());
  if (flags & 2) claimed = static_cast<uint64_t>(std::max<int64_t>(0, static_cast<int64_t>(claimed) + in.take<int16_t>()));
  claimed = std::min<uint64_t>(claimed, uint64_t{1} << 20);
  std::vector<uint8_t> codes(static_cast<size_t>(claimed));
  for (auto& c : codes) c = in.take<uint8_t>();

  std::vector<float> expected;
  const bool valid = reference(K, N, scale0, seeds, lengths, codes, expected);
  bool accepted = false;
  rbe::RiceTable table;
  try {
    table = rbe::prepare_rice_table(K, N, scale0, seeds.data(), N, codes.empty() ? nullptr : codes.data(),
                                    static_cast<int64_t>(codes.size()), lengths.data(), N);
    accepted = true;
  } catch (const rbe::FormatError& e) {
    if (std::getenv("RBE_FUZZ_VERBOSE")) std::fprintf(stderr, "RBE_FUZZ rejected: %s\n", e.what());
  }
  if (accepted != valid) oracle(valid ? "a valid table was rejected" : "an invalid table was accepted");
  if (std::getenv("RBE_FUZZ_VERBOSE") && accepted) std::fprintf(stderr, "RBE_FUZZ accepted\n");
  if (!accepted) return 0;
  std::vector<float> row(static_cast<size_t>(K));
  for (int64_t t = 0; t < N; ++t) {
    rbe::decode_rice_entry(table, t, row.data());
    if (std::memcmp(row.data(), expected.data() + t * K, sizeof(float) * static_cast<size_t>(K)) != 0)
      oracle("an entry decodes differently from the reference");
  }
  return 0;
}

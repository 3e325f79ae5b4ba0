#include "rbe/rice.h"

#include <cmath>
#include <sstream>
#include <string>

namespace rbe {
namespace {

constexpr int kEscape = 15;      // a run of 15 ones: the value follows in kEscapeBits raw bits
constexpr int kEscapeBits = 16;

[[noreturn]] void fail_entry(int64_t t, const char* what) {
  std::ostringstream m;
  m << "entry " << t << ": " << what;
  throw FormatError(m.str());
}

// Bits of one entry's stream, least significant first; reading past its end is an error, never a read
// outside the buffer.
class BitReader {
 public:
  BitReader(const uint8_t* p, int64_t bytes, int64_t entry) : p_(p), end_(bytes * 8), entry_(entry) {}
  unsigned bit() {
    if (pos_ >= end_) fail_entry(entry_, "stream ends before its K values");
    const unsigned b = (p_[pos_ >> 3] >> (pos_ & 7)) & 1u;
    ++pos_;
    return b;
  }
  uint32_t bits(int n) {
    uint32_t v = 0;
    for (int i = 0; i < n; ++i) v |= bit() << i;
    return v;
  }
  int64_t pos() const { return pos_; }
  int64_t end() const { return end_; }
  bool rest_zero() const {
    for (int64_t i = pos_; i < end_; ++i)
      if ((p_[i >> 3] >> (i & 7)) & 1u) return false;
    return true;
  }

 private:
  const uint8_t* p_;
  int64_t pos_ = 0, end_;
  int64_t entry_;
};

}  // namespace

void decode_rice_entry(const RiceTable& t, int64_t entry, float* out) {
  BitReader r(t.codes + t.start[entry], t.start[entry + 1] - t.start[entry], entry);
  const int k = t.rice_k[entry];
  const float d = t.scale[entry];
  const int32_t o = t.offset[entry];
  for (int64_t i = 0; i < t.K; ++i) {
    int u = 0;
    while (u < kEscape && r.bit()) ++u;
    const uint32_t z = u == kEscape ? r.bits(kEscapeBits) : (static_cast<uint32_t>(u) << k) | r.bits(k);
    const int32_t q = (z & 1u) ? -static_cast<int32_t>((z + 1) >> 1) : static_cast<int32_t>(z >> 1);
    out[i] = d * static_cast<float>(q + o);  // |q + o| < 2^20: exact in float32
  }
  if (r.end() - r.pos() >= 8) fail_entry(entry, "stream has a whole byte left after its K values");
  if (!r.rest_zero()) fail_entry(entry, "stream has nonzero bits after its K values");
}

RiceTable prepare_rice_table(int64_t K, int64_t N, float scale0, const int64_t* seeds, int64_t n_seeds,
                             const uint8_t* codes, int64_t n_code_bytes, const uint16_t* lengths, int64_t n_lengths) {
  std::ostringstream m;
  if (K < 1 || K > kMaxRiceK) { m << "K=" << K << " out of range [1, " << kMaxRiceK << "] for a Rice-coded table"; throw FormatError(m.str()); }
  if (N < 1 || N > kMaxDim) { m << "N=" << N << " out of range [1, 2^24]"; throw FormatError(m.str()); }
  if (!(std::isfinite(scale0) && scale0 > 0.f)) { m << "scale0=" << scale0 << " must be positive and finite"; throw FormatError(m.str()); }
  if (seeds == nullptr || n_seeds != N) { m << "seeds must hold N = " << N << " values (one per entry), got " << n_seeds; throw FormatError(m.str()); }
  if (lengths == nullptr || n_lengths != N) { m << "lengths must hold N = " << N << " values, got " << n_lengths; throw FormatError(m.str()); }
  RiceTable t;
  t.K = K;
  t.N = N;
  t.codes = codes;
  t.start.assign(static_cast<size_t>(N + 1), 0);
  for (int64_t i = 0; i < N; ++i) t.start[i + 1] = t.start[i] + lengths[i];
  if (t.start[N] != n_code_bytes || (codes == nullptr && n_code_bytes != 0)) {
    m << "lengths add up to " << t.start[N] << " bytes but codes hold " << n_code_bytes;
    throw FormatError(m.str());
  }
  t.scale.resize(N);
  t.offset.resize(N);
  t.rice_k.resize(N);
  for (int64_t i = 0; i < N; ++i) {
    const SeedFields f = unpack_seed(static_cast<uint64_t>(seeds[i]));
    const char* bad = nullptr;
    if (f.tag != kSeedTag) bad = "tag is not 0xB2";
    else if (f.theta != kUniformTheta) bad = "theta != 4 in a Rice-coded table";
    else if (f.outliers != 0) bad = "outlier count nonzero in a Rice-coded table";
    else if (f.alpha_bits != 0) bad = "alpha nonzero in a Rice-coded table";
    t.scale[i] = block_scale(scale0, f.rho);
    if (!bad && !std::isfinite(t.scale[i])) bad = "scale overflows float32 (scale0 too large)";
    if (bad) {
      m << "seed [" << i << ", 0]: " << bad;
      throw FormatError(m.str());
    }
    t.offset[i] = f.offset;
    t.rice_k[i] = static_cast<uint8_t>(f.width);
  }
  std::vector<float> scratch(static_cast<size_t>(K));
  for (int64_t i = 0; i < N; ++i) decode_rice_entry(t, i, scratch.data());
  return t;
}

}  // namespace rbe

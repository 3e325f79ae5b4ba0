#include "rbe/format.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>

namespace rbe {

SeedFields unpack_seed(uint64_t s) {
  SeedFields f;
  f.rho = static_cast<uint32_t>(s & 0xFFFF);
  f.theta = static_cast<uint32_t>((s >> 16) & 0xF);
  uint32_t off = static_cast<uint32_t>((s >> 20) & 0xFF);
  f.offset = off >= 128 ? static_cast<int32_t>(off) - 256 : static_cast<int32_t>(off);
  f.width = static_cast<uint32_t>((s >> 28) & 0xF);
  f.outliers = static_cast<uint32_t>((s >> 32) & 0xFF);
  f.alpha_bits = static_cast<uint32_t>((s >> 40) & 0xFFFF);
  f.tag = static_cast<uint32_t>((s >> 56) & 0xFF);
  return f;
}

uint64_t pack_seed(const SeedFields& f) {
  return uint64_t{f.rho & 0xFFFFu} | uint64_t{f.theta & 0xFu} << 16 | uint64_t{static_cast<uint8_t>(f.offset)} << 20 |
         uint64_t{f.width & 0xFu} << 28 | uint64_t{f.outliers & 0xFFu} << 32 | uint64_t{f.alpha_bits & 0xFFFFu} << 40 |
         uint64_t{f.tag & 0xFFu} << 56;
}

// By value rather than by bit manipulation into a float32 pattern: every binary16 number is m·2^e with an
// 11-bit m, which float32 holds exactly, so ldexp is exact and needs no F16C or _Float16 support.
float block_scale(float scale0, uint32_t rho) {
  return static_cast<float>(static_cast<double>(scale0) * std::exp(rho / 512.0));
}

float half_to_float(uint16_t h) {
  const int exponent = (h >> 10) & 0x1F;
  const uint32_t mantissa = h & 0x3FFu;
  float v;
  if (exponent == 0x1F)
    v = mantissa ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  else if (exponent == 0) v = std::ldexp(static_cast<float>(mantissa), -24);  // zero and subnormals
  else v = std::ldexp(static_cast<float>(mantissa | 0x400u), exponent - 25);
  return (h & 0x8000u) ? -v : v;  // negation keeps -0 (a nonzero alpha pattern, §6)
}

bool is_supported_bits(int64_t b) { return (b >= 2 && b <= 6) || b == 8; }
bool has_uniform_table(int64_t bits) { return bits >= 5; }
bool is_supported_block_size(int64_t s) { return s == 32 || s == 64 || s == 128 || s == 256; }

std::vector<int> level_table(int bits, int theta) {
  std::vector<int> table;
  if (has_uniform_table(bits)) {  // §5: L[c] + 128 is the code shifted to 8 bits, centred in its step
    const int step = 1 << (8 - bits), base = bits < 8 ? step / 2 : 0;
    for (int c = 0; c < (1 << bits); ++c) table.push_back(step * c + base - 128);
    return table;
  }
  const int n = 1 << bits;
  const double pi = 3.14159265358979323846;
  const double gamma = std::exp(0.6 * (theta * pi / 32.0 - pi / 8.0));
  for (int j = 0; j < n; ++j) {
    const double u = (2.0 * j + 1.0 - n) / (n - 1.0);
    const double v = 127.0 * (u < 0 ? -1.0 : 1.0) * std::pow(std::fabs(u), gamma);
    table.push_back(static_cast<int>(v < 0 ? -std::floor(-v + 0.5) : std::floor(v + 0.5)));
  }
  return table;
}

namespace {

[[noreturn]] void fail(const std::string& what) { throw FormatError(what); }

constexpr int64_t kOutlierRecordBytes = 3;  // row in block, binary16 value little-endian (§5.2)

// §5.2's records against the seeds' counts: length, rows inside the block and K, ascending, finite values.
void prepare_outliers(PreparedWeight& w, const uint8_t* records, int64_t n_bytes) {
  const WeightShape& s = w.shape;
  const int64_t nb = s.blocks_per_column(), n_blocks = s.N * nb;
  const int64_t total = w.outlier_first[n_blocks];
  if (n_bytes != kOutlierRecordBytes * total) {
    std::ostringstream m;
    m << "outliers must hold 3 x " << total << " (the seeds' outlier counts) = " << kOutlierRecordBytes * total
      << " bytes, got " << n_bytes;
    fail(m.str());
  }
  if (total == 0) {
    w.outlier_first.clear();  // no outliers: every outlier table empty, as without the input
    return;
  }
  w.outlier_k.resize(static_cast<size_t>(total));
  w.outlier_value.resize(static_cast<size_t>(total));
  w.outlier_delta.resize(static_cast<size_t>(total));
  std::vector<uint8_t> codes(static_cast<size_t>(s.block_size));
  int64_t j = 0;
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    const int64_t count = w.outlier_first[blk + 1] - w.outlier_first[blk];
    if (count == 0) continue;
    unpack_block_codes(w.codes + blk * s.block_bytes(), static_cast<int>(s.bits), static_cast<int>(s.block_size),
                       codes.data());
    const std::vector<int>& L = w.levels[w.theta[blk]];
    for (int64_t r = 0; r < count; ++r, ++j) {
      const uint8_t* rec = records + kOutlierRecordBytes * j;
      const int64_t row = rec[0], k = (blk % nb) * s.block_size + row;
      const uint16_t half = static_cast<uint16_t>(rec[1] | (rec[2] << 8));
      const char* bad = nullptr;
      if (row >= s.block_size) bad = "row past the block";
      else if (k >= s.K) bad = "row past K (a tail position)";
      else if (r > 0 && row <= records[kOutlierRecordBytes * (j - 1)]) bad = "rows not strictly ascending within the block";
      else if ((half & 0x7C00u) == 0x7C00u) bad = "value is not finite";
      if (bad) {
        std::ostringstream m;
        m << "outlier " << j << " (block [" << blk / nb << ", " << blk % nb << "]): " << bad;
        fail(m.str());
      }
      w.outlier_k[j] = static_cast<int32_t>(k);
      w.outlier_value[j] = half_to_float(half);
      w.outlier_delta[j] = w.outlier_value[j] - w.scale[blk] * static_cast<float>(L[codes[row]] + w.offset[blk]);
    }
  }
}

}  // namespace

void validate_shape(const WeightShape& s) {
  std::ostringstream m;
  if (!is_supported_bits(s.bits)) { m << "bits=" << s.bits << " unsupported (2, 3, 4, 5, 6 or 8)"; fail(m.str()); }
  if (!is_supported_block_size(s.block_size)) {
    m << "block_size=" << s.block_size << " unsupported (32, 64, 128 or 256)"; fail(m.str());
  }
  if (s.K < 1 || s.K > kMaxDim) { m << "K=" << s.K << " out of range [1, 2^24]"; fail(m.str()); }
  if (s.N < 1 || s.N > kMaxDim) { m << "N=" << s.N << " out of range [1, 2^24]"; fail(m.str()); }
  if (!(std::isfinite(s.scale0) && s.scale0 > 0.f)) {
    m << "scale0=" << s.scale0 << " must be positive and finite"; fail(m.str());
  }
}

PreparedWeight prepare_weight(const WeightShape& shape, const int64_t* seeds, int64_t n_seeds,
                              const uint8_t* codes, int64_t n_code_bytes, const float* center,
                              int64_t n_center, const uint8_t* outliers, int64_t n_outlier_bytes, int64_t rotation,
                              uint64_t rotation_seed) {
  validate_shape(shape);
  if (rotation != 0 && !is_valid_rotation(shape.K, rotation))
    fail("attribute 'rotation'=" + std::to_string(rotation) + " must be 0 or a power of two in [2, " +
         std::to_string(kMaxRotation) + "] dividing K=" + std::to_string(shape.K));
  const int64_t nb = shape.blocks_per_column();
  const int64_t n_blocks = shape.N * nb;
  if (seeds == nullptr || n_seeds != n_blocks) {
    std::ostringstream m;
    m << "seeds must hold N*nb = " << shape.N << "*" << nb << " = " << n_blocks << " values, got " << n_seeds;
    fail(m.str());
  }
  if (codes == nullptr || n_code_bytes != shape.code_bytes()) {
    std::ostringstream m;
    m << "codes must hold " << shape.code_bytes() << " bytes for K=" << shape.K << " N=" << shape.N
      << " block_size=" << shape.block_size << " bits=" << shape.bits << ", got " << n_code_bytes;
    fail(m.str());
  }
  const bool has_center = center != nullptr;
  if (has_center) {
    if (n_center != shape.K) {
      std::ostringstream m;
      m << "center must hold K = " << shape.K << " floats, got " << n_center;
      fail(m.str());
    }
    for (int64_t k = 0; k < shape.K; ++k)
      if (!std::isfinite(center[k])) {
        std::ostringstream m;
        m << "center holds NaN or Inf (center[" << k << "] = " << center[k] << ")";
        fail(m.str());
      }
  }
  PreparedWeight w;
  w.shape = shape;
  w.codes = codes;
  w.scale.resize(n_blocks);
  w.offset.resize(n_blocks);
  w.scaled_offset.resize(n_blocks);
  w.theta.resize(n_blocks);
  if (has_center) {
    w.alpha.resize(n_blocks);
    w.center.assign(static_cast<size_t>(shape.padded_K()), 0.f);
    std::copy(center, center + shape.K, w.center.begin());
  }
  // The seeds' outlier counts as prefix sums; prepare_outliers checks the records against them.
  if (outliers != nullptr) w.outlier_first.assign(static_cast<size_t>(n_blocks + 1), 0);
  for (int64_t i = 0; i < n_blocks; ++i) {
    const SeedFields f = unpack_seed(static_cast<uint64_t>(seeds[i]));
    const char* bad = nullptr;
    if (f.tag == kSeedTagV1)
      bad = "tag 0xB1: a format-1 file (its 3-bit code layout is not format 2's); re-run `rbe-onnx rewrite` "
            "on the original model to re-encode it";
    else if (f.tag == kSeedTagRotated && rotation == 0)
      bad = "tag 0xB3: the block belongs to a rotated product (FORMAT.md §5.3) but the node has no 'rotation'";
    else if (f.tag == kSeedTag && rotation != 0)
      bad = "tag 0xB2 in a node with a 'rotation': a rotated node's seeds carry 0xB3 (FORMAT.md §5.3)";
    else if (f.tag != kSeedTag && f.tag != kSeedTagRotated) bad = "tag is not 0xB2 (not an RBE v2 seed)";
    else if (f.width != static_cast<uint32_t>(shape.bits)) bad = "width field differs from the bits attribute";
    else if (f.outliers != 0 && outliers == nullptr) bad = "outlier count nonzero but the node has no outliers input";
    else if (f.outliers > static_cast<uint32_t>(shape.block_size)) bad = "outlier count above block_size";
    else if ((f.alpha_bits & 0x7C00u) == 0x7C00u) bad = "alpha is not finite";
    else if (f.alpha_bits != 0 && !has_center) bad = "alpha nonzero but the node has no center vector";
    else if (has_uniform_table(shape.bits) && f.theta != kUniformTheta) bad = "theta != 4 with 5-, 6- or 8-bit codes";
    if (bad) {
      std::ostringstream m;
      m << "seed [" << i / nb << ", " << i % nb << "]: " << bad;
      fail(m.str());
    }
    w.scale[i] = block_scale(shape.scale0, f.rho);
    w.offset[i] = static_cast<float>(f.offset);
    w.scaled_offset[i] = w.scale[i] * w.offset[i];
    w.theta[i] = static_cast<uint8_t>(f.theta);
    if (outliers != nullptr) w.outlier_first[i + 1] = w.outlier_first[i] + f.outliers;
    if (has_center) w.alpha[(i % nb) * shape.N + i / nb] = half_to_float(static_cast<uint16_t>(f.alpha_bits));
    if (!std::isfinite(w.scale[i])) {
      std::ostringstream m;
      m << "seed [" << i / nb << ", " << i % nb << "]: scale overflows float32 (scale0 too large)";
      fail(m.str());
    }
  }
  w.levels.resize(kThetaSteps);
  for (int t = 0; t < kThetaSteps; ++t) {
    w.levels[t] = level_table(static_cast<int>(shape.bits), has_uniform_table(shape.bits) ? kUniformTheta : t);
    if (has_uniform_table(shape.bits)) continue;  // lut and lut_vnni are the 2/3/4-bit kernels' lookups
    for (size_t c = 0; c < w.levels[t].size(); ++c) w.lut[t][c] = static_cast<int8_t>(w.levels[t][c]);
    for (size_t c = 0; c < 64; ++c) w.lut_vnni[t][c] = static_cast<uint8_t>(w.levels[t][c % w.levels[t].size()] + 128);
  }
  if (outliers != nullptr) prepare_outliers(w, outliers, n_outlier_bytes);
  set_rotation(w, rotation, rotation_seed);
  return w;
}

void decode_block(const PreparedWeight& w, int64_t blk, float* out) {
  const WeightShape& s = w.shape;
  uint8_t codes[256];
  unpack_block_codes(w.codes + blk * s.block_bytes(), static_cast<int>(s.bits), static_cast<int>(s.block_size),
                     codes);
  const std::vector<int>& L = w.levels[w.theta[blk]];
  for (int64_t i = 0; i < s.block_size; ++i) out[i] = w.scale[blk] * static_cast<float>(L[codes[i]] + w.offset[blk]);
  if (w.has_outliers())
    for (int64_t j = w.outlier_first[blk]; j < w.outlier_first[blk + 1]; ++j)
      out[w.outlier_k[j] % s.block_size] = w.outlier_value[j];
  if (!w.has_center()) return;
  // Two rounded products and one rounded sum (§5.1): this file is built with -ffp-contract=off, since a
  // fused multiply-add here would round once less than the numpy spec and change the bits.
  const int64_t nb = s.blocks_per_column();
  const float alpha = w.alpha[(blk % nb) * s.N + blk / nb];
  const float* c = w.center.data() + (blk % nb) * s.block_size;
  for (int64_t i = 0; i < s.block_size; ++i) out[i] = out[i] + alpha * c[i];
}

void unpack_block_codes(const uint8_t* block, int bits, int block_size, uint8_t* out) {
  if (bits == 3) {
    // Chunks of C codes: a low plane of C/4 bytes (byte j holds the low two bits of codes j, j + C/4, j + C/2,
    // j + 3C/4), then a high plane of C/8 bytes (bit i of byte j is bit 2 of code j + i·C/8).
    const int C = chunk_3bit(block_size);
    for (int c0 = 0; c0 < block_size; c0 += C) {
      const uint8_t* low = block + c0 * 3 / 8;
      const uint8_t* high = low + C / 4;
      for (int t = 0; t < C; ++t)
        out[c0 + t] = static_cast<uint8_t>(((low[t % (C / 4)] >> (2 * (t / (C / 4)))) & 3) |
                                           ((high[t % (C / 8)] >> (t / (C / 8))) & 1) << 2);
    }
    return;
  }
  const int group_bytes = 4 * bits;
  for (int g = 0; g < block_size / kGroup; ++g) {
    const uint8_t* p = block + g * group_bytes;
    uint8_t* o = out + g * kGroup;
    switch (bits) {
      case 8:
        std::memcpy(o, p, kGroup);
        break;
      case 2:
        for (int j = 0; j < 8; ++j)
          for (int q = 0; q < 4; ++q) o[j + 8 * q] = (p[j] >> (2 * q)) & 3;
        break;
      default:  // 4, 5 and 6 bits: 16 bytes of nibbles, codes j and j + 16 in byte j; then 5 and 6 bits' top bits
        for (int j = 0; j < 16; ++j) { o[j] = p[j] & 0xF; o[j + 16] = p[j] >> 4; }
        if (bits == 5)  // bit t of the 4 bytes (little-endian) is bit 4 of code t
          for (int t = 0; t < kGroup; ++t) o[t] |= ((p[16 + t / 8] >> (t % 8)) & 1) << 4;
        if (bits == 6)  // 8 bytes of the top two bits as 2-bit codes
          for (int j = 0; j < 8; ++j)
            for (int q = 0; q < 4; ++q) o[j + 8 * q] |= ((p[16 + j] >> (2 * q)) & 3) << 4;
        break;
    }
  }
}

}  // namespace rbe

// Standalone kernel test (no ONNX Runtime, no Python), built with -DRBE_BUILD_TESTS=ON. It runs where the
// Python tests cannot, e.g. cross-compiled for aarch64 under qemu (tests/test_neon_qemu.py), so it carries
// its own yardstick: the test packs random codes itself (FORMAT.md §4) and decodes them from the fields it
// chose (§3, §5), independently of format.cc, then checks
//   1. the scalar kernel against that direct double-precision product,
//   2. every other available ISA (AVX2 on x86, NEON on aarch64) against the scalar kernel,
// both to max|diff| <= 1e-5 · max|ref|, that rbe::decode_weight gives the decoded weights bit for bit, and that
// malformed inputs throw rbe::FormatError. Cases with a center vector (§5.1) put a random binary16 alpha in
// every seed and add float32(α·c_k) to the test's own decode (rounded separately, never fused, as the spec
// says: under qemu this checks that the aarch64 build of format.cc does not contract it into an FMA).
// The int8 path (accuracy_level 4) the same way: the test quantizes the activations itself (FORMAT.md §2.1;
// the library's quantize_row_int8 must match it bit for bit), computes the integer block sums directly, and
// checks the scalar int8 kernel against that and every SIMD ISA's int8 path against the scalar one.
// Rice-coded tables (§5.4) likewise: the test writes the streams itself, and the library must read back the
// values it chose, bit for bit, and refuse broken tables (under qemu too: aarch64's char is unsigned).
// Prints `kernel_test: N passed, M failed` and exits non-zero on any failure.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "rbe/format.h"
#include "rbe/kernels.h"
#include "rbe/rice.h"
#include "reference.h"  // rbe_ref::rotate_rows (§5.3 in double), rbe_ref::with_tag

namespace {

int g_passed = 0, g_failed = 0;

void report(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAIL %s\n", what.c_str());
  }
}

// Seed per FORMAT.md §3: rho 0-15, theta 16-19, offset 20-27 (int8), width 28-31, alpha 40-55, tag 56-63.
uint64_t make_seed(uint32_t rho, uint32_t theta, int32_t offset, uint32_t width, uint16_t alpha = 0) {
  return rbe::pack_seed({rho, theta, width, 0, alpha, rbe::kSeedTag, offset});
}

// binary16 (§3's alpha) by its definition: ±2^(e−15)·(1 + m/1024), subnormal ±2^−14·(m/1024); e = 31 is
// never passed here.
float half_value(uint16_t h) {
  const int e = (h >> 10) & 0x1F;
  const double m = (h & 0x3FF) / 1024.0;
  const double v = e == 0 ? std::ldexp(m, -14) : std::ldexp(1.0 + m, e - 15);
  return static_cast<float>((h & 0x8000) ? -v : v);
}

// A finite binary16 alpha: |α| in [2^-10, 2^9) so that the center term is as large as the rest of the weight
// (up to ~e^8·1e-3·255), or now and then ±0 or a subnormal.
uint16_t random_alpha(std::mt19937_64& rng) {
  static const uint16_t kSpecial[] = {0x0000, 0x8000, 0x0001, 0x83FF};
  const uint64_t r = rng();
  if (r % 8 == 0) return kSpecial[(r >> 3) % 4];
  const uint64_t exponent = 5 + (r >> 8) % 19;
  return static_cast<uint16_t>(((r >> 24) & 1) << 15 | exponent << 10 | ((r >> 32) & 0x3FF));
}

// Packs one block of codes (block_size values < 2^bits) per FORMAT.md §4, written from the table there
// rather than shared with format.cc so that a layout bug cannot hide in both.
void pack_block(const uint8_t* codes, int bits, int block_size, uint8_t* out) {
  if (bits == 3) {  // chunks of C codes: C/4 bytes of low bit pairs, then C/8 bytes of high bits
    const int C = std::min(block_size, 128), n = C / 4, m = C / 8;
    for (int c0 = 0; c0 < block_size; c0 += C) {
      const uint8_t* c = codes + c0;
      uint8_t* p = out + c0 * 3 / 8;
      for (int j = 0; j < n; ++j)
        p[j] = static_cast<uint8_t>((c[j] & 3) | (c[j + n] & 3) << 2 | (c[j + 2 * n] & 3) << 4 |
                                    (c[j + 3 * n] & 3) << 6);
      for (int j = 0; j < m; ++j) {
        p[n + j] = 0;
        for (int i = 0; i < 8; ++i) p[n + j] |= static_cast<uint8_t>(((c[j + i * m] >> 2) & 1) << i);
      }
    }
    return;
  }
  for (int g = 0; g < block_size / 32; ++g) {
    const uint8_t* c = codes + 32 * g;
    uint8_t* p = out + g * 4 * bits;
    switch (bits) {
      case 8:
        for (int t = 0; t < 32; ++t) p[t] = c[t];
        break;
      case 4:
        for (int j = 0; j < 16; ++j) p[j] = static_cast<uint8_t>(c[j] | c[j + 16] << 4);
        break;
      case 5:  // low nibbles as 4-bit codes; then bit t of 4 bytes (little-endian) is bit 4 of code t
        for (int j = 0; j < 16; ++j) p[j] = static_cast<uint8_t>((c[j] & 15) | (c[j + 16] & 15) << 4);
        for (int j = 0; j < 4; ++j) {
          p[16 + j] = 0;
          for (int i = 0; i < 8; ++i) p[16 + j] |= static_cast<uint8_t>(((c[8 * j + i] >> 4) & 1) << i);
        }
        break;
      case 6:  // low nibbles as 4-bit codes; then the top two bits as 2-bit codes
        for (int j = 0; j < 16; ++j) p[j] = static_cast<uint8_t>((c[j] & 15) | (c[j + 16] & 15) << 4);
        for (int j = 0; j < 8; ++j)
          p[16 + j] = static_cast<uint8_t>((c[j] >> 4) | (c[j + 8] >> 4) << 2 | (c[j + 16] >> 4) << 4 | (c[j + 24] >> 4) << 6);
        break;
      default:
        for (int j = 0; j < 8; ++j)
          p[j] = static_cast<uint8_t>((c[j] & 3) | (c[j + 8] & 3) << 2 | (c[j + 16] & 3) << 4 | (c[j + 24] & 3) << 6);
    }
  }
}

struct Case {
  int bits, block_size;
  int64_t K, N;
  bool center = false;    // a center vector and a random alpha per block (§5.1)
  bool outliers = false;  // 0 to 3 exact outliers per block, now and then a whole block of them (§5.2)
};

// Random valid weight: seeds, packed codes, and the K x N matrix those encode (computed here, §5, §5.1).
struct RandomWeight {
  rbe::WeightShape shape;
  std::vector<int64_t> seeds;
  std::vector<uint8_t> codes;
  std::vector<double> W;       // K x N row-major: the weight, center term included (each a float32 value)
  std::vector<double> W0;      // K x N: d·(L+o) alone (what the codes decode to, outliers or not)
  std::vector<double> delta;   // K x N: an outlier's value less W0 there, 0 elsewhere
  std::vector<float> center;   // K, empty without a center
  std::vector<float> alpha;    // N·nb, empty without a center
  std::vector<uint8_t> records;  // §5.2's outlier records; with outliers, never empty (a null input else)
  const float* center_ptr() const { return center.empty() ? nullptr : center.data(); }
  const uint8_t* outliers_ptr(const Case& c) const { return c.outliers ? records.data() : nullptr; }
};

RandomWeight random_weight(const Case& c, std::mt19937_64& rng) {
  RandomWeight r;
  r.shape.K = c.K;
  r.shape.N = c.N;
  r.shape.block_size = c.block_size;
  r.shape.bits = c.bits;
  r.shape.scale0 = 1e-3f;
  const int64_t nb = r.shape.blocks_per_column(), bs = c.block_size;
  r.seeds.resize(static_cast<size_t>(c.N * nb));
  r.codes.resize(static_cast<size_t>(r.shape.code_bytes()));
  r.W.assign(static_cast<size_t>(c.K * c.N), 0.0);
  r.W0.assign(static_cast<size_t>(c.K * c.N), 0.0);
  r.delta.assign(static_cast<size_t>(c.K * c.N), 0.0);
  std::normal_distribution<float> normal(0.f, 1.f);
  if (c.center) {
    r.center.resize(static_cast<size_t>(c.K));
    for (auto& v : r.center) v = normal(rng);
    r.alpha.resize(static_cast<size_t>(c.N * nb));
  }
  // rho up to 4095: block scales over a factor e^8 ≈ 3000, as uneven as real weights get.
  std::uniform_int_distribution<uint32_t> rho_d(0, 4095), theta_d(0, 15), code_d(0, (1u << c.bits) - 1);
  std::uniform_int_distribution<int32_t> offset_d(-128, 127);
  std::vector<uint8_t> block_codes(static_cast<size_t>(bs));
  for (int64_t n = 0; n < c.N; ++n)
    for (int64_t b = 0; b < nb; ++b) {
      const uint32_t rho = rho_d(rng), theta = rbe::has_uniform_table(c.bits) ? rbe::kUniformTheta : theta_d(rng);
      const int32_t offset = offset_d(rng);
      const int64_t blk = n * nb + b;
      const uint16_t alpha = c.center ? random_alpha(rng) : 0;
      if (c.center) r.alpha[blk] = half_value(alpha);
      // Outlier rows: a random subset of the block's rows below K (every one of them now and then).
      const int64_t rows = std::min<int64_t>(bs, c.K - b * bs);
      std::vector<int64_t> exact_rows;
      if (c.outliers) {
        const uint64_t pick = rng();
        const int64_t want = std::min<int64_t>(pick % 16 == 0 ? rows : static_cast<int64_t>(pick % 4), std::min<int64_t>(rows, 255));
        for (int64_t i = 0, need = want; i < rows && need > 0; ++i)
          if (static_cast<int64_t>(rng() % static_cast<uint64_t>(rows - i)) < need) { exact_rows.push_back(i); --need; }
      }
      const uint64_t count = exact_rows.size();
      r.seeds[blk] = static_cast<int64_t>(make_seed(rho, theta, offset, static_cast<uint32_t>(c.bits), alpha) |
                                          count << 32);
      // Tail codes (k >= K) are random too, not the 0 an encoder writes: decoders must ignore them (§4).
      for (auto& code : block_codes) code = static_cast<uint8_t>(code_d(rng));
      pack_block(block_codes.data(), c.bits, c.block_size, r.codes.data() + blk * r.shape.block_bytes());
      const float d = static_cast<float>(static_cast<double>(r.shape.scale0) * std::exp(rho / 512.0));
      const std::vector<int> L = rbe::level_table(c.bits, static_cast<int>(theta));
      for (int64_t i = 0; i < bs && b * bs + i < c.K; ++i) {
        const int64_t k = b * bs + i;
        // volatile: each product rounded to float32 on its own, as §5.1 says, whatever the compiler contracts.
        const volatile float base = d * static_cast<float>(L[block_codes[i]] + offset);
        const volatile float term = c.center ? r.alpha[blk] * r.center[k] : 0.f;
        r.W0[k * c.N + n] = static_cast<double>(base);
        r.W[k * c.N + n] = static_cast<double>(c.center ? base + term : base);
      }
      for (int64_t i : exact_rows) {
        // The value replaces d·(L[c]+o); the center term still adds (§5.2). Values as large as the block's.
        const int64_t k = b * bs + i;
        const uint16_t h = random_alpha(rng);
        const volatile float v = half_value(h);
        const volatile float term = c.center ? r.alpha[blk] * r.center[k] : 0.f;
        r.records.insert(r.records.end(), {static_cast<uint8_t>(i), static_cast<uint8_t>(h & 0xFF),
                                           static_cast<uint8_t>(h >> 8)});
        r.delta[k * c.N + n] = static_cast<double>(v) - r.W0[k * c.N + n];
        r.W[k * c.N + n] = static_cast<double>(c.center ? v + term : v);
      }
    }
  if (c.outliers) r.records.reserve(r.records.size() + 1);  // a valid pointer even for zero records
  return r;
}

// max|got - ref| <= 1e-5 · max(max|ref|, floor) (a norm-wise bound: the float kernels accumulate in float, the
// reference in double, so elementwise relative error is meaningless for outputs near zero). floor: the size of
// terms that cancel inside a product, which the bound must scale with as well (outliers, below).
bool close(const std::vector<float>& got, const std::vector<double>& ref, double* rel_out, double floor = 0.0) {
  double max_ref = floor, max_diff = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) {
    max_ref = std::max(max_ref, std::fabs(ref[i]));
    const double diff = std::fabs(static_cast<double>(got[i]) - ref[i]);
    max_diff = std::isnan(diff) ? INFINITY : std::max(max_diff, diff);
  }
  *rel_out = max_ref > 0 ? max_diff / max_ref : max_diff;
  return max_diff <= 1e-5 * max_ref;
}

std::string describe(const Case& c, int64_t M, const std::string& what) {
  return "bits=" + std::to_string(c.bits) + " block_size=" + std::to_string(c.block_size) +
         " K=" + std::to_string(c.K) + " N=" + std::to_string(c.N) + (c.center ? " center" : "") +
         (c.outliers ? " outliers" : "") +
         " M=" + std::to_string(M) + ": " + what;
}

// FORMAT.md §2.1, written from the spec: per row and block, amax = max|a| (0 past K); s = amax/127 and
// q = round-half-even(a · (127/amax)) in float32; a non-finite value makes s NaN and q 0; amax = 0 gives 0.
struct Quantized {
  std::vector<int8_t> q;      // M x nb·bs
  std::vector<float> scale;   // M x nb
  std::vector<int32_t> qsum;  // M x nb
};

Quantized quantize_spec(const std::vector<float>& A, int64_t M, int64_t K, int64_t bs) {
  const int64_t nb = (K + bs - 1) / bs, Kp = nb * bs;
  Quantized out;
  out.q.assign(static_cast<size_t>(M * Kp), 0);
  out.scale.assign(static_cast<size_t>(M * nb), 0.f);
  out.qsum.assign(static_cast<size_t>(M * nb), 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      float amax = 0.f;
      bool finite = true;
      for (int64_t k = b * bs; k < std::min(K, (b + 1) * bs); ++k) {
        const float a = A[m * K + k];
        if (!std::isfinite(a)) finite = false;
        else amax = std::max(amax, std::fabs(a));
      }
      if (!finite) { out.scale[m * nb + b] = NAN; continue; }
      if (amax == 0.f) continue;
      const volatile float inv = 127.f / amax;  // volatile: one float32 product, never fused
      out.scale[m * nb + b] = amax / 127.f;
      int32_t sum = 0;
      for (int64_t k = b * bs; k < std::min(K, (b + 1) * bs); ++k) {
        const volatile float x = A[m * K + k] * inv;
        const int v = static_cast<int>(std::nearbyint(x));  // default rounding mode: half to even
        out.q[m * Kp + k] = static_cast<int8_t>(std::clamp(v, -127, 127));
        sum += out.q[m * Kp + k];
      }
      out.qsum[m * nb + b] = sum;
    }
  return out;
}

// The SIMD kernels and the int8 path multiply every code, an outlier's too, and then add a_k·(v − d·(L[c]+o))
// (§5.2): the code's value enters and cancels, so their rounding scales with max over outputs of
// Σ_outliers |a_k·d·(L[c]+o)| (the scalar float kernel substitutes v before multiplying). Encoders write the nearest level at an outlier,
// which keeps this at the outlier's own size; this test's codes are random, so it can be far larger.
double outlier_cancellation(const Case& c, const RandomWeight& rw, const std::vector<float>& A, int64_t M) {
  if (!c.outliers) return 0.0;
  double worst = 0.0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < c.N; ++n) {
      double sum = 0.0;
      for (int64_t k = 0; k < c.K; ++k)
        if (rw.delta[k * c.N + n] != 0.0) sum += std::fabs(static_cast<double>(A[m * c.K + k]) * rw.W0[k * c.N + n]);
      if (std::isfinite(sum)) worst = std::max(worst, sum);
    }
  return worst;
}

void test_gemm_int8(const Case& c, const RandomWeight& rw, const rbe::PreparedWeight& w, const std::vector<float>& bias,
                    const std::vector<rbe::Isa>& simd, std::mt19937_64& rng, double* worst) {
  const int64_t nb = rw.shape.blocks_per_column(), bs = c.block_size, Kp = nb * bs;
  std::normal_distribution<float> normal(0.f, 1.f);
  for (int64_t M : {1, 2, 3, 4, 5, 7, 13, 64}) {
    std::vector<float> A(static_cast<size_t>(M * c.K));
    for (auto& v : A) v = normal(rng);
    if (M == 7) {  // an all-zero block, an exact .5 tie and a NaN row: the edge cases of §2.1
      for (int64_t k = 0; k < std::min<int64_t>(bs, c.K); ++k) A[k] = 0.f;
      if (c.K > 2) { A[c.K + 0] = 127.f; A[c.K + 1] = 0.5f; A[c.K + 2] = -2.5f; }
      A[6 * c.K + c.K / 2] = NAN;
    }
    const Quantized qz = quantize_spec(A, M, c.K, bs);
    // The library's quantizer, bit for bit.
    std::vector<int8_t> q(static_cast<size_t>(Kp));
    std::vector<float> scale(static_cast<size_t>(nb));
    std::vector<int32_t> qsum(static_cast<size_t>(nb));
    bool same = true;
    for (int64_t m = 0; m < M; ++m) {
      rbe::quantize_row_int8(A.data() + m * c.K, c.K, bs, q.data(), scale.data(), qsum.data());
      for (int64_t k = 0; k < Kp; ++k) same = same && q[k] == qz.q[m * Kp + k];
      for (int64_t b = 0; b < nb; ++b) {
        const float want = qz.scale[m * nb + b];
        same = same && (std::isnan(want) ? std::isnan(scale[b]) : scale[b] == want) && qsum[b] == qz.qsum[m * nb + b];
      }
    }
    report(same, describe(c, M, "int8: quantize_row_int8 equals the spec"));
    // Direct: Σ_b d·s·Σ_k (L[c_k] + o)·q_k with the weight's own decoded (L + o)·d = W0, so (L + o) = W0/d;
    // with a center, + Σ_b α·Σ_k a_k·c_k, and with outliers + Σ a_k·(v − W0), on the float activations (§2.1).
    std::vector<double> direct(static_cast<size_t>(M * c.N));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < c.N; ++n) {
        double acc = bias[n];
        for (int64_t b = 0; b < nb; ++b) {
          const double d = w.scale[n * nb + b];
          int64_t dot = 0;
          double center_dot = 0.0;
          for (int64_t k = b * bs; k < std::min(c.K, (b + 1) * bs); ++k) {
            dot += std::llround(rw.W0[k * c.N + n] / d) * qz.q[m * Kp + k];
            if (c.center) center_dot += static_cast<double>(A[m * c.K + k]) * rw.center[k];
            if (c.outliers) acc += static_cast<double>(A[m * c.K + k]) * rw.delta[k * c.N + n];
          }
          acc += d * static_cast<double>(qz.scale[m * nb + b]) * static_cast<double>(dot);
          if (c.center) acc += static_cast<double>(rw.alpha[n * nb + b]) * center_dot;
        }
        direct[m * c.N + n] = acc;
      }
    std::vector<float> ref(static_cast<size_t>(M * c.N), NAN);
    double rel = 0.0;
    const double cancel = outlier_cancellation(c, rw, A, M);
    rbe::gemm(w, A.data(), M, bias.data(), ref.data(), rbe::Isa::Scalar, rbe::serial_for, rbe::kAccuracyInt8);
    // NaN rows compare as NaN == NaN; the rest to the usual tolerance.
    auto finite_part = [&](const std::vector<float>& y, std::vector<float>* yf, std::vector<double>* rf,
                           const std::vector<double>& r, bool* nan_ok) {
      *nan_ok = true;
      for (size_t i = 0; i < r.size(); ++i) {
        if (std::isnan(r[i])) { *nan_ok = *nan_ok && std::isnan(y[i]); continue; }
        yf->push_back(y[i]);
        rf->push_back(r[i]);
      }
    };
    {
      std::vector<float> yf;
      std::vector<double> rf;
      bool nan_ok;
      finite_part(ref, &yf, &rf, direct, &nan_ok);
      report(nan_ok && close(yf, rf, &rel, cancel), describe(c, M, "int8: scalar vs direct, rel " + std::to_string(rel)));
    }
    const std::vector<double> ref_d(ref.begin(), ref.end());
    for (rbe::Isa isa : simd) {
      std::vector<float> Y(static_cast<size_t>(M * c.N), -12345.f);
      try {
        rbe::gemm(w, A.data(), M, bias.data(), Y.data(), isa, rbe::serial_for, rbe::kAccuracyInt8);
      } catch (const std::exception& e) {
        report(false, describe(c, M, std::string("int8: ") + rbe::isa_name(isa) + " threw: " + e.what()));
        continue;
      }
      std::vector<float> yf;
      std::vector<double> rf;
      bool nan_ok;
      finite_part(Y, &yf, &rf, ref_d, &nan_ok);
      const bool ok = nan_ok && close(yf, rf, &rel, cancel);
      *worst = std::max(*worst, rel);
      report(ok, describe(c, M, std::string("int8: ") + rbe::isa_name(isa) + " vs scalar, rel " + std::to_string(rel)));
    }
  }
}

void test_gemm(const Case& c, const std::vector<rbe::Isa>& simd, double* worst, double* worst_int8) {
  std::mt19937_64 rng(static_cast<uint64_t>(c.bits * 1000003 + c.block_size * 1009 + c.K * 31 + c.N));
  const RandomWeight rw = random_weight(c, rng);
  rbe::PreparedWeight w;
  try {
    w = rbe::prepare_weight(rw.shape, rw.seeds.data(), static_cast<int64_t>(rw.seeds.size()), rw.codes.data(),
                            static_cast<int64_t>(rw.codes.size()), rw.center_ptr(),
                            static_cast<int64_t>(rw.center.size()), rw.outliers_ptr(c),
                            static_cast<int64_t>(rw.records.size()));
  } catch (const std::exception& e) {
    report(false, describe(c, 0, std::string("prepare_weight threw: ") + e.what()));
    return;
  }
  {
    // The library's decoder against the test's own, bit for bit (compared as bit patterns).
    std::vector<float> D(static_cast<size_t>(c.K * c.N));
    rbe::decode_weight(w, D.data());
    size_t first_bad = D.size();
    for (size_t i = 0; i < D.size() && first_bad == D.size(); ++i) {
      const float want = static_cast<float>(rw.W[i]);
      if (std::memcmp(&D[i], &want, sizeof(float)) != 0) first_bad = i;
    }
    report(first_bad == D.size(), describe(c, 0, "decode_weight bit-exact" +
                                                 (first_bad == D.size() ? std::string()
                                                                        : " (first difference at " +
                                                                              std::to_string(first_bad) + ")")));
  }
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> bias(static_cast<size_t>(c.N));
  for (auto& v : bias) v = normal(rng);
  for (int64_t M : {1, 7, 64}) {
    std::vector<float> A(static_cast<size_t>(M * c.K));
    for (auto& v : A) v = normal(rng);
    std::vector<double> direct(static_cast<size_t>(M * c.N));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < c.N; ++n) {
        double acc = bias[n];
        for (int64_t k = 0; k < c.K; ++k) acc += static_cast<double>(A[m * c.K + k]) * rw.W[k * c.N + n];
        direct[m * c.N + n] = acc;
      }
    std::vector<float> ref(static_cast<size_t>(M * c.N), NAN);
    double rel = 0.0;
    const double cancel = outlier_cancellation(c, rw, A, M);
    rbe::gemm(w, A.data(), M, bias.data(), ref.data(), rbe::Isa::Scalar);
    report(close(ref, direct, &rel), describe(c, M, "scalar vs direct decode, rel " + std::to_string(rel)));
    const std::vector<double> ref_d(ref.begin(), ref.end());
    for (rbe::Isa isa : simd) {
      std::vector<float> Y(static_cast<size_t>(M * c.N), NAN);  // NaN: a column left unwritten fails
      try {
        rbe::gemm(w, A.data(), M, bias.data(), Y.data(), isa);
      } catch (const std::exception& e) {
        report(false, describe(c, M, std::string(rbe::isa_name(isa)) + " threw: " + e.what()));
        continue;
      }
      const bool ok = close(Y, ref_d, &rel, cancel);
      *worst = std::max(*worst, rel);
      report(ok, describe(c, M, std::string(rbe::isa_name(isa)) + " vs scalar, rel " + std::to_string(rel)));
    }
  }
  test_gemm_int8(c, rw, w, bias, simd, rng, worst_int8);
}

// The input rotation (§5.3): the same random weights with their seeds retagged 0xB3 and a rotation; the scalar
// kernel against (A·Q)·W computed from the definition of Q, every SIMD kernel against the scalar one (float
// and int8 paths).
void test_rotation(const Case& c, int64_t R, const std::vector<rbe::Isa>& simd, double* worst) {
  std::mt19937_64 rng(static_cast<uint64_t>(c.K * 7919 + R));
  RandomWeight rw = random_weight(c, rng);
  for (auto& s : rw.seeds) s = rbe_ref::with_tag(s, rbe::kSeedTagRotated);
  const uint64_t seed = rng();
  const std::string what = "rotation=" + std::to_string(R);
  rbe::PreparedWeight w;
  try {
    w = rbe::prepare_weight(rw.shape, rw.seeds.data(), static_cast<int64_t>(rw.seeds.size()), rw.codes.data(),
                            static_cast<int64_t>(rw.codes.size()), rw.center_ptr(),
                            static_cast<int64_t>(rw.center.size()), nullptr, 0, R, seed);
  } catch (const std::exception& e) {
    report(false, describe(c, 0, what + ": prepare_weight threw: " + e.what()));
    return;
  }
  std::normal_distribution<float> normal(0.f, 1.f);
  for (int64_t M : {1, 7, 64}) {
    std::vector<float> A(static_cast<size_t>(M * c.K));
    for (auto& v : A) v = normal(rng);
    const std::vector<double> AQ = rbe_ref::rotate_rows(A.data(), M, c.K, R, seed);
    std::vector<double> direct(static_cast<size_t>(M * c.N), 0.0);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < c.K; ++k)
        for (int64_t n = 0; n < c.N; ++n) direct[m * c.N + n] += AQ[m * c.K + k] * rw.W[k * c.N + n];
    std::vector<float> ref(static_cast<size_t>(M * c.N), NAN), ref8(ref.size(), NAN);
    double rel = 0.0;
    rbe::gemm(w, A.data(), M, nullptr, ref.data(), rbe::Isa::Scalar);
    report(close(ref, direct, &rel), describe(c, M, what + " scalar vs (A·Q)·W, rel " + std::to_string(rel)));
    rbe::gemm(w, A.data(), M, nullptr, ref8.data(), rbe::Isa::Scalar, rbe::serial_for, rbe::kAccuracyInt8);
    const std::vector<double> ref_d(ref.begin(), ref.end()), ref8_d(ref8.begin(), ref8.end());
    for (rbe::Isa isa : simd)
      for (int level : {rbe::kAccuracyFloat, rbe::kAccuracyInt8}) {
        std::vector<float> Y(static_cast<size_t>(M * c.N), NAN);
        rbe::gemm(w, A.data(), M, nullptr, Y.data(), isa, rbe::serial_for, level);
        const bool ok = close(Y, level == rbe::kAccuracyInt8 ? ref8_d : ref_d, &rel);
        *worst = std::max(*worst, rel);
        report(ok, describe(c, M, what + " " + rbe::isa_name(isa) + (level ? " int8" : "") + " vs scalar, rel " +
                                      std::to_string(rel)));
      }
  }
}

void expect_format_error(const std::string& what, const std::function<void()>& fn) {
  try {
    fn();
  } catch (const rbe::FormatError&) {
    report(true, what);
    return;
  } catch (const std::exception& e) {
    report(false, what + ": threw a non-FormatError: " + e.what());
    return;
  }
  report(false, what + ": did not throw");
}

// §5.4 streams written from the spec (not from rice.cc): per value a unary run u of 1 bits ended by a 0, then
// k remainder bits, or 15 ones and 16 raw bits (an escape); zigzag; each entry padded to a whole byte.
class BitWriter {
 public:
  void bit(unsigned b) {
    if (n_ % 8 == 0) bytes_.push_back(0);
    bytes_.back() = static_cast<uint8_t>(bytes_.back() | (b & 1u) << (n_ % 8));
    ++n_;
  }
  void bits(uint32_t v, int n) {
    for (int i = 0; i < n; ++i) bit(v >> i & 1u);
  }
  int64_t size() const { return n_; }
  std::vector<uint8_t> take() {
    n_ = 0;
    return std::move(bytes_);
  }

 private:
  std::vector<uint8_t> bytes_;
  int64_t n_ = 0;
};

struct RiceCase {
  int64_t K, N;
  float scale0;
  std::vector<int64_t> seeds;
  std::vector<uint16_t> lengths;
  std::vector<uint8_t> codes;
  std::vector<float> expected;  // [N][K]: entry t's values
  std::vector<int64_t> bits;    // [N]: bits of entry t's values, before its padding
};

// Random entries with their own step (rho), offset and Rice parameter; the values mostly within the unary
// run's reach, now and then an escape, and with k = 15 also values beyond 16 bits without one.
RiceCase random_rice(std::mt19937_64& rng, int64_t K, int64_t N) {
  RiceCase c{K, N, 1e-3f * static_cast<float>(1 + rng() % 1000), {}, {}, {}, {}, {}};
  BitWriter w;
  for (int64_t t = 0; t < N; ++t) {
    const uint32_t rho = static_cast<uint32_t>(rng() % 4000), k = static_cast<uint32_t>(rng() % 16);
    const int32_t o = static_cast<int32_t>(rng() % 256) - 128;
    c.seeds.push_back(static_cast<int64_t>(make_seed(rho, rbe::kUniformTheta, o, k)));
    const float d = static_cast<float>(static_cast<double>(c.scale0) * std::exp(rho / 512.0));
    const uint32_t reach = 15u << k;  // z below this takes no escape
    for (int64_t i = 0; i < K; ++i) {
      uint32_t z = static_cast<uint32_t>(rng() % reach);
      const bool escape = reach <= 0xFFFF && rng() % 16 == 0;
      if (escape) z = reach + static_cast<uint32_t>(rng() % (0x10000 - reach));
      if (escape) {
        w.bits(0x7FFF, 15);
        w.bits(z, 16);
      } else {
        for (uint32_t u = z >> k; u > 0; --u) w.bit(1);
        w.bit(0);
        w.bits(z, static_cast<int>(k));
      }
      const int32_t q = (z & 1u) ? -static_cast<int32_t>((z + 1) >> 1) : static_cast<int32_t>(z >> 1);
      c.expected.push_back(d * static_cast<float>(q + o));
    }
    c.bits.push_back(w.size());
    std::vector<uint8_t> entry = w.take();
    c.lengths.push_back(static_cast<uint16_t>(entry.size()));
    c.codes.insert(c.codes.end(), entry.begin(), entry.end());
  }
  return c;
}

rbe::RiceTable prepare_rice(const RiceCase& c) {
  return rbe::prepare_rice_table(c.K, c.N, c.scale0, c.seeds.data(), static_cast<int64_t>(c.seeds.size()),
                                 c.codes.data(), static_cast<int64_t>(c.codes.size()), c.lengths.data(),
                                 static_cast<int64_t>(c.lengths.size()));
}

void test_rice() {
  std::mt19937_64 rng(7);
  const int64_t shapes[][2] = {{1, 1}, {7, 5}, {384, 33}, {1000, 9}};
  for (const auto& kn : shapes) {
    const RiceCase c = random_rice(rng, kn[0], kn[1]);
    const rbe::RiceTable t = prepare_rice(c);
    std::vector<float> row(static_cast<size_t>(c.K));
    int64_t wrong = 0;
    for (int64_t e = 0; e < c.N; ++e) {
      rbe::decode_rice_entry(t, e, row.data());
      for (int64_t i = 0; i < c.K; ++i)
        wrong += std::memcmp(&row[i], &c.expected[e * c.K + i], sizeof(float)) != 0;
    }
    report(wrong == 0, "rice K=" + std::to_string(c.K) + " N=" + std::to_string(c.N) + ": " +
                           std::to_string(wrong) + " values differ from the written ones");
  }

  const RiceCase good = random_rice(rng, 64, 6);
  auto broken = [&](const std::string& what, const std::function<void(RiceCase&)>& edit) {
    RiceCase c = good;
    edit(c);
    expect_format_error("rice: " + what, [&] { prepare_rice(c); });
  };
  broken("last entry one byte short", [](RiceCase& c) {
    c.codes.pop_back();
    --c.lengths.back();
  });
  broken("a zero byte after an entry", [](RiceCase& c) {
    c.codes.push_back(0);
    ++c.lengths.back();
  });
  broken("lengths over the codes", [](RiceCase& c) { ++c.lengths[2]; });
  int64_t padded = 0, end = 0;  // an entry whose last byte has padding, and where its stream ends
  for (int64_t e = 0; e < good.N; ++e) {
    end += good.lengths[e];
    if (good.bits[e] % 8 != 0) {
      padded = e;
      break;
    }
  }
  report(good.bits[padded] % 8 != 0, "rice: the malformed cases have an entry with padding");
  broken("a nonzero pad bit", [&](RiceCase& c) { c.codes[end - 1] |= 0x80; });
  broken("theta 3", [](RiceCase& c) { c.seeds[1] = static_cast<int64_t>(make_seed(0, 3, 0, 2)); });
  broken("outliers nonzero", [](RiceCase& c) { c.seeds[0] |= int64_t{1} << 32; });
  broken("seed count short", [](RiceCase& c) { c.seeds.pop_back(); });
  broken("K=0", [](RiceCase& c) { c.K = 0; });
  broken("K above 16384", [](RiceCase& c) { c.K = rbe::kMaxRiceK + 1; });
  broken("scale0=NaN", [](RiceCase& c) { c.scale0 = NAN; });
}

void test_malformed() {
  const Case c{4, 32, 40, 3};
  std::mt19937_64 rng(1);
  const RandomWeight good = random_weight(c, rng);
  // prepare_weight on `good` with one seed, the shape or the code length changed.
  auto prepare = [&](rbe::WeightShape shape, std::vector<int64_t> seeds, int64_t code_bytes) {
    rbe::prepare_weight(shape, seeds.data(), static_cast<int64_t>(seeds.size()), good.codes.data(), code_bytes);
  };
  auto with_seed = [&](uint64_t seed) {
    std::vector<int64_t> s = good.seeds;
    s[1] = static_cast<int64_t>(seed);
    return s;
  };
  const int64_t nbytes = static_cast<int64_t>(good.codes.size());
  const uint64_t ok_seed = make_seed(100, 3, -5, 4);
  prepare(good.shape, with_seed(ok_seed), nbytes);  // the control: must not throw
  report(true, "malformed: control weight accepted");
  const rbe::SeedFields f = rbe::unpack_seed(rbe::pack_seed({0xABCD, 9, 4, 200, 0x3C00, rbe::kSeedTag, -128}));
  report(f.rho == 0xABCD && f.theta == 9 && f.width == 4 && f.outliers == 200 && f.alpha_bits == 0x3C00 &&
             f.tag == rbe::kSeedTag && f.offset == -128,
         "pack_seed is unpack_seed's inverse");

  expect_format_error("bad tag", [&] { prepare(good.shape, with_seed((ok_seed & ~(0xFFull << 56)) | 0xB3ull << 56), nbytes); });
  expect_format_error("format-1 tag", [&] { prepare(good.shape, with_seed((ok_seed & ~(0xFFull << 56)) | 0xB1ull << 56), nbytes); });
  expect_format_error("width != bits", [&] { prepare(good.shape, with_seed(make_seed(100, 3, -5, 3)), nbytes); });
  expect_format_error("outliers nonzero", [&] { prepare(good.shape, with_seed(ok_seed | 1ull << 32), nbytes); });
  expect_format_error("alpha without a center", [&] { prepare(good.shape, with_seed(ok_seed | 1ull << 47), nbytes); });
  expect_format_error("alpha -0 without a center", [&] {
    prepare(good.shape, with_seed(make_seed(100, 3, -5, 4, 0x8000)), nbytes);
  });
  expect_format_error("seed count short", [&] {
    std::vector<int64_t> s = good.seeds;
    s.pop_back();
    prepare(good.shape, s, nbytes);
  });
  expect_format_error("codes one byte short", [&] { prepare(good.shape, good.seeds, nbytes - 1); });
  expect_format_error("codes one byte long", [&] { prepare(good.shape, good.seeds, nbytes + 1); });
  auto shape_with = [&](const std::function<void(rbe::WeightShape&)>& edit) {
    rbe::WeightShape s = good.shape;
    edit(s);
    return s;
  };
  expect_format_error("bits=7", [&] { prepare(shape_with([](rbe::WeightShape& s) { s.bits = 7; }), good.seeds, nbytes); });
  expect_format_error("block_size=48", [&] {
    prepare(shape_with([](rbe::WeightShape& s) { s.block_size = 48; }), good.seeds, nbytes);
  });
  expect_format_error("K=0", [&] { prepare(shape_with([](rbe::WeightShape& s) { s.K = 0; }), good.seeds, nbytes); });
  expect_format_error("N=2^24+1", [&] {
    prepare(shape_with([](rbe::WeightShape& s) { s.N = rbe::kMaxDim + 1; }), good.seeds, nbytes);
  });
  expect_format_error("scale0=0", [&] { prepare(shape_with([](rbe::WeightShape& s) { s.scale0 = 0.f; }), good.seeds, nbytes); });
  expect_format_error("scale0=NaN", [&] { prepare(shape_with([](rbe::WeightShape& s) { s.scale0 = NAN; }), good.seeds, nbytes); });
  expect_format_error("scale overflows float32", [&] {
    prepare(shape_with([](rbe::WeightShape& s) { s.scale0 = 1e30f; }), with_seed(make_seed(0xFFFF, 3, 0, 4)), nbytes);
  });

  // The center vector (§5.1, §6): K finite floats; alpha finite, and nonzero only with a center.
  {
    std::vector<float> center(static_cast<size_t>(good.shape.K), 0.25f);
    auto prepare_centered = [&](std::vector<int64_t> seeds, const std::vector<float>& cv) {
      rbe::prepare_weight(good.shape, seeds.data(), static_cast<int64_t>(seeds.size()), good.codes.data(), nbytes,
                          cv.data(), static_cast<int64_t>(cv.size()));
    };
    for (uint16_t h : {uint16_t{0x8000}, uint16_t{0x0001}, uint16_t{0x7BFF}, uint16_t{0xFBFF}}) {
      prepare_centered(with_seed(make_seed(100, 3, -5, 4, h)), center);  // must not throw
      report(true, "malformed: finite alpha " + std::to_string(h) + " with a center accepted");
    }
    prepare_centered(good.seeds, center);
    report(true, "malformed: center with all alphas 0 accepted");
    for (uint16_t h : {uint16_t{0x7C00}, uint16_t{0xFC00}, uint16_t{0x7E00}, uint16_t{0x7C01}})
      expect_format_error("alpha " + std::to_string(h) + " (Inf/NaN) with a center",
                          [&] { prepare_centered(with_seed(make_seed(100, 3, -5, 4, h)), center); });
    expect_format_error("center of K-1 values", [&] {
      prepare_centered(good.seeds, std::vector<float>(center.begin(), center.end() - 1));
    });
    expect_format_error("center of K+1 values", [&] {
      std::vector<float> longer = center;
      longer.push_back(0.f);
      prepare_centered(good.seeds, longer);
    });
    for (float bad : {NAN, INFINITY, -INFINITY})
      expect_format_error("center holding " + std::to_string(bad), [&] {
        std::vector<float> cv = center;
        cv[cv.size() / 2] = bad;
        prepare_centered(good.seeds, cv);
      });
  }

  // 8-bit codes have one level table: theta must be 4.
  const Case c8{8, 32, 32, 2};
  const RandomWeight w8 = random_weight(c8, rng);
  std::vector<int64_t> s8 = w8.seeds;
  s8[0] = static_cast<int64_t>(make_seed(10, 5, 0, 8));
  expect_format_error("theta != 4 with 8-bit codes", [&] {
    rbe::prepare_weight(w8.shape, s8.data(), static_cast<int64_t>(s8.size()), w8.codes.data(),
                        static_cast<int64_t>(w8.codes.size()));
  });

  expect_format_error("unknown ISA name", [] { rbe::isa_from_name("sse9"); });
  expect_format_error("accuracy_level=5", [&] {
    const rbe::PreparedWeight w = rbe::prepare_weight(good.shape, good.seeds.data(),
                                                      static_cast<int64_t>(good.seeds.size()), good.codes.data(),
                                                      nbytes);
    std::vector<float> A(static_cast<size_t>(good.shape.K), 1.f), Y(static_cast<size_t>(good.shape.N));
    rbe::gemm(w, A.data(), 1, nullptr, Y.data(), rbe::Isa::Scalar, rbe::serial_for, 5);
  });
  for (rbe::Isa isa : {rbe::Isa::Avx2, rbe::Isa::Avx2Vnni, rbe::Isa::Avx512, rbe::Isa::Neon})
    if (!rbe::isa_available(isa)) {
      expect_format_error(std::string("gemm on unavailable ISA ") + rbe::isa_name(isa), [&] {
        const rbe::PreparedWeight w = rbe::prepare_weight(good.shape, good.seeds.data(),
                                                          static_cast<int64_t>(good.seeds.size()), good.codes.data(), nbytes);
        std::vector<float> A(static_cast<size_t>(good.shape.K), 1.f), Y(static_cast<size_t>(good.shape.N));
        rbe::gemm(w, A.data(), 1, nullptr, Y.data(), isa);
      });
    }
}

}  // namespace

int main() {
  std::vector<rbe::Isa> simd;
  std::string isas = "scalar";
  for (rbe::Isa isa : {rbe::Isa::Avx2, rbe::Isa::Avx2Vnni, rbe::Isa::Avx512, rbe::Isa::Neon})
    if (rbe::isa_available(isa)) {
      simd.push_back(isa);
      isas += std::string(" ") + rbe::isa_name(isa);
    }
  std::printf("kernel_test: ISAs: %s\n", isas.c_str());
  if (simd.empty()) std::printf("kernel_test: note: no SIMD kernel on this machine, scalar only\n");

  // K: a whole number of blocks for some sizes, a tail block for others (77, 100, 1000), a single
  // value (1). N: partial 16-column tiles and partial 4-column decode groups (19, 33), whole tiles (48).
  // 768, 1536 and 3072 give the AVX-512 GEMV's four-column paths their 3-, 6- and 12-block columns.
  const int64_t shapes[][2] = {{1, 5}, {77, 19}, {100, 33}, {256, 48}, {1000, 40}, {768, 19}, {1536, 13}, {3072, 9}};
  double worst = 0.0, worst_int8 = 0.0;
  for (int bits : {2, 3, 4, 5, 6, 8})
    for (int block_size : {32, 64, 128, 256})
      for (const auto& kn : shapes) test_gemm(Case{bits, block_size, kn[0], kn[1]}, simd, &worst, &worst_int8);
  // With a center: a single value, a tail block, whole blocks.
  const int64_t center_shapes[][2] = {{1, 5}, {77, 19}, {256, 48}};
  for (int bits : {2, 3, 4, 5, 6, 8})
    for (int block_size : {32, 64, 128, 256})
      for (const auto& kn : center_shapes)
        test_gemm(Case{bits, block_size, kn[0], kn[1], true}, simd, &worst, &worst_int8);
  // With outliers, with and without a center.
  for (int bits : {2, 3, 4, 5, 6, 8})
    for (int block_size : {32, 128, 256})
      for (const auto& kn : center_shapes)
        for (bool center : {false, true})
          test_gemm(Case{bits, block_size, kn[0], kn[1], center, true}, simd, &worst, &worst_int8);
  // With an input rotation: R from 2 to K, with and without a center.
  double worst_rotated = 0.0;
  const int64_t rotation_cases[][2] = {{256, 256}, {256, 2}, {384, 128}, {96, 32}};  // K, R
  for (int bits : {2, 3, 4, 5, 6, 8})
    for (const auto& kr : rotation_cases)
      for (bool center : {false, true})
        test_rotation(Case{bits, bits == 3 ? 128 : 64, kr[0], 19, center}, kr[1], simd, &worst_rotated);
  if (!simd.empty())
    std::printf("kernel_test: worst SIMD rel error vs scalar: float %.3g, int8 %.3g, rotated %.3g\n", worst,
                worst_int8, worst_rotated);
  test_malformed();
  test_rice();

  std::printf("kernel_test: %d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}

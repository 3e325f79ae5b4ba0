// Deterministic driver for the ASan + UBSan build (RBE_SANITIZE=ON, target rbe_sanitize_driver; run by
// tests/test_sanitizers.py). It exercises
//  1. rbe::prepare_weight on valid weights of every bits/block_size and on one invalid input per rule of
//     docs/FORMAT.md §6 (each must throw rbe::FormatError with a message, and read nothing past its buffers),
//     with the verdict cross-checked against the independent rules in fuzz/reference.h;
//  2. rbe::gemm for every bits x block_size x available ISA, M = 1, 3, 17, K below, above and not a multiple
//     of the block size, with and without bias, serial and on a std::thread pool: every result against the
//     double-precision reference of fuzz/reference.h, and every SIMD result against the scalar one;
//  3. NaN/Inf rows in A, M = 0, unknown/unavailable ISAs, decode_weight;
//  4. the center vector (§5.1): prepare_weight's center and alpha rules, gemm with a center on every ISA;
//  5. the input rotation (§5.3): set_rotation's rules, gemm with a rotation on every ISA (float and int8)
//     against the reference product of A·Q, Q built entry by entry from its definition.
// Every buffer is a heap allocation of exactly the size handed over, so any overread is reported.
// Exit status 0 and "sanitize_driver: ok" on stdout when every check passed; 1 otherwise.
#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "rbe/format.h"
#include "rbe/kernels.h"
#include "reference.h"

namespace {

int g_checks = 0, g_failures = 0;

void expect(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::fprintf(stdout, "FAIL: %s\n", what.c_str());
  }
}

// A weight in exactly-sized heap buffers; center null for a node without one.
struct Buffers {
  rbe::WeightShape shape;
  std::unique_ptr<int64_t[]> seeds;
  int64_t n_seeds = 0;
  std::unique_ptr<uint8_t[]> codes;
  int64_t n_codes = 0;
  std::unique_ptr<float[]> center;
  int64_t n_center = 0;
};

// A finite binary16 alpha: mostly |α| in [2^-10, 8), and now and then ±0 or a subnormal.
uint16_t random_alpha(std::mt19937_64& rng) {
  static const uint16_t kSpecial[] = {0x0000, 0x8000, 0x0001, 0x83FF};
  const uint64_t r = rng();
  if (r % 8 == 0) return kSpecial[(r >> 3) % 4];
  const uint16_t exponent = static_cast<uint16_t>(5 + (r >> 8) % 13);
  return static_cast<uint16_t>((r >> 24 & 1) << 15 | exponent << 10 | ((r >> 32) & 0x3FF));
}

Buffers random_weight(int64_t K, int64_t N, int64_t bs, int64_t bits, float scale0, std::mt19937_64& rng,
                      bool with_center = false) {
  Buffers b;
  b.shape.K = K;
  b.shape.N = N;
  b.shape.block_size = bs;
  b.shape.bits = bits;
  b.shape.scale0 = scale0;
  const int64_t nb = (K + bs - 1) / bs;
  b.n_seeds = N * nb;
  b.n_codes = N * nb * bs * bits / 8;
  b.seeds.reset(new int64_t[static_cast<size_t>(b.n_seeds)]);
  b.codes.reset(new uint8_t[static_cast<size_t>(b.n_codes)]);
  for (int64_t i = 0; i < b.n_seeds; ++i) {
    const uint64_t r = rng();
    b.seeds[i] = rbe_ref::make_seed(static_cast<uint32_t>(r % 1500), rbe_ref::uniform_bits(bits) ? 4 : (r >> 16) % 16,
                                    static_cast<int>((r >> 24) % 256) - 128, static_cast<uint32_t>(bits));
  }
  for (int64_t i = 0; i < b.n_codes; ++i) b.codes[i] = static_cast<uint8_t>(rng());
  if (with_center) {
    b.n_center = K;
    b.center.reset(new float[static_cast<size_t>(K)]);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    for (int64_t k = 0; k < K; ++k) b.center[k] = u(rng);
    for (int64_t i = 0; i < b.n_seeds; ++i) b.seeds[i] = rbe_ref::with_alpha(b.seeds[i], random_alpha(rng));
  }
  return b;
}

std::string describe(const rbe::WeightShape& s) {
  return "K=" + std::to_string(s.K) + " N=" + std::to_string(s.N) + " block_size=" + std::to_string(s.block_size) +
         " bits=" + std::to_string(s.bits);
}

// prepare_weight on the given buffers; checks the verdict against reference.h.
bool try_prepare(const rbe::WeightShape& s, const int64_t* seeds, int64_t n_seeds, const uint8_t* codes,
                 int64_t n_codes, const std::string& what, rbe::PreparedWeight* out = nullptr,
                 const float* center = nullptr, int64_t n_center = 0) {
  const std::string expected = rbe_ref::invalid_reason(s.K, s.N, s.block_size, s.bits, s.scale0, seeds, n_seeds,
                                                       codes, n_codes, center, n_center);
  try {
    rbe::PreparedWeight w = rbe::prepare_weight(s, seeds, n_seeds, codes, n_codes, center, n_center);
    expect(expected.empty(), what + ": accepted although the spec rejects it (" + expected + ")");
    if (out) *out = std::move(w);
    return true;
  } catch (const rbe::FormatError& e) {
    expect(!expected.empty(), what + ": rejected a valid weight: " + e.what());
    expect(std::strlen(e.what()) > 0, what + ": FormatError without a message");
    return false;
  } catch (const std::exception& e) {
    expect(false, what + ": threw something other than FormatError: " + e.what());
    return false;
  }
}

void check_prepare(std::mt19937_64& rng) {
  const int64_t kBits[] = {2, 3, 4, 5, 6, 8}, kBlocks[] = {32, 64, 128, 256};
  for (int64_t bits : kBits)
    for (int64_t bs : kBlocks) {
      Buffers b = random_weight(2 * bs + 7, 19, bs, bits, 1e-3f, rng);
      const std::string tag = describe(b.shape);
      expect(try_prepare(b.shape, b.seeds.get(), b.n_seeds, b.codes.get(), b.n_codes, tag + " valid"),
             tag + ": valid weight rejected");

      // Counts that do not match (buffers sized truthfully to what is claimed).
      for (int64_t delta : {-1, 1}) {
        const int64_t n = b.n_seeds + delta;
        std::unique_ptr<int64_t[]> s(new int64_t[static_cast<size_t>(n)]);
        std::copy(b.seeds.get(), b.seeds.get() + std::min(n, b.n_seeds), s.get());
        if (delta > 0) s[n - 1] = b.seeds[0];
        expect(!try_prepare(b.shape, s.get(), n, b.codes.get(), b.n_codes, tag + " seeds " + std::to_string(delta)),
               tag + ": wrong seed count accepted");
        const int64_t m = b.n_codes + delta;
        std::unique_ptr<uint8_t[]> c(new uint8_t[static_cast<size_t>(m)]());
        expect(!try_prepare(b.shape, b.seeds.get(), b.n_seeds, c.get(), m, tag + " codes " + std::to_string(delta)),
               tag + ": wrong code length accepted");
      }
      expect(!try_prepare(b.shape, nullptr, b.n_seeds, b.codes.get(), b.n_codes, tag + " null seeds"),
             tag + ": null seeds accepted");
      expect(!try_prepare(b.shape, b.seeds.get(), b.n_seeds, nullptr, b.n_codes, tag + " null codes"),
             tag + ": null codes accepted");
      expect(!try_prepare(b.shape, b.seeds.get(), 0, b.codes.get(), b.n_codes, tag + " no seeds"),
             tag + ": zero seeds accepted");

      // One broken field per seed position class (first, middle, last).
      const uint64_t kFieldBits[] = {uint64_t{1} << 56, uint64_t{1} << 60, uint64_t{0x3} << 28, uint64_t{1} << 32,
                                     uint64_t{1} << 39, uint64_t{1} << 40, uint64_t{1} << 55};
      for (int64_t where : {int64_t{0}, b.n_seeds / 2, b.n_seeds - 1})
        for (uint64_t flip : kFieldBits) {
          const int64_t saved = b.seeds[where];
          b.seeds[where] = static_cast<int64_t>(static_cast<uint64_t>(saved) ^ flip);
          expect(!try_prepare(b.shape, b.seeds.get(), b.n_seeds, b.codes.get(), b.n_codes, tag + " broken seed"),
                 tag + ": broken seed accepted");
          b.seeds[where] = saved;
        }
      if (rbe_ref::uniform_bits(bits)) {  // theta must be 4
        const int64_t saved = b.seeds[1];
        b.seeds[1] = static_cast<int64_t>(static_cast<uint64_t>(saved) ^ (uint64_t{1} << 16));
        expect(!try_prepare(b.shape, b.seeds.get(), b.n_seeds, b.codes.get(), b.n_codes, tag + " theta"),
               tag + ": theta != 4 accepted with 5-, 6- or 8-bit codes");
        b.seeds[1] = saved;
      } else {  // every theta is fine for 2/3/4 bits
        const int64_t saved = b.seeds[1];
        b.seeds[1] = static_cast<int64_t>(static_cast<uint64_t>(saved) | (uint64_t{0xF} << 16));
        expect(try_prepare(b.shape, b.seeds.get(), b.n_seeds, b.codes.get(), b.n_codes, tag + " theta 15"),
               tag + ": theta 15 rejected");
        b.seeds[1] = saved;
      }
      // Scale overflow: rho = 65535 with a large scale0.
      {
        rbe::WeightShape big = b.shape;
        big.scale0 = 1e30f;
        const int64_t saved = b.seeds[2];
        b.seeds[2] = static_cast<int64_t>(static_cast<uint64_t>(saved) | 0xFFFFu);
        expect(!try_prepare(big, b.seeds.get(), b.n_seeds, b.codes.get(), b.n_codes, tag + " overflow"),
               tag + ": overflowing scale accepted");
        b.seeds[2] = saved;
      }
    }

  // Attribute ranges (the buffers are tiny: the shape must be rejected before anything is sized from it).
  struct Bad { int64_t K, N, bs, bits; float s0; };
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  const Bad bad[] = {
      {0, 8, 64, 4, 1e-3f}, {-1, 8, 64, 4, 1e-3f}, {(int64_t{1} << 24) + 1, 8, 64, 4, 1e-3f},
      {std::numeric_limits<int64_t>::max(), 8, 64, 4, 1e-3f}, {64, 0, 64, 4, 1e-3f},
      {64, std::numeric_limits<int64_t>::min(), 64, 4, 1e-3f}, {64, (int64_t{1} << 24) + 1, 64, 4, 1e-3f},
      {64, 8, 0, 4, 1e-3f}, {64, 8, 16, 4, 1e-3f}, {64, 8, 48, 4, 1e-3f}, {64, 8, 512, 4, 1e-3f},
      {64, 8, -64, 4, 1e-3f}, {64, 8, 64, 0, 1e-3f}, {64, 8, 64, 1, 1e-3f}, {64, 8, 64, 5, 1e-3f},
      {64, 8, 64, 16, 1e-3f}, {64, 8, 64, -4, 1e-3f}, {64, 8, 64, 4, 0.f}, {64, 8, 64, 4, -0.f},
      {64, 8, 64, 4, -1e-3f}, {64, 8, 64, 4, nan}, {64, 8, 64, 4, inf}, {64, 8, 64, 4, -inf},
  };
  std::unique_ptr<int64_t[]> one_seed(new int64_t[1]{rbe_ref::make_seed(0, 4, 0, 4)});
  std::unique_ptr<uint8_t[]> few_codes(new uint8_t[16]());
  for (const Bad& c : bad) {
    rbe::WeightShape s;
    s.K = c.K; s.N = c.N; s.block_size = c.bs; s.bits = c.bits; s.scale0 = c.s0;
    expect(!try_prepare(s, one_seed.get(), 1, few_codes.get(), 16, "bad shape " + describe(s)),
           "bad shape accepted: " + describe(s));
  }
  // Extremes that are valid: the largest dimension with tiny buffers (rejected by count, not by range),
  // the smallest positive scale0.
  {
    rbe::WeightShape s;
    s.K = int64_t{1} << 24; s.N = int64_t{1} << 24; s.block_size = 32; s.bits = 8; s.scale0 = 1e-3f;
    expect(!try_prepare(s, one_seed.get(), 1, few_codes.get(), 16, "2^24 x 2^24 with short buffers"),
           "2^24 x 2^24 weight with 1 seed accepted");
    Buffers tiny = random_weight(33, 3, 32, 4, std::numeric_limits<float>::denorm_min(), rng);
    expect(try_prepare(tiny.shape, tiny.seeds.get(), tiny.n_seeds, tiny.codes.get(), tiny.n_codes, "denorm scale0"),
           "denormal scale0 rejected");
  }
}

rbe::ParallelFor thread_pool(int threads) {
  return [threads](size_t n, const std::function<void(size_t)>& task) {
    std::atomic<size_t> next{0};
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&] {
        for (size_t i; (i = next.fetch_add(1)) < n;) task(i);
      });
    for (auto& th : pool) th.join();
  };
}

std::vector<rbe::Isa> available_isas() {
  std::vector<rbe::Isa> out;
  for (rbe::Isa isa : {rbe::Isa::Scalar, rbe::Isa::Avx2, rbe::Isa::Neon})
    if (rbe::isa_available(isa)) out.push_back(isa);
  return out;
}

// The ISAs with their own int8 code (accuracy_level 4): Avx2Vnni and Avx512 differ from Avx2 only there.
std::vector<rbe::Isa> int8_isas() {
  std::vector<rbe::Isa> out;
  for (rbe::Isa isa : {rbe::Isa::Avx2, rbe::Isa::Avx2Vnni, rbe::Isa::Avx512, rbe::Isa::Neon})
    if (rbe::isa_available(isa)) out.push_back(isa);
  return out;
}

// Runs every available ISA on one weight and A and checks each against the reference and the scalar kernel.
void check_gemm_case(const Buffers& b, int64_t M, bool with_bias, bool threaded, std::mt19937_64& rng,
                     int nan_row = -1, int inf_row = -1) {
  const rbe::WeightShape& s = b.shape;
  const std::string tag = describe(s) + " M=" + std::to_string(M) + (with_bias ? " bias" : "") +
                          (threaded ? " threads" : "") + (b.center ? " center" : "");
  rbe::PreparedWeight w;
  if (!try_prepare(s, b.seeds.get(), b.n_seeds, b.codes.get(), b.n_codes, tag, &w, b.center.get(), b.n_center)) {
    expect(false, tag + ": weight rejected");
    return;
  }
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::unique_ptr<float[]> A(new float[static_cast<size_t>(std::max<int64_t>(M * s.K, 1))]);
  for (int64_t i = 0; i < M * s.K; ++i) A[i] = u(rng);
  if (nan_row >= 0) A[nan_row * s.K + s.K / 2] = std::numeric_limits<float>::quiet_NaN();
  if (inf_row >= 0) A[inf_row * s.K] = -std::numeric_limits<float>::infinity();
  std::unique_ptr<float[]> bias;
  if (with_bias) {
    bias.reset(new float[static_cast<size_t>(s.N)]);
    for (int64_t n = 0; n < s.N; ++n) bias[n] = u(rng);
  }
  const rbe_ref::Product ref = rbe_ref::reference_gemm(s.K, s.N, s.block_size, static_cast<int>(s.bits), s.scale0,
                                                       b.seeds.get(), b.codes.get(), A.get(), M, bias.get(),
                                                       b.center.get());
  const size_t ny = static_cast<size_t>(M * s.N);
  std::unique_ptr<float[]> scalar(new float[ny]);
  rbe::gemm(w, A.get(), M, bias.get(), scalar.get(), rbe::Isa::Scalar);
  for (rbe::Isa isa : available_isas()) {
    std::unique_ptr<float[]> y(new float[ny]);
    std::fill(y.get(), y.get() + ny, -12345.f);
    if (threaded) rbe::gemm(w, A.get(), M, bias.get(), y.get(), isa, thread_pool(3));
    else rbe::gemm(w, A.get(), M, bias.get(), y.get(), isa);
    const std::string name = tag + " " + rbe::isa_name(isa);
    const std::string bad = rbe_ref::check_against(ref, y.get(), M, s.N, s.K, w.shape.blocks_per_column(),
                                                   name.c_str());
    expect(bad.empty(), bad);
    // SIMD against scalar: both within the reference tolerance (checked above), so within twice it of each
    // other; here the same outputs must be finite (an Inf in A may give Inf in one kernel and NaN in the
    // other, a legitimate difference of summation order), and a row holding NaN (only) must be all NaN.
    for (size_t i = 0; i < ny; ++i)
      if (std::isfinite(y[i]) != std::isfinite(scalar[i])) {
        expect(false, name + ": finiteness differs from scalar at " + std::to_string(i));
        break;
      }
    if (nan_row >= 0 && nan_row != inf_row)
      for (int64_t n = 0; n < s.N; ++n)
        if (!std::isnan(y[nan_row * s.N + n]) || !std::isnan(scalar[nan_row * s.N + n])) {
          expect(false, name + ": row with NaN gives a non-NaN output at column " + std::to_string(n));
          break;
        }
  }
  // The int8 path under the sanitizers too, each ISA against the scalar int8 kernel: the same integers Σ L·q
  // (kernels.h), so only the rounding of the offset term and the order of the float sum may differ.
  std::unique_ptr<float[]> scalar8(new float[ny]);
  rbe::gemm(w, A.get(), M, bias.get(), scalar8.get(), rbe::Isa::Scalar, rbe::serial_for, rbe::kAccuracyInt8);
  double scale = 1.0;
  for (size_t i = 0; i < ny; ++i)
    if (std::isfinite(scalar8[i])) scale = std::max(scale, static_cast<double>(std::fabs(scalar8[i])));
  for (rbe::Isa isa : int8_isas()) {
    std::unique_ptr<float[]> y(new float[ny]);
    std::fill(y.get(), y.get() + ny, -12345.f);
    if (threaded) rbe::gemm(w, A.get(), M, bias.get(), y.get(), isa, thread_pool(3), rbe::kAccuracyInt8);
    else rbe::gemm(w, A.get(), M, bias.get(), y.get(), isa, rbe::serial_for, rbe::kAccuracyInt8);
    const std::string name = tag + " int8 " + rbe::isa_name(isa);
    for (size_t i = 0; i < ny; ++i) {
      const bool finite = std::isfinite(y[i]);
      if (finite != static_cast<bool>(std::isfinite(scalar8[i])) ||
          (finite && std::fabs(static_cast<double>(y[i]) - scalar8[i]) > 1e-5 * scale)) {
        expect(false, name + ": differs from the scalar int8 kernel at " + std::to_string(i) + " (" +
                          std::to_string(y[i]) + " vs " + std::to_string(scalar8[i]) + ")");
        break;
      }
    }
  }
}

void check_gemm(std::mt19937_64& rng) {
  const int64_t kBits[] = {2, 3, 4, 5, 6, 8}, kBlocks[] = {32, 64, 128, 256};
  for (int64_t bits : kBits)
    for (int64_t bs : kBlocks)
      for (int64_t K : {int64_t{5}, bs + 1, 2 * bs + 7}) {
        const Buffers b = random_weight(K, 37, bs, bits, 2e-3f, rng);
        for (int64_t M : {1, 3, 17})
          for (bool with_bias : {false, true}) check_gemm_case(b, M, with_bias, /*threaded=*/false, rng);
      }
  // Thread pool, exact multiples, a wider weight, NaN/Inf rows.
  for (int64_t bits : kBits) {
    const Buffers b = random_weight(3 * 64, 130, 64, bits, 1e-2f, rng);
    for (int64_t M : {1, 3, 17}) check_gemm_case(b, M, true, /*threaded=*/true, rng);
    check_gemm_case(b, 3, false, false, rng, /*nan_row=*/1, /*inf_row=*/2);
    check_gemm_case(b, 17, true, true, rng, /*nan_row=*/0, /*inf_row=*/16);
    check_gemm_case(b, 1, false, false, rng, /*nan_row=*/0);
  }
  {
    const Buffers b = random_weight(4096 + 3, 300, 128, 4, 1e-3f, rng);
    check_gemm_case(b, 2, true, true, rng);
  }
  // With a center (§5.1): the dispatcher's center term on every ISA, tail blocks and NaN/Inf rows included.
  for (int64_t bits : kBits)
    for (int64_t bs : kBlocks)
      for (int64_t K : {int64_t{5}, bs + 1, 2 * bs}) {
        const Buffers b = random_weight(K, 37, bs, bits, 2e-3f, rng, /*with_center=*/true);
        for (int64_t M : {1, 3, 17}) check_gemm_case(b, M, M == 3, /*threaded=*/M == 17, rng);
        check_gemm_case(b, 3, false, false, rng, /*nan_row=*/1, /*inf_row=*/2);
      }
}

// prepare_weight's center rules (§6): alpha finite, nonzero only with a center; the center K finite floats.
void check_center_rules(std::mt19937_64& rng) {
  for (int64_t bits : {int64_t{3}, int64_t{8}}) {
    Buffers b = random_weight(100, 7, 32, bits, 1e-3f, rng, /*with_center=*/true);
    Buffers plain = random_weight(100, 7, 32, bits, 1e-3f, rng);
    const std::string tag = describe(b.shape) + " center";
    expect(try_prepare(b.shape, b.seeds.get(), b.n_seeds, b.codes.get(), b.n_codes, tag, nullptr, b.center.get(),
                       b.n_center), tag + ": valid centered weight rejected");
    // A center with every alpha zero is valid (a node may carry a center no block uses).
    expect(try_prepare(plain.shape, plain.seeds.get(), plain.n_seeds, plain.codes.get(), plain.n_codes,
                       tag + " zero alphas", nullptr, b.center.get(), b.n_center),
           tag + ": center with all-zero alphas rejected");
    for (int64_t delta : {-1, 1}) {  // center of the wrong length, its buffer sized to what is claimed
      const int64_t n = b.n_center + delta;
      std::unique_ptr<float[]> c(new float[static_cast<size_t>(n)]());
      expect(!try_prepare(b.shape, b.seeds.get(), b.n_seeds, b.codes.get(), b.n_codes, tag + " length", nullptr,
                          c.get(), n), tag + ": center of length K" + (delta < 0 ? "-1" : "+1") + " accepted");
    }
    for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                      -std::numeric_limits<float>::infinity()})
      for (int64_t where : {int64_t{0}, b.n_center - 1}) {
        const float saved = b.center[where];
        b.center[where] = bad;
        expect(!try_prepare(b.shape, b.seeds.get(), b.n_seeds, b.codes.get(), b.n_codes, tag + " non-finite",
                            nullptr, b.center.get(), b.n_center), tag + ": non-finite center accepted");
        b.center[where] = saved;
      }
    // alpha patterns: ±Inf and NaNs are rejected with or without a center; any other nonzero pattern (-0
    // included) only without one.
    const uint16_t kNonFinite[] = {0x7C00, 0xFC00, 0x7C01, 0x7E00, 0xFFFF};
    const uint16_t kNonzero[] = {0x8000, 0x0001, 0x3C00, 0x7BFF, 0xFBFF};
    for (int64_t where : {int64_t{0}, plain.n_seeds - 1}) {
      const int64_t saved = plain.seeds[where];
      for (uint16_t h : kNonFinite) {
        plain.seeds[where] = rbe_ref::with_alpha(saved, h);
        expect(!try_prepare(plain.shape, plain.seeds.get(), plain.n_seeds, plain.codes.get(), plain.n_codes,
                            tag + " alpha non-finite", nullptr, b.center.get(), b.n_center),
               tag + ": non-finite alpha accepted");
      }
      for (uint16_t h : kNonzero) {
        plain.seeds[where] = rbe_ref::with_alpha(saved, h);
        expect(!try_prepare(plain.shape, plain.seeds.get(), plain.n_seeds, plain.codes.get(), plain.n_codes,
                            tag + " alpha without center"), tag + ": nonzero alpha without a center accepted");
        expect(try_prepare(plain.shape, plain.seeds.get(), plain.n_seeds, plain.codes.get(), plain.n_codes,
                           tag + " alpha with center", nullptr, b.center.get(), b.n_center),
               tag + ": finite alpha with a center rejected");
      }
      plain.seeds[where] = saved;
    }
  }
}

void check_misc(std::mt19937_64& rng) {
  const Buffers b = random_weight(70, 9, 32, 3, 1e-3f, rng);
  rbe::PreparedWeight w;
  expect(try_prepare(b.shape, b.seeds.get(), b.n_seeds, b.codes.get(), b.n_codes, "misc", &w), "misc weight");
  // M = 0 leaves Y untouched.
  float sentinel = 7.f;
  rbe::gemm(w, nullptr, 0, nullptr, &sentinel, rbe::Isa::Scalar);
  expect(sentinel == 7.f, "M=0 wrote to Y");
  // Unknown or unavailable ISAs are FormatErrors.
  bool threw = false;
  try { rbe::isa_from_name("sse9"); } catch (const rbe::FormatError&) { threw = true; }
  expect(threw, "isa_from_name accepted an unknown ISA");
  for (rbe::Isa isa : {rbe::Isa::Avx2, rbe::Isa::Neon})
    if (!rbe::isa_available(isa)) {
      threw = false;
      std::unique_ptr<float[]> A(new float[70]()), Y(new float[9]);
      try { rbe::gemm(w, A.get(), 1, nullptr, Y.get(), isa); } catch (const rbe::FormatError&) { threw = true; }
      expect(threw, std::string("gemm ran on unavailable ISA ") + rbe::isa_name(isa));
    }
  // decode_weight against the reference decoder: A = identity rows give W back.
  std::unique_ptr<float[]> W(new float[70 * 9]);
  rbe::decode_weight(w, W.get());
  std::unique_ptr<float[]> eye(new float[70 * 70]());
  for (int k = 0; k < 70; ++k) eye[k * 70 + k] = 1.f;
  const rbe_ref::Product ref = rbe_ref::reference_gemm(70, 9, 32, 3, 1e-3f, b.seeds.get(), b.codes.get(), eye.get(),
                                                       70, nullptr);
  for (int i = 0; i < 70 * 9; ++i)
    if (W[i] != static_cast<float>(ref.y[i])) {
      expect(false, "decode_weight differs from the reference at " + std::to_string(i));
      break;
    }
}

// The weight of b prepared with a rotation (its seeds retagged 0xB3, §5.3); false if prepare_weight refused it.
bool prepare_rotated(Buffers& b, int64_t R, uint64_t seed, rbe::PreparedWeight* out, const std::string& what) {
  for (int64_t i = 0; i < b.n_seeds; ++i) b.seeds[i] = rbe_ref::with_tag(b.seeds[i], rbe::kSeedTagRotated);
  try {
    *out = rbe::prepare_weight(b.shape, b.seeds.get(), b.n_seeds, b.codes.get(), b.n_codes, b.center.get(),
                               b.n_center, nullptr, 0, R, seed);
    return true;
  } catch (const rbe::FormatError& e) {
    expect(std::strlen(e.what()) > 0, what + ": FormatError without a message");
    return false;
  }
}

void check_rotation(std::mt19937_64& rng) {
  // splitmix64 from state 0 starts 0xE220A8397B1DCDAF: the signs of k = 0..63 are its bits.
  {
    Buffers b = random_weight(64, 3, 32, 4, 1e-3f, rng);
    rbe::PreparedWeight w;
    expect(prepare_rotated(b, 64, 0, &w, "rotation signs"), "rotated weight rejected");
    for (int k = 0; k < 64; ++k)
      if ((w.rotation_signs[k] < 0) != static_cast<bool>((0xE220A8397B1DCDAFull >> k) & 1)) {
        expect(false, "rotation sign " + std::to_string(k) + " is not splitmix64's bit");
        break;
      }
  }
  struct Case { int64_t K, R, bs, bits; };
  for (const Case& c : {Case{6, 2, 32, 3}, Case{96, 32, 64, 4}, Case{256, 256, 128, 2}, Case{384, 128, 256, 3},
                        Case{200, 8, 32, 8}, Case{4096, 4096, 256, 4}}) {
    Buffers b = random_weight(c.K, 21, c.bs, c.bits, 2e-3f, rng, /*with_center=*/c.bits == 3);
    const std::string tag = describe(b.shape) + " rotation=" + std::to_string(c.R);
    rbe::PreparedWeight w;
    const uint64_t seed = rng();
    if (!prepare_rotated(b, c.R, seed, &w, tag)) {
      expect(false, tag + ": weight rejected");
      continue;
    }
    for (int64_t M : {1, 5, 17}) {
      std::uniform_real_distribution<float> u(-1.f, 1.f);
      std::unique_ptr<float[]> A(new float[static_cast<size_t>(M * c.K)]);
      for (int64_t i = 0; i < M * c.K; ++i) A[i] = u(rng);
      const std::vector<double> AQd = rbe_ref::rotate_rows(A.get(), M, c.K, c.R, seed);
      const std::vector<float> AQ(AQd.begin(), AQd.end());
      const rbe_ref::Product ref = rbe_ref::reference_gemm(c.K, 21, c.bs, static_cast<int>(c.bits), 2e-3f,
                                                           b.seeds.get(), b.codes.get(), AQ.data(), M, nullptr,
                                                           b.center.get());
      const size_t ny = static_cast<size_t>(M * 21);
      for (rbe::Isa isa : available_isas()) {
        std::unique_ptr<float[]> y(new float[ny]);
        rbe::gemm(w, A.get(), M, nullptr, y.get(), isa, thread_pool(3));
        const std::string name = tag + " M=" + std::to_string(M) + " " + rbe::isa_name(isa);
        const std::string bad = rbe_ref::check_against(ref, y.get(), M, 21, c.K, w.shape.blocks_per_column(),
                                                       name.c_str());
        expect(bad.empty(), bad);
      }
      // int8: every ISA against the scalar int8 kernel, as in check_gemm_case.
      std::unique_ptr<float[]> scalar8(new float[ny]);
      rbe::gemm(w, A.get(), M, nullptr, scalar8.get(), rbe::Isa::Scalar, rbe::serial_for, rbe::kAccuracyInt8);
      double scale = 1.0;
      for (size_t i = 0; i < ny; ++i) scale = std::max(scale, static_cast<double>(std::fabs(scalar8[i])));
      for (rbe::Isa isa : int8_isas()) {
        std::unique_ptr<float[]> y(new float[ny]);
        rbe::gemm(w, A.get(), M, nullptr, y.get(), isa, thread_pool(3), rbe::kAccuracyInt8);
        for (size_t i = 0; i < ny; ++i)
          if (!(std::fabs(static_cast<double>(y[i]) - scalar8[i]) <= 1e-5 * scale)) {
            expect(false, tag + " int8 " + rbe::isa_name(isa) + ": differs from the scalar int8 kernel");
            break;
          }
      }
    }
  }
  // §6: a rotation other than 0 or a power of two in [2, 4096] dividing K; 0xB3 seeds without a rotation;
  // 0xB2 seeds with one.
  Buffers b = random_weight(384, 5, 64, 4, 1e-3f, rng);
  rbe::PreparedWeight w;
  expect(try_prepare(b.shape, b.seeds.get(), b.n_seeds, b.codes.get(), b.n_codes, "rotation 0xB2"), "0xB2 seeds");
  bool threw = false;
  try {
    rbe::prepare_weight(b.shape, b.seeds.get(), b.n_seeds, b.codes.get(), b.n_codes, nullptr, 0, nullptr, 0, 128, 1);
  } catch (const rbe::FormatError&) { threw = true; }
  expect(threw, "0xB2 seeds accepted with a rotation");
  for (int64_t bad : {int64_t{1}, int64_t{3}, int64_t{256}, int64_t{8192}, int64_t{-2}, int64_t{48}})
    expect(!prepare_rotated(b, bad, 1, &w, "rotation " + std::to_string(bad)),
           "rotation " + std::to_string(bad) + " accepted for K=384");
  expect(prepare_rotated(b, 128, 1, &w, "rotation 128"), "rotation 128 rejected for K=384");
  threw = false;
  try {
    rbe::prepare_weight(b.shape, b.seeds.get(), b.n_seeds, b.codes.get(), b.n_codes);
  } catch (const rbe::FormatError&) { threw = true; }
  expect(threw, "0xB3 seeds accepted without a rotation");
}

}  // namespace

int main() {
  std::mt19937_64 rng(20240611);
  std::printf("sanitize_driver: best ISA %s\n", rbe::isa_name(rbe::best_isa()));
  check_prepare(rng);
  check_gemm(rng);
  check_center_rules(rng);
  check_misc(rng);
  check_rotation(rng);
  std::printf("sanitize_driver: %d checks, %d failures\n", g_checks, g_failures);
  if (g_failures == 0) std::printf("sanitize_driver: ok\n");
  return g_failures == 0 ? 0 : 1;
}

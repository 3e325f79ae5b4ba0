// libFuzzer target for the kernel-creation path: rbe::prepare_weight (the validator every RBEFusedGemm node
// goes through in CreateKernelV2) and, when it accepts a weight, rbe::gemm with the scalar reference and
// the best ISA of this CPU on a small A.
//
// Oracles (any violation aborts, which libFuzzer reports as a crash):
//  - prepare_weight must accept exactly the weights docs/FORMAT.md §6 allows (reference.h re-derives the
//    rules independently) and reject the others with rbe::FormatError (a normal outcome), nothing else;
//  - scalar and best-ISA gemm must both match a double-precision reference computed from the raw seeds,
//    codes and outlier records (reference.h) within a rounding bound, and each other; rows of A with NaN/Inf
//    must give non-finite outputs; with the INT8 option, again at accuracy_level 4 (§2.1); with ROTATE the
//    reference multiplies A·Q (§5.3, from its definition in double), and at accuracy_level 4, where the int8
//    rounding of A·Q would turn the float A·Q's last bits into whole steps of q, the best ISA is held to the
//    scalar int8 kernel instead (both quantize the same, bit-identical A·Q);
//  - ASan/UBSan (built with -fsanitize=fuzzer,address,undefined): every buffer below is a heap allocation
//    of exactly the size claimed, so any read past the codes, seeds, outliers, A or bias is reported.
//
// Input layout (little-endian; reading past the end yields zeros, so every input is meaningful):
//   u8  flags          bit0 RAW_SHAPE, bit1 RAW_SCALE, bit2 BIAS, bit3 SEED_DELTA, bit4 CODE_DELTA,
//                      bit5 NAN_IN_A, bit6 INF_IN_A, bit7 OUTLIERS
//   RAW_SHAPE:  i64 K, i64 N, i64 block_size, i64 bits
//   otherwise:  u16 K' (K = 1 + K' % 2048), u8 N' (N = 1 + N' % 96), u8 block selector (32/64/128/256),
//               u8 bits selector (2/3/4/8)
//   RAW_SCALE:  f32 scale0 (any bit pattern); otherwise u8 e, scale0 = 2^-(e % 40)
//   u8  M (M % 21 rows of A, so 0..20: covers the 1-row, 4/6-row micro-kernel and tail paths)
//   u8  A exponent (A values uniform in [-1, 1] · 2^(e % 24 - 12))
//   i8  seed count delta (with SEED_DELTA), i16 code length delta (with CODE_DELTA)
//   u16 S: how many seeds are taken from the input
//   u8  PRNG seed (fills whatever the input does not give: seeds past S, codes past the input's end, A)
//   OUTLIERS:   u8 options: bit0 DERIVE, bit1 RANDOM_COUNTS, bit2 INT8, bit3 ROTATE; u16 L;
//               with DERIVE also u16 P, i8 length delta;
//               with ROTATE also u8 r (rotation R = 2^(1 + r % 12) for r < 240, else r - 248: 0, odd,
//               negative and too short ones break §6) and u64 rotation_seed
//   S x u64 seed masks: seed i = mask_i XOR (a valid seed of width `bits`, rho = theta = offset = 0 but
//                       theta = 4), so all-zero masks are valid and flipped bits probe each seed field
//   OUTLIERS:   L bytes. Without DERIVE they are the §5.2 record buffer itself (zeros past the input's end).
//               With DERIVE the buffer is built from the seeds' outlier counts (valid records wherever a
//               count allows: distinct ascending rows inside the block and K, finite binary16 values),
//               resized by the length delta, and the L bytes are XORed onto it from byte P (mod its length)
//               on, wrapping: valid record sets, and one or a few broken bytes away from them.
//               RANDOM_COUNTS gives the PRNG's seeds (past S) outlier counts (mostly 0-3, sometimes every
//               row of the block); INT8 also runs both gemms at accuracy_level 4. Without OUTLIERS the node
//               has no outliers input (null); with it, it has one, of exactly the buffer's length (maybe 0).
//               ROTATE retags every seed 0xB3 (§5.3), so all-zero masks stay valid.
//   rest: code bytes (then PRNG bytes up to the claimed length)
// custom_ops/fuzz/make_corpus.py writes seed inputs in this layout.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "rbe/format.h"
#include "rbe/kernels.h"
#include "input_reader.h"
#include "reference.h"

namespace {

enum Flags : uint8_t {
  kRawShape = 1, kRawScale = 2, kBias = 4, kSeedDelta = 8, kCodeDelta = 16, kNanInA = 32, kInfInA = 64,
  kOutliers = 128
};
enum OutlierOptions : uint8_t { kDerive = 1, kRandomCounts = 2, kInt8 = 4, kRotate = 8 };
constexpr int64_t kMaxSeeds = int64_t{1} << 16;       // caps what one input may make us allocate
constexpr int64_t kMaxCodeBytes = int64_t{1} << 21;
// A (M x K floats) and the kernels' padded and quantized copies of it grow with K, which a raw shape can set to
// millions within kMaxCodeBytes (2-bit, one column): 20 such rows took 2.1 GB and 51 s for one input under
// ASan. Fewer rows when K is that long.
constexpr int64_t kMaxAValues = int64_t{1} << 20;
// Derived records: up to 255 per seed over 2^16 seeds would be 50 MB; a mismatched length is rejected all
// the same, so a truthful shorter buffer loses nothing.
constexpr int64_t kMaxOutlierBytes = int64_t{1} << 22;

struct SplitMix {
  uint64_t s;
  uint64_t next() { return rbe_ref::splitmix64_next(s); }
  float uniform() { return static_cast<float>(static_cast<double>(next() >> 11) * 0x1.0p-53 * 2.0 - 1.0); }
};

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "fuzz_prepare: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

// RBE_FUZZ_VERBOSE=1: one line per input saying whether prepare_weight accepted it (to check the corpus).
bool verbose() {
  static const bool v = [] {
    const char* e = std::getenv("RBE_FUZZ_VERBOSE");
    return e != nullptr && *e != '\0' && *e != '0';
  }();
  return v;
}

// Runs the tasks in reverse order: results must not depend on the order the pool picks tasks in.
void reverse_for(size_t n, const std::function<void(size_t)>& task) {
  for (size_t i = n; i-- > 0;) task(i);
}

// A PRNG seed's outlier count under RANDOM_COUNTS: mostly a few, as encoders produce, now and then every row
// of the block (no weight of it left to its codes, which the SIMD kernels still multiply before the corrections
// take them out again). rows: the block's rows below K, 0 when the shape is not known to be valid (then
// anything goes).
uint8_t random_count(uint64_t r, int64_t rows) {
  const uint32_t c = static_cast<uint32_t>(r >> 40) & 0xFFu;
  const int64_t want = c < 96 ? 0 : c < 248 ? 1 + c % 3 : 255;
  return static_cast<uint8_t>(rows > 0 ? std::min(want, rows) : want);
}

// A finite binary16 pattern: an all-ones exponent (Inf/NaN) loses its top bit.
uint16_t finite_half(uint64_t r) {
  const uint16_t h = static_cast<uint16_t>(r);
  return (h & 0x7C00u) == 0x7C00u ? static_cast<uint16_t>(h ^ 0x4000u) : h;
}

// DERIVE's records for the seeds' counts (§5.2 order: block after block). A count the block can hold gets
// distinct rows below min(block_size, K - b·block_size), drawn in ascending order (selection sampling); a
// larger one gets rows 0, 1, ..., so the weight breaks the rules only where its seed already does. nb: blocks
// per column, 0 when the shape is not known to be valid.
std::vector<uint8_t> derive_records(const int64_t* seeds, int64_t n_seeds, int64_t K, int64_t bs, int64_t nb,
                                    SplitMix& rng) {
  std::vector<uint8_t> out;
  for (int64_t i = 0; i < n_seeds; ++i) {
    const int64_t count = rbe_ref::seed_fields(static_cast<uint64_t>(seeds[i])).outliers;
    if (static_cast<int64_t>(out.size()) + 3 * count > kMaxOutlierBytes) break;
    const int64_t rows = nb > 0 ? std::min(bs, K - (i % nb) * bs) : 0;
    auto emit = [&](int64_t row) {
      const uint16_t h = finite_half(rng.next());
      out.insert(out.end(), {static_cast<uint8_t>(row), static_cast<uint8_t>(h & 0xFF), static_cast<uint8_t>(h >> 8)});
    };
    if (count <= rows) {
      int64_t need = count;
      for (int64_t row = 0; row < rows && need > 0; ++row)
        if (static_cast<int64_t>(rng.next() % static_cast<uint64_t>(rows - row)) < need) {
          emit(row);
          --need;
        }
    } else {
      for (int64_t row = 0; row < count; ++row) emit(row);
    }
  }
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Reader in{data, size};
  const uint8_t flags = in.take<uint8_t>();
  int64_t K, N, bs, bits;
  if (flags & kRawShape) {
    K = in.take<int64_t>();
    N = in.take<int64_t>();
    bs = in.take<int64_t>();
    bits = in.take<int64_t>();
  } else {
    // 5 and 6 after 8, so that the seed corpus's width bytes keep their meaning.
    static const int64_t kBlocks[] = {32, 64, 128, 256}, kBits[] = {2, 3, 4, 8, 5, 6};
    K = 1 + in.take<uint16_t>() % 2048;
    N = 1 + in.take<uint8_t>() % 96;
    bs = kBlocks[in.take<uint8_t>() % 4];
    bits = kBits[in.take<uint8_t>() % 6];
  }
  float scale0;
  if (flags & kRawScale) scale0 = in.take<float>();
  else scale0 = std::ldexp(1.0f, -static_cast<int>(in.take<uint8_t>() % 40));
  const int64_t M_in = in.take<uint8_t>() % 21;
  const int a_exp = in.take<uint8_t>() % 24 - 12;
  const int8_t seed_delta = in.take<int8_t>();
  const int16_t code_delta = in.take<int16_t>();
  const uint16_t seeds_from_input = in.take<uint16_t>();
  SplitMix rng{in.take<uint8_t>() * 0x100000001B3ull + 1};
  uint8_t out_options = 0;
  uint16_t out_len = 0, xor_at = 0;
  int8_t out_delta = 0;
  if (flags & kOutliers) {
    out_options = in.take<uint8_t>();
    out_len = in.take<uint16_t>();
    if (out_options & kDerive) {
      xor_at = in.take<uint16_t>();
      out_delta = in.take<int8_t>();
    }
  }
  int64_t rotation = 0;
  uint64_t rotation_seed = 0;
  if (out_options & kRotate) {
    const uint8_t r = in.take<uint8_t>();
    rotation = r < 240 ? int64_t{1} << (1 + r % 12) : int64_t{r} - 248;
    rotation_seed = in.take<uint64_t>();
  }

  // Sizes: the true ones when the shape is valid and small enough, otherwise a small (truthful) buffer
  // that cannot match, so prepare_weight must reject it before reading past it.
  int64_t n_seeds = 1, n_code_bytes = 16, shape_nb = 0;
  if (rbe_ref::shape_ok(K, N, bs, bits, scale0)) {
    const int64_t nb = (K + bs - 1) / bs;
    shape_nb = nb;
    if (N * nb <= kMaxSeeds && N * nb * bs * bits / 8 <= kMaxCodeBytes) {
      n_seeds = N * nb;
      n_code_bytes = N * nb * bs * bits / 8;
    }
  }
  if (flags & kSeedDelta) n_seeds = std::max<int64_t>(0, n_seeds + seed_delta);
  if (flags & kCodeDelta) n_code_bytes = std::max<int64_t>(0, n_code_bytes + code_delta);

  // Exactly-sized heap buffers (nullptr when empty), so ASan sees any overread.
  std::unique_ptr<int64_t[]> seeds(n_seeds ? new int64_t[static_cast<size_t>(n_seeds)] : nullptr);
  const uint32_t width = static_cast<uint32_t>(bits) & 0xFu;
  for (int64_t i = 0; i < n_seeds; ++i) {
    if (i < seeds_from_input) {
      seeds[i] = static_cast<int64_t>(static_cast<uint64_t>(in.take<uint64_t>()) ^
                                      static_cast<uint64_t>(rbe_ref::make_seed(0, 4, 0, width)));
    } else {
      const uint64_t r = rng.next();
      seeds[i] = rbe_ref::make_seed(static_cast<uint32_t>(r % 1536), rbe_ref::uniform_bits(bits) ? 4 : (r >> 16) % 16,
                                    static_cast<int>((r >> 24) % 256) - 128, width);
      if (out_options & kRandomCounts)
        seeds[i] = rbe_ref::with_outliers(seeds[i],
                                          random_count(r, shape_nb ? std::min(bs, K - (i % shape_nb) * bs) : 0));
    }
  }
  if (out_options & kRotate)
    for (int64_t i = 0; i < n_seeds; ++i) seeds[i] = rbe_ref::with_tag(seeds[i], (seeds[i] >> 56 & 0xFF) ^ 0x01);
  // The outliers input: null without OUTLIERS, else exactly-sized (new uint8_t[0] for an empty one, which is
  // not null: an empty outliers input is still given, and ASan reports any read of it).
  std::unique_ptr<uint8_t[]> outliers;
  int64_t n_outlier_bytes = 0;
  if (flags & kOutliers) {
    std::vector<uint8_t> rec;
    if (out_options & kDerive) {
      rec = derive_records(seeds.get(), n_seeds, K, bs, shape_nb, rng);
      const int64_t len = std::max<int64_t>(0, static_cast<int64_t>(rec.size()) + out_delta);
      rec.resize(static_cast<size_t>(std::min(len, kMaxOutlierBytes)), 0);
      for (size_t i = 0; i < out_len; ++i) {
        const uint8_t x = in.take<uint8_t>();
        if (!rec.empty()) rec[(xor_at + i) % rec.size()] ^= x;
      }
    } else {
      rec.resize(out_len);
      for (uint8_t& b : rec) b = in.take<uint8_t>();
    }
    n_outlier_bytes = static_cast<int64_t>(rec.size());
    outliers.reset(new uint8_t[rec.size()]);
    if (!rec.empty()) std::memcpy(outliers.get(), rec.data(), rec.size());
  }
  std::unique_ptr<uint8_t[]> codes(n_code_bytes ? new uint8_t[static_cast<size_t>(n_code_bytes)] : nullptr);
  {
    const size_t from_input = std::min<size_t>(in.left(), static_cast<size_t>(n_code_bytes));
    if (from_input) std::memcpy(codes.get(), in.here(), from_input);
    for (size_t i = from_input; i < static_cast<size_t>(n_code_bytes); ++i)
      codes[i] = static_cast<uint8_t>(rng.next());
  }

  const std::string expected = rbe_ref::invalid_reason(K, N, bs, bits, scale0, seeds.get(), n_seeds, codes.get(),
                                                       n_code_bytes, nullptr, 0, outliers.get(), n_outlier_bytes,
                                                       rotation);
  rbe::WeightShape shape;
  shape.K = K;
  shape.N = N;
  shape.block_size = bs;
  shape.bits = bits;
  shape.scale0 = scale0;
  rbe::PreparedWeight w;
  try {
    w = rbe::prepare_weight(shape, seeds.get(), n_seeds, codes.get(), n_code_bytes, nullptr, 0, outliers.get(),
                            n_outlier_bytes, rotation, rotation_seed);
  } catch (const rbe::FormatError& e) {
    if (expected.empty())
      die(std::string("prepare_weight rejected a valid weight: ") + e.what() + " (K=" + std::to_string(K) +
          " N=" + std::to_string(N) + " block_size=" + std::to_string(bs) + " bits=" + std::to_string(bits) + ")");
    if (std::strlen(e.what()) == 0) die("FormatError without a message");
    if (verbose()) std::fprintf(stderr, "RBE_FUZZ rejected: %s\n", e.what());
    return 0;  // a normal outcome
  } catch (const std::exception& e) {
    die(std::string("prepare_weight threw something other than FormatError: ") + e.what());
  }
  if (!expected.empty()) die("prepare_weight accepted a weight the spec rejects: " + expected);
  if (verbose())
    std::fprintf(stderr, "RBE_FUZZ accepted: K=%lld N=%lld block_size=%lld bits=%lld M=%lld outliers=%lld "
                 "rotation=%lld%s\n", static_cast<long long>(K), static_cast<long long>(N),
                 static_cast<long long>(bs), static_cast<long long>(bits), static_cast<long long>(M_in),
                 static_cast<long long>(n_outlier_bytes / rbe_ref::kOutlierRecordBytes),
                 static_cast<long long>(rotation), (out_options & kInt8) ? " int8" : "");

  // Accepted: run the kernels on a small A and compare with the reference.
  if (M_in == 0) return 0;
  const int64_t M = std::min<int64_t>(M_in, std::max<int64_t>(1, kMaxAValues / K));
  const int64_t nb = w.shape.blocks_per_column();
  std::unique_ptr<float[]> A(new float[static_cast<size_t>(M * K)]);
  for (int64_t i = 0; i < M * K; ++i) A[i] = std::ldexp(rng.uniform(), a_exp);
  if (flags & (kNanInA | kInfInA)) {
    const uint64_t r = rng.next();
    A[(r >> 8) % static_cast<uint64_t>(M * K)] = (flags & kNanInA) ? NAN : ((r & 1) ? INFINITY : -INFINITY);
  }
  std::unique_ptr<float[]> bias;
  if (flags & kBias) {
    bias.reset(new float[static_cast<size_t>(N)]);
    for (int64_t n = 0; n < N; ++n) bias[n] = rng.uniform();
  }
  // What the codes multiply: A, or A·Q from §5.3's definition (in double, rounded once to float).
  std::vector<float> AQ;
  if (rotation != 0) {
    const std::vector<double> AQd = rbe_ref::rotate_rows(A.get(), M, K, rotation, rotation_seed);
    AQ.assign(AQd.begin(), AQd.end());
  }
  const float* A_ref = rotation != 0 ? AQ.data() : A.get();
  std::vector<int> levels{rbe::kAccuracyFloat};
  if (out_options & kInt8) levels.push_back(rbe::kAccuracyInt8);
  for (const int level : levels) {
    const rbe_ref::Product ref = rbe_ref::reference_gemm(K, N, bs, static_cast<int>(bits), scale0, seeds.get(),
                                                         codes.get(), A_ref, M, bias.get(), nullptr,
                                                         outliers.get(), level);
    const std::string at = " at accuracy_level " + std::to_string(level);
    const bool against_scalar = rotation != 0 && level == rbe::kAccuracyInt8;
    std::unique_ptr<float[]> y_scalar(new float[static_cast<size_t>(M * N)]);
    rbe::gemm(w, A.get(), M, bias.get(), y_scalar.get(), rbe::Isa::Scalar, rbe::serial_for, level);
    std::string bad;
    if (!against_scalar) bad = rbe_ref::check_against(ref, y_scalar.get(), M, N, K, nb, ("scalar" + at).c_str());
    if (!bad.empty()) die(bad);

    const rbe::Isa best = rbe::best_isa();
    if (best != rbe::Isa::Scalar) {
      std::unique_ptr<float[]> y_best(new float[static_cast<size_t>(M * N)]);
      rbe::gemm(w, A.get(), M, bias.get(), y_best.get(), best, reverse_for, level);
      const std::string name = rbe::isa_name(best) + at;
      bad = rbe_ref::check_against(ref, y_best.get(), M, N, K, nb, name.c_str(),
                                   against_scalar ? y_scalar.get() : nullptr);
      if (!bad.empty()) die(bad);
    }
  }
  return 0;
}

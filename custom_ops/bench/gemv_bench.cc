// GEMV kernels (M = 1) timed in C++ alone, without Python, ORT or a model around them: the tool for kernel
// work, where a change of a few percent drowns in tools/bench.py's run-to-run spread.
//
//   rbe_gemv_bench [isa] [BITS/BLOCK ...]   isa: auto (default), avx2, avxvnni, avx512, neon, scalar;
//                                           the settings (e.g. 5/128) to time, all of them by default
//
// For each setting (bits/block, accuracy level) it prints
//   hot:  ns per 256 weights of one weight read over and over (it stays in cache): compute alone, for columns
//         of 3072, 768 and 256 weights (3072 x 768, 768 x 3072, 256 x 1024): a column's fixed cost (its
//         scale, offset and horizontal sum) shows in how the three differ;
//   cold: ms per decode step of GPT-2 small's 49 matrices, after reading 512 MB of other memory (so the step
//         streams its weights from DRAM), with 1 and 2 threads, and the GB/s of codes + seeds that is;
//   read: the same bytes' codes only, summed with the same column split by a loop that does nothing else
//         (32-byte loads, four accumulators, the GEMVs' prefetch): what memory gives a plain stream. (A scalar
//         8-byte loop, used before, was itself the bottleneck at ~12 GB/s per thread and flattered the GEMVs.)
// Medians of 15 repetitions. Seeds and codes are random and valid (speed does not depend on the values).
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "rbe/format.h"
#include "rbe/kernels.h"
#include "rbe/spin_pool.h"

namespace {

struct Matrix {
  std::vector<int64_t> seeds;
  std::vector<uint8_t> codes;
  rbe::PreparedWeight w;
};

int64_t seed(std::mt19937_64& g, int bits) {
  const uint32_t rho = g() % 2000, theta = rbe::has_uniform_table(bits) ? rbe::kUniformTheta : g() % 16;
  const int32_t offset = static_cast<int32_t>(g() % 16) - 8;
  return static_cast<int64_t>(rbe::pack_seed({rho, theta, static_cast<uint32_t>(bits), 0, 0, rbe::kSeedTag, offset}));
}

Matrix make_matrix(std::mt19937_64& g, int64_t K, int64_t N, int bits, int block) {
  Matrix m;
  rbe::WeightShape s;
  s.K = K, s.N = N, s.block_size = block, s.bits = bits, s.scale0 = 1e-3f;
  m.seeds.resize(static_cast<size_t>(N * s.blocks_per_column()));
  for (auto& v : m.seeds) v = seed(g, bits);
  m.codes.resize(static_cast<size_t>(s.code_bytes()));
  for (size_t i = 0; i < m.codes.size(); i += 8) {
    const uint64_t r = g();
    std::memcpy(m.codes.data() + i, &r, std::min<size_t>(8, m.codes.size() - i));
  }
  m.w = rbe::prepare_weight(s, m.seeds.data(), static_cast<int64_t>(m.seeds.size()), m.codes.data(),
                            static_cast<int64_t>(m.codes.size()));
  return m;
}

// Σ of n bytes as 64-bit lanes (n a multiple of 128): the read-only ceiling the GEMVs are compared against.
#if defined(__x86_64__)
__attribute__((target("avx2"), noinline)) uint64_t sum_bytes(const uint8_t* p, size_t n) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t k = 0; k < n; k += 128) {
    _mm_prefetch(reinterpret_cast<const char*>(p + k) + 4096, _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(p + k) + 4096 + 64, _MM_HINT_T1);
    a0 = _mm256_add_epi64(a0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + k)));
    a1 = _mm256_add_epi64(a1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + k + 32)));
    a2 = _mm256_add_epi64(a2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + k + 64)));
    a3 = _mm256_add_epi64(a3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + k + 96)));
  }
  const __m256i s = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
  return static_cast<uint64_t>(_mm256_extract_epi64(s, 0) + _mm256_extract_epi64(s, 1) + _mm256_extract_epi64(s, 2) +
                               _mm256_extract_epi64(s, 3));
}
#else
__attribute__((noinline)) uint64_t sum_bytes(const uint8_t* p, size_t n) {
  uint64_t s[4] = {};
  for (size_t k = 0; k < n; k += 32) {
    __builtin_prefetch(p + k + 4096, 0, 2);
    for (int j = 0; j < 4; ++j) {
      uint64_t v;
      std::memcpy(&v, p + k + 8 * j, 8);
      s[j] += v;
    }
  }
  return s[0] + s[1] + s[2] + s[3];
}
#endif

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Reads a buffer larger than any cache, untimed, before each cold repetition.
void evict_caches() {
  static std::vector<uint64_t> junk(size_t{64} << 20, 1);  // 512 MB
  static std::atomic<uint64_t> sink{0};
  uint64_t s = 0;
  for (uint64_t v : junk) s += v;
  sink += s;
}

template <class F>
double time_median(F&& f, bool cold, int reps = 15) {
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    if (cold) evict_caches();
    const auto t0 = std::chrono::steady_clock::now();
    f(r);
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return median(t);
}

}  // namespace

int main(int argc, char** argv) {
  const rbe::Isa isa = rbe::isa_from_name(argc > 1 ? argv[1] : "auto");
  std::printf("isa %s\n", rbe::isa_name(isa));
  std::vector<std::pair<int64_t, int64_t>> shapes;  // GPT-2 small, graph order
  for (int layer = 0; layer < 12; ++layer)
    for (auto kn : {std::pair<int64_t, int64_t>{768, 2304}, {768, 768}, {768, 3072}, {3072, 768}}) shapes.push_back(kn);
  shapes.push_back({768, 50257});
  std::mt19937_64 g(1);
  std::vector<float> a(3072), y(50257);
  for (auto& x : a) x = std::normal_distribution<float>()(g);
  // Two threads from the pool the Python binding uses: workers kept spinning between calls, as ORT's pool
  // does between the nodes of a step.
  const rbe::ParallelFor two = rbe::spin_pool_for(2);
  const struct { int bits, block, level; } configs[] = {{4, 64, 0}, {4, 64, 4}, {4, 128, 4}, {3, 256, 4},
                                                         {3, 128, 4}, {2, 128, 4}, {5, 128, 4}, {6, 128, 4}};
  std::vector<std::string> wanted(argv + std::min(argc, 2), argv + argc);
  for (const auto& c : configs) {
    const std::string name = std::to_string(c.bits) + "/" + std::to_string(c.block);
    if (!wanted.empty() && std::find(wanted.begin(), wanted.end(), name) == wanted.end()) continue;
    std::string hot_ns;
    for (auto [K, N] : {std::pair<int64_t, int64_t>{3072, 768}, {768, 3072}, {256, 1024}}) {
      const Matrix hot = make_matrix(g, K, N, c.bits, c.block);
      const int calls = static_cast<int>(100 * 768 * 3072 / (K * N));
      const double t_hot = time_median([&](int) {
        for (int i = 0; i < calls; ++i)
          rbe::gemm(hot.w, a.data(), 1, nullptr, y.data(), isa, rbe::serial_for, c.level);
      }, false) / calls;
      char line[64];
      std::snprintf(line, sizeof line, "  %.2f (%ldx%ld)", t_hot * 1e9 / (K * N / 256.0), static_cast<long>(K),
                    static_cast<long>(N));
      hot_ns += line;
    }
    std::vector<Matrix> step;
    double bytes = 0, code_bytes = 0;  // per step: codes + seeds (what the kernel streams), codes alone
    for (auto [K, N] : shapes) {
      step.push_back(make_matrix(g, K, N, c.bits, c.block));
      bytes += static_cast<double>(step.back().codes.size() + 8 * step.back().seeds.size());
      code_bytes += static_cast<double>(step.back().codes.size());
    }
    std::printf("%d-bit/%d %s  hot ns/256 weights%s\n", c.bits, c.block, c.level == 4 ? "int8 " : "float",
                hot_ns.c_str());
    for (int threads : {1, 2}) {
      const rbe::ParallelFor& pf = threads == 1 ? rbe::ParallelFor(rbe::serial_for) : two;
      const double t_cold = time_median([&](int) {
        for (const Matrix& m : step) rbe::gemm(m.w, a.data(), 1, nullptr, y.data(), isa, pf, c.level);
      }, true);
      std::atomic<uint64_t> sink{0};
      const double t_read = time_median([&](int) {
        for (const Matrix& m : step) {
          const size_t n = m.codes.size() / 128 * 128, part = n / 4 / 128 * 128;  // four tasks, as the GEMV's split
          pf(4, [&](size_t t) {
            const size_t begin = t * part, end = t == 3 ? n : (t + 1) * part;
            const uint64_t s = sum_bytes(m.codes.data() + begin, end - begin);
            sink += s;
          });
        }
      }, true);
      std::printf("  %d thread%s  cold %.3f ms/step = %.1f GB/s   read of the codes %.3f ms = %.1f GB/s\n",
                  threads, threads == 1 ? " " : "s", t_cold * 1e3, bytes / t_cold / 1e9, t_read * 1e3,
                  code_bytes / t_read / 1e9);
    }
  }
}

// One entry point over the per-ISA kernels (as MLAS does): pads the activations to whole blocks, computes
// block sums once (float path) or quantizes them to int8 once (accuracy_level 4), splits the output columns
// into tasks and runs them through the caller's thread pool. Also home of the int8 path's scalar reference
// and of the center term (FORMAT.md §5.1) and the outliers (§5.2), which no per-ISA kernel knows about.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <emmintrin.h>
#define RBE_X86_SSE2 1
#elif defined(__aarch64__)
#include <arm_neon.h>
#define RBE_ARM_NEON 1
#endif

#include "kernels_internal.h"
#include "rbe/kernels.h"

namespace rbe {

namespace {

// AVX-VNNI (VEX-encoded VPDPBUSD): CPUID leaf 7, sub-leaf 1, EAX bit 4. The OS-saved YMM state it needs is
// the one AVX2 needs, which __builtin_cpu_supports("avx2") has already checked. Asked once: CPUID traps to
// the hypervisor in a VM (tens of microseconds), and gemm() checks availability on every call.
bool cpu_has_avx_vnni() {
#if defined(RBE_X86_SSE2)
  static const bool has = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) return false;
    return ((eax >> 4) & 1u) != 0;
  }();
  return has;
#else
  return false;
#endif
}

}  // namespace

bool isa_available(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return true;
    case Isa::Avx2:
#if defined(RBE_HAVE_AVX2)
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
      return false;
#endif
    case Isa::Avx2Vnni:
#if defined(RBE_HAVE_AVX2)
      return isa_available(Isa::Avx2) && cpu_has_avx_vnni();
#else
      return false;
#endif
    case Isa::Avx512:
#if defined(RBE_HAVE_AVX2)
      // __builtin_cpu_supports also checks that the OS saves the AVX-512 state (XCR0).
      return isa_available(Isa::Avx2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
             __builtin_cpu_supports("avx512vbmi");
#else
      return false;
#endif
    case Isa::Neon:
#if defined(RBE_HAVE_NEON)
      return true;
#else
      return false;
#endif
  }
  return false;
}

Isa best_isa() {
  if (isa_available(Isa::Avx512)) return Isa::Avx512;
  if (isa_available(Isa::Avx2Vnni)) return Isa::Avx2Vnni;
  if (isa_available(Isa::Avx2)) return Isa::Avx2;
  if (isa_available(Isa::Neon)) return Isa::Neon;
  return Isa::Scalar;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx2: return "avx2";
    case Isa::Avx2Vnni: return "avxvnni";
    case Isa::Avx512: return "avx512";
    case Isa::Neon: return "neon";
    default: return "scalar";
  }
}

Isa isa_from_name(const std::string& name) {
  if (name == "auto") return best_isa();
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx2Vnni, Isa::Avx512, Isa::Neon})
    if (name == isa_name(isa)) return isa;
  throw FormatError("unknown kernel ISA '" + name + "' (scalar, avx2, avxvnni, avx512, neon or auto)");
}

void serial_for(size_t n, const std::function<void(size_t)>& task) {
  for (size_t i = 0; i < n; ++i) task(i);
}

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t m) { return ceil_div(a, m) * m; }

// The pool's size is not visible through ORT's kernel context; the machine's is the most it can usefully be.
int64_t hardware_threads() {
  static const int64_t n = std::max<int64_t>(1, static_cast<int64_t>(std::thread::hardware_concurrency()));
  return n;
}

}  // namespace

#if !defined(RBE_HAVE_AVX2)
void gemm_columns_avx2(const GemmProblem&, int64_t, int64_t) { throw FormatError("AVX2 kernel not built"); }
void gemm_columns_avx2vnni(const GemmProblem&, int64_t, int64_t) { throw FormatError("AVX2 kernel not built"); }
void gemm_columns_avx512(const GemmProblem&, int64_t, int64_t) { throw FormatError("AVX2 kernel not built"); }
#endif
#if !defined(RBE_HAVE_NEON)
void gemm_columns_neon(const GemmProblem&, int64_t, int64_t) { throw FormatError("NEON kernel not built"); }
#endif

bool is_supported_accuracy_level(int64_t level) { return level >= 0 && level <= 4; }

// FORMAT.md §2.1. The same code quantizes for every ISA, so the int8 path's integers are identical across
// kernels. Rounding is half to even (the FPU's default mode: cvtps2dq / fcvtns / nearbyint); the product
// a·(127/amax) is one float32 multiplication (no fused multiply-add can change it).
void quantize_row_int8(const float* a, int64_t K, int64_t bs, int8_t* q, float* scale, int32_t* qsum) {
  const int64_t nb = (K + bs - 1) / bs;
  alignas(16) float tail[256];
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t k0 = b * bs, valid = std::min(bs, K - k0);
    const float* x = a + k0;
    if (valid < bs) {
      std::fill(std::copy(x, x + valid, tail), tail + bs, 0.f);
      x = tail;
    }
    int8_t* qb = q + k0;
    float amax = 0.f;
    bool finite = true;
#if defined(RBE_X86_SSE2)
    {
      const __m128 abs_mask = _mm_castsi128_ps(_mm_set1_epi32(0x7FFFFFFF));
      const __m128 big = _mm_set1_ps(std::numeric_limits<float>::max());
      __m128 m = _mm_setzero_ps(), bad = _mm_setzero_ps();
      for (int64_t i = 0; i < bs; i += 4) {
        const __m128 v = _mm_and_ps(_mm_loadu_ps(x + i), abs_mask);
        bad = _mm_or_ps(bad, _mm_cmpnle_ps(v, big));  // NaN or ±Inf
        m = _mm_max_ps(m, v);
      }
      m = _mm_max_ps(m, _mm_movehl_ps(m, m));
      m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
      amax = _mm_cvtss_f32(m);
      finite = _mm_movemask_ps(bad) == 0;
    }
#else
    for (int64_t i = 0; i < bs; ++i) {
      const float v = std::fabs(x[i]);
      if (!(v <= std::numeric_limits<float>::max())) finite = false;
      else amax = std::max(amax, v);
    }
#endif
    if (!finite || amax == 0.f) {
      // A non-finite activation makes the block's scale NaN (every output of the row becomes NaN); an
      // all-zero block contributes nothing.
      scale[b] = finite ? 0.f : std::numeric_limits<float>::quiet_NaN();
      qsum[b] = 0;
      std::fill(qb, qb + bs, int8_t{0});
      continue;
    }
    const float inv = 127.f / amax;
    scale[b] = amax / 127.f;
    int32_t sum = 0;
#if defined(RBE_X86_SSE2)
    {
      const __m128 vinv = _mm_set1_ps(inv);
      __m128i s = _mm_setzero_si128();
      for (int64_t i = 0; i < bs; i += 16) {
        const __m128i i0 = _mm_cvtps_epi32(_mm_mul_ps(_mm_loadu_ps(x + i), vinv));
        const __m128i i1 = _mm_cvtps_epi32(_mm_mul_ps(_mm_loadu_ps(x + i + 4), vinv));
        const __m128i i2 = _mm_cvtps_epi32(_mm_mul_ps(_mm_loadu_ps(x + i + 8), vinv));
        const __m128i i3 = _mm_cvtps_epi32(_mm_mul_ps(_mm_loadu_ps(x + i + 12), vinv));
        s = _mm_add_epi32(s, _mm_add_epi32(_mm_add_epi32(i0, i1), _mm_add_epi32(i2, i3)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + i),
                         _mm_packs_epi16(_mm_packs_epi32(i0, i1), _mm_packs_epi32(i2, i3)));
      }
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
      sum = _mm_cvtsi128_si32(s);
    }
#elif defined(RBE_ARM_NEON)
    {
      int32x4_t s = vdupq_n_s32(0);
      for (int64_t i = 0; i < bs; i += 8) {
        const int32x4_t i0 = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(x + i), inv));
        const int32x4_t i1 = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(x + i + 4), inv));
        s = vaddq_s32(s, vaddq_s32(i0, i1));
        vst1_s8(qb + i, vqmovn_s16(vcombine_s16(vqmovn_s32(i0), vqmovn_s32(i1))));
      }
      sum = vaddvq_s32(s);
    }
#else
    for (int64_t i = 0; i < bs; ++i) {
      const float r = std::nearbyint(x[i] * inv);
      const int v = static_cast<int>(std::min(127.f, std::max(-127.f, r)));
      qb[i] = static_cast<int8_t>(v);
      sum += v;
    }
#endif
    qsum[b] = sum;
  }
}

// Scalar reference of the int8 path: the block dot products in integers, exactly as FORMAT.md §2.1 writes
// them, summed in double.
void gemm_columns_scalar_int8(const GemmProblem& p, int64_t n0, int64_t n1) {
  const PreparedWeight& w = *p.w;
  const WeightShape& s = w.shape;
  const int64_t nb = s.blocks_per_column(), Kp = s.padded_K(), bs = s.block_size;
  std::vector<uint8_t> codes(static_cast<size_t>(bs));
  std::vector<double> acc(static_cast<size_t>(p.M));
  for (int64_t n = n0; n < n1; ++n) {
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t blk = n * nb + b;
      unpack_block_codes(w.codes + blk * s.block_bytes(), static_cast<int>(s.bits), static_cast<int>(bs),
                         codes.data());
      const std::vector<int>& L = w.levels[w.theta[blk]];
      const int32_t o = static_cast<int32_t>(w.offset[blk]);
      for (int64_t m = 0; m < p.M; ++m) {
        const int8_t* q = p.a_q + m * Kp + b * bs;
        int32_t dot = 0;
        for (int64_t i = 0; i < bs; ++i) dot += L[codes[i]] * q[i];
        dot += o * p.a_qsum[m * nb + b];
        acc[m] += static_cast<double>(w.scale[blk]) * static_cast<double>(p.a_scale[m * nb + b]) * dot;
      }
    }
    for (int64_t m = 0; m < p.M; ++m)
      p.Y[m * s.N + n] = static_cast<float>(acc[m] + (p.bias ? p.bias[n] : 0.f));
  }
}

namespace {

// Y[:, n0:n1] += the outliers' corrections (§5.2), column by column: each outlier costs one gather from A
// per row, so a fraction f of outliers adds about f·K·N scattered multiply-adds to a product (opt-in, for
// heavy-tailed weights; the fast decode settings have none).
void add_outliers(const PreparedWeight& w, const float* A, int64_t M, float* Y, int64_t n0, int64_t n1) {
  const WeightShape& s = w.shape;
  const int64_t nb = s.blocks_per_column();
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t j = w.outlier_first[n * nb]; j < w.outlier_first[(n + 1) * nb]; ++j) {
      const int64_t k = w.outlier_k[j];
      const float delta = w.outlier_delta[j];
      for (int64_t m = 0; m < M; ++m) Y[m * s.N + n] += A[m * s.K + k] * delta;
    }
}

}  // namespace

void gemm(const PreparedWeight& w, const float* A, int64_t M, const float* bias, float* Y, Isa isa,
          const ParallelFor& parallel_for, int accuracy_level) {
  if (!isa_available(isa)) throw FormatError(std::string("kernel ISA ") + isa_name(isa) + " not available here");
  if (!is_supported_accuracy_level(accuracy_level))
    throw FormatError("accuracy_level=" + std::to_string(accuracy_level) + " unsupported (0 to 4)");
  if (M <= 0) return;
  const WeightShape& s = w.shape;
  const int64_t nb = s.blocks_per_column(), Kp = s.padded_K();
  // Per-row work on the activations (rotation, quantization, center sums): on the pool once a product has
  // 64 Ki values of it, in the calling thread below that, where the hand-off would cost more than the work.
  auto for_rows = [&](int64_t values, const std::function<void(size_t)>& task) {
    if (values >= (int64_t{1} << 16)) parallel_for(static_cast<size_t>(M), task);
    else serial_for(static_cast<size_t>(M), task);
  };
  // §5.3: the product is (A·Q)·W; everything below (int8 quantization, center, outliers) sees A·Q.
  std::vector<float> a_rot;
  if (w.rotation) {
    a_rot.resize(static_cast<size_t>(M * s.K));
    void (*rotate_one)(const PreparedWeight&, const float*, float*) = rotate_row;
#if defined(RBE_HAVE_AVX2)
    if (isa == Isa::Avx2 || isa == Isa::Avx2Vnni || isa == Isa::Avx512) rotate_one = rotate_row_avx2;
#endif
    for_rows(M * s.K, [&](size_t m) { rotate_one(w, A + m * s.K, a_rot.data() + m * s.K); });
    A = a_rot.data();
  }
  std::vector<float> a_pad, a_sums, a_scale, a_qsum_scaled;
  std::vector<int8_t> a_q;
  std::vector<int32_t> a_qsum, a_qsum_init, a_qsum_init_lane, a_qsum_init_wide;
  GemmProblem p{&w, nullptr, nullptr, M, bias, Y, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
  if (accuracy_level == kAccuracyInt8) {
    a_q.resize(static_cast<size_t>(M * Kp));
    a_scale.resize(static_cast<size_t>(M * nb));
    a_qsum.resize(static_cast<size_t>(M * nb));
    a_qsum_scaled.resize(static_cast<size_t>(M * nb));
    a_qsum_init.resize(static_cast<size_t>(M * nb));
    // The GEMV's per-lane starts (GemmProblem) are read by the x86 VNNI GEMVs alone, the wide ones by
    // AVX-512's alone: a prefill or another ISA skips them.
    const bool gemv_lanes = M <= kMaxGemvRows && (isa == Isa::Avx2Vnni || isa == Isa::Avx512);
    const bool wide_lanes = gemv_lanes && isa == Isa::Avx512;
    if (gemv_lanes) a_qsum_init_lane.resize(static_cast<size_t>(M * nb * kGemvLanes));
    if (wide_lanes) a_qsum_init_wide.resize(static_cast<size_t>(M * nb * kWideLanes));
    auto quantize = [&](size_t m) {
      quantize_row_int8(A + m * s.K, s.K, s.block_size, a_q.data() + m * Kp, a_scale.data() + m * nb,
                        a_qsum.data() + m * nb);
      for (int64_t b = 0; b < nb; ++b) {
        a_qsum_scaled[m * nb + b] = a_scale[m * nb + b] * static_cast<float>(a_qsum[m * nb + b]);
        a_qsum_init[m * nb + b] = -128 * a_qsum[m * nb + b];
        if (!gemv_lanes) continue;
        // Lane j holds the block's k with k mod 64 in [4j, 4j+4): the block's 64-code rows summed position by
        // position first, a loop the compiler vectorizes (a scalar k mod 64 scatter had cost ~0.5 µs a call).
        int32_t column[64] = {};
        const int8_t* qb = a_q.data() + m * Kp + b * s.block_size;
        for (int64_t k0 = 0; k0 < s.block_size; k0 += 64) {
          const int64_t width = std::min<int64_t>(64, s.block_size - k0);
          for (int64_t j = 0; j < width; ++j) column[j] += qb[k0 + j];
        }
        int32_t wide[kWideLanes];
        for (int64_t j = 0; j < kWideLanes; ++j)
          wide[j] = -128 * (column[4 * j] + column[4 * j + 1] + column[4 * j + 2] + column[4 * j + 3]);
        int32_t* lanes = a_qsum_init_lane.data() + (m * nb + b) * kGemvLanes;
        for (int64_t j = 0; j < kGemvLanes; ++j) lanes[j] = wide[j] + wide[j + kGemvLanes];
        if (wide_lanes) std::copy(wide, wide + kWideLanes, a_qsum_init_wide.data() + (m * nb + b) * kWideLanes);
      }
    };
    for_rows(M * Kp, quantize);
    p.a_q = a_q.data();
    p.a_scale = a_scale.data();
    p.a_qsum = a_qsum.data();
    p.a_qsum_scaled = a_qsum_scaled.data();
    p.a_qsum_init = a_qsum_init.data();
    p.a_qsum_init_lane = gemv_lanes ? a_qsum_init_lane.data() : nullptr;
    p.a_qsum_init_wide = wide_lanes ? a_qsum_init_wide.data() : nullptr;
  } else {
    a_pad.assign(static_cast<size_t>(M * Kp), 0.f);
    a_sums.resize(static_cast<size_t>(M * nb));
    for (int64_t m = 0; m < M; ++m) {
      std::copy(A + m * s.K, A + (m + 1) * s.K, a_pad.begin() + m * Kp);
      for (int64_t b = 0; b < nb; ++b) {
        float sum = 0.f;
        for (int64_t i = 0; i < s.block_size; ++i) sum += a_pad[m * Kp + b * s.block_size + i];
        a_sums[m * nb + b] = sum;
      }
    }
    p.a_pad = a_pad.data();
    p.a_sums = a_sums.data();
  }
  const bool int8 = p.a_q != nullptr;
  void (*kernel)(const GemmProblem&, int64_t, int64_t) = nullptr;
  switch (isa) {
    case Isa::Avx2: kernel = gemm_columns_avx2; break;
    case Isa::Avx2Vnni: kernel = gemm_columns_avx2vnni; break;
    case Isa::Avx512: kernel = gemm_columns_avx512; break;
    case Isa::Neon: kernel = gemm_columns_neon; break;
    default: kernel = int8 ? gemm_columns_scalar_int8 : gemm_columns_scalar; break;
  }
  // The center term Σ_b α[n,b]·(Σ_k a[m,k]·c_k over block b) (§5.1): the inner sums once per row and block,
  // then nb multiply-adds per output, so the kernels keep decoding d·(L+o) alone. The scalar float kernel is
  // the exception: it decodes whole weights with decode_block, center included, and so stays an independent
  // yardstick for this term. The int8 path takes the float activations here too (§2.1).
  const bool center_term = w.has_center() && kernel != gemm_columns_scalar;
  // Likewise the outliers (§5.2): a_k·(value − d·(L[c] + o)) per outlier, in float even on the int8 path.
  const bool outlier_term = w.has_outliers() && kernel != gemm_columns_scalar;
  std::vector<float> a_center;
  if (center_term) {
    a_center.resize(static_cast<size_t>(M * nb));
    auto center_dots = [&](size_t m) {
      const float* a = A + m * s.K;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t k0 = b * s.block_size, k1 = std::min(s.K, k0 + s.block_size);
        float sum = 0.f;
        for (int64_t k = k0; k < k1; ++k) sum += a[k] * w.center[k];
        a_center[m * nb + b] = sum;
      }
    };
    for_rows(M * Kp, center_dots);
  }
  // Column tasks, whole 16-column tiles. Decoding (M <= kMaxGemvRows) streams the codes, and a task's codes are one
  // contiguous run (§4): a few long runs per thread keep the prefetchers ahead, where 64-column tasks
  // handed out in turn cut each thread's stream every 18 KB at 3 bits and K = 768. Measured on the
  // GPT-2-small decode set (3-bit/256 int8, weights cold, 2 threads, interleaved in one process): 64-column
  // tasks 3.41 ms a step, N/2 2.76, N/4 2.76, N/6 2.78, N/8 2.86, N/12 2.92; 4-bit/128 3.91 against 3.56 at
  // N/4. Hence two tasks per hardware thread, never under 64 columns. Prefill tiles are compute-bound and
  // balance best at 32 columns.
  constexpr int64_t kCenterSpan = 64;
  const int64_t chunk =
      M <= kMaxGemvRows ? std::max<int64_t>(64, round_up(ceil_div(s.N, 2 * hardware_threads()), 16)) : 32;
  const int64_t tasks = ceil_div(s.N, chunk);
  parallel_for(static_cast<size_t>(tasks), [&](size_t t) {
    const int64_t n0 = static_cast<int64_t>(t) * chunk, n1 = std::min(s.N, n0 + chunk);
    kernel(p, n0, n1);
    if (outlier_term) add_outliers(w, A, M, Y, n0, n1);
    if (!center_term) return;
    // In the task that wrote these columns, while they are still in cache. Along n, over the block-major
    // alpha: the inner loop is a plain axpy the compiler vectorizes (a 768 x 50257 lm_head at M = 1 has 600k
    // of these terms, against 39M weights for the kernel).
    float sum[kCenterSpan];
    for (int64_t c0 = n0; c0 < n1; c0 += kCenterSpan) {
      const int64_t cols = std::min(kCenterSpan, n1 - c0);
      for (int64_t m = 0; m < M; ++m) {
        const float* ac = a_center.data() + m * nb;
        std::fill(sum, sum + cols, 0.f);
        for (int64_t b = 0; b < nb; ++b) {
          const float* alpha = w.alpha.data() + b * s.N + c0;
          const float x = ac[b];
          for (int64_t j = 0; j < cols; ++j) sum[j] += alpha[j] * x;
        }
        float* y = Y + m * s.N + c0;
        for (int64_t j = 0; j < cols; ++j) y[j] += sum[j];
      }
    }
  });
}

void decode_weight(const PreparedWeight& w, float* W) {
  const WeightShape& s = w.shape;
  const int64_t nb = s.blocks_per_column();
  std::vector<float> col(static_cast<size_t>(s.padded_K()));
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t b = 0; b < nb; ++b) decode_block(w, n * nb + b, col.data() + b * s.block_size);
    if (w.rotation) unrotate_column(w, col.data());  // §5.3: the weight the product stands for, Q·W
    for (int64_t k = 0; k < s.K; ++k) W[k * s.N + n] = col[k];
  }
}

}  // namespace rbe

// An independent reading of docs/FORMAT.md for the fuzzer (fuzz_prepare.cc) and the sanitizer driver
// (tests/sanitize_driver.cc): seed fields (§3), code unpacking (§4), the center term (§5.1), the exact outliers
// (§5.2), validity (§6), the input rotation A·Q (§5.3) and a double-precision product Y = A·W + bias at
// accuracy_level 0 or 4 (§2.1), plus the tolerance a float kernel must meet against it. Only the level tables
// (§5) come from the library (rbe::level_table, itself tested against the numpy spec).
// Nothing here calls the code under test's validator or decoder, so the two can disagree and be caught.
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "rbe/format.h"

namespace rbe_ref {

struct Seed {
  uint32_t rho, theta, width, outliers, alpha_bits, tag;
  int offset;
};

inline Seed seed_fields(uint64_t s) {
  Seed f;
  f.rho = static_cast<uint32_t>(s & 0xFFFFu);
  f.theta = static_cast<uint32_t>((s >> 16) & 0xFu);
  const uint32_t off = static_cast<uint32_t>((s >> 20) & 0xFFu);
  f.offset = off < 128 ? static_cast<int>(off) : static_cast<int>(off) - 256;
  f.width = static_cast<uint32_t>((s >> 28) & 0xFu);
  f.outliers = static_cast<uint32_t>((s >> 32) & 0xFFu);
  f.alpha_bits = static_cast<uint32_t>((s >> 40) & 0xFFFFu);
  f.tag = static_cast<uint32_t>(s >> 56);
  return f;
}

// A valid v2 seed (§3) as the int64 bit pattern the node stores.
inline int64_t make_seed(uint32_t rho, uint32_t theta, int offset, uint32_t width) {
  const uint64_t u = uint64_t{rho & 0xFFFFu} | uint64_t{theta & 0xFu} << 16 |
                     uint64_t{static_cast<uint8_t>(offset)} << 20 | uint64_t{width & 0xFu} << 28 |
                     uint64_t{0xB2} << 56;
  return static_cast<int64_t>(u);
}

// An IEEE binary16 pattern (§3's alpha, §5.2's outlier values), as sign · 2^(e − 15) · (1 + m/1024), or
// · 2^−14 · m/1024 when e = 0.
inline bool half_finite(uint32_t h) { return ((h >> 10) & 0x1Fu) != 0x1Fu; }
inline double half_value(uint32_t h) {
  const int e = static_cast<int>((h >> 10) & 0x1Fu);
  const double m = static_cast<double>(h & 0x3FFu) / 1024.0;
  const double v = e == 0 ? std::ldexp(m, -14) : std::ldexp(1.0 + m, e - 15);
  return (h & 0x8000u) ? -v : v;
}

// A seed with the binary16 pattern `alpha` in bits 40-55.
inline int64_t with_alpha(int64_t seed, uint16_t alpha) {
  return static_cast<int64_t>((static_cast<uint64_t>(seed) & ~(uint64_t{0xFFFF} << 40)) | uint64_t{alpha} << 40);
}

// A seed with the tag `tag` in bits 56-63 (0xB3: a rotated node's, §5.3).
inline int64_t with_tag(int64_t seed, uint32_t tag) {
  return static_cast<int64_t>((static_cast<uint64_t>(seed) & ((uint64_t{1} << 56) - 1)) | uint64_t{tag & 0xFFu} << 56);
}

// The next output of splitmix64 (§5.3's sign stream; the fuzzer's PRNG too).
inline uint64_t splitmix64_next(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// A seed with `count` exact outliers (§3 bits 32-39, §5.2).
inline int64_t with_outliers(int64_t seed, uint8_t count) {
  return static_cast<int64_t>((static_cast<uint64_t>(seed) & ~(uint64_t{0xFF} << 32)) | uint64_t{count} << 32);
}

// One §5.2 record: the row within its block and the binary16 pattern of its value (byte 1 low, byte 2 high).
constexpr int64_t kOutlierRecordBytes = 3;
inline uint32_t record_row(const uint8_t* rec) { return rec[0]; }
inline uint32_t record_half(const uint8_t* rec) { return uint32_t{rec[1]} | uint32_t{rec[2]} << 8; }

inline bool bits_ok(int64_t b) { return b == 2 || b == 3 || b == 4 || b == 5 || b == 6 || b == 8; }
// §5: the widths with one uniform table, where theta must be 4.
inline bool uniform_bits(int64_t b) { return b == 5 || b == 6 || b == 8; }
inline bool block_ok(int64_t s) { return s == 32 || s == 64 || s == 128 || s == 256; }
inline bool shape_ok(int64_t K, int64_t N, int64_t bs, int64_t bits, float scale0) {
  const int64_t max_dim = int64_t{1} << 24;
  return bits_ok(bits) && block_ok(bs) && K >= 1 && K <= max_dim && N >= 1 && N <= max_dim &&
         std::isfinite(scale0) && scale0 > 0.f;
}

// §3: d = float32(s0 · exp(rho / 512)), computed in double.
inline float block_scale(float scale0, uint32_t rho) {
  return static_cast<float>(static_cast<double>(scale0) * std::exp(rho / 512.0));
}

// The first §6 rule the weight breaks, or "" when it is valid. Sizes are only computed for a valid shape.
// center: null for a node without one, else n_center floats. outliers: null for a node without an outliers
// input, else its n_outlier_bytes bytes (a given input may be empty: then every count must be 0).
inline std::string invalid_reason(int64_t K, int64_t N, int64_t bs, int64_t bits, float scale0,
                                  const int64_t* seeds, int64_t n_seeds, const uint8_t* codes,
                                  int64_t n_code_bytes, const float* center = nullptr, int64_t n_center = 0,
                                  const uint8_t* outliers = nullptr, int64_t n_outlier_bytes = 0,
                                  int64_t rotation = 0) {
  if (!shape_ok(K, N, bs, bits, scale0)) return "shape/attributes out of range";
  // §5.3: no rotation, or a power of two in [2, 4096] dividing K; the seeds' tag says which.
  if (rotation != 0 && !(rotation >= 2 && rotation <= 4096 && (rotation & (rotation - 1)) == 0 && K % rotation == 0))
    return "rotation";
  const uint32_t tag = rotation != 0 ? 0xB3 : 0xB2;
  const int64_t nb = (K + bs - 1) / bs;
  if (n_seeds != N * nb || seeds == nullptr) return "seed count";
  if (n_code_bytes != N * nb * bs * bits / 8 || codes == nullptr) return "code length";
  if (center != nullptr) {
    if (n_center != K) return "center length";
    for (int64_t k = 0; k < K; ++k)
      if (!std::isfinite(center[k])) return "center not finite";
  }
  for (int64_t i = 0; i < n_seeds; ++i) {
    const Seed f = seed_fields(static_cast<uint64_t>(seeds[i]));
    if (f.tag != tag) return "tag";
    if (f.width != static_cast<uint32_t>(bits)) return "width";
    if (f.outliers != 0 && outliers == nullptr) return "outlier count without an outliers input";
    if (f.outliers > static_cast<uint64_t>(bs)) return "outlier count above block_size";
    if (!half_finite(f.alpha_bits)) return "alpha not finite";
    if (f.alpha_bits != 0 && center == nullptr) return "alpha without center";
    if (uniform_bits(bits) && f.theta != 4) return "theta with 5, 6 or 8 bits";
    if (!std::isfinite(block_scale(scale0, f.rho))) return "scale overflow";
  }
  if (outliers == nullptr) return "";
  // §5.2: the records are the blocks' in code order, so block i owns the next `count` of them.
  int64_t total = 0;
  for (int64_t i = 0; i < n_seeds; ++i) total += seed_fields(static_cast<uint64_t>(seeds[i])).outliers;
  if (n_outlier_bytes != kOutlierRecordBytes * total) return "outliers length";
  const uint8_t* rec = outliers;
  for (int64_t i = 0; i < n_seeds; ++i) {
    const uint32_t count = seed_fields(static_cast<uint64_t>(seeds[i])).outliers;
    for (uint32_t r = 0; r < count; ++r, rec += kOutlierRecordBytes) {
      if (record_row(rec) >= static_cast<uint64_t>(bs)) return "outlier row past the block";
      if ((i % nb) * bs + record_row(rec) >= K) return "outlier row past K";
      if (r > 0 && record_row(rec) <= record_row(rec - kOutlierRecordBytes)) return "outlier rows not ascending";
      if (!half_finite(record_half(rec))) return "outlier value not finite";
    }
  }
  return "";
}

// Code i (0 <= i < bs) of one block, read bit by bit as §4 describes it.
inline int code_at(const uint8_t* block, int bits, int64_t bs, int i) {
  if (bits == 3) {  // chunks of C = min(bs, 128) codes: a low plane of C/4 bytes, a high plane of C/8
    const int C = bs < 128 ? static_cast<int>(bs) : 128, t = i % C;
    const uint8_t* chunk = block + (i / C) * (3 * C / 8);
    const int low = (chunk[t % (C / 4)] >> (2 * (t / (C / 4)))) & 3;
    const int high = (chunk[C / 4 + t % (C / 8)] >> (t / (C / 8))) & 1;
    return low | high << 2;
  }
  const uint8_t* g = block + (i / 32) * 4 * bits;
  const int t = i % 32;
  if (bits == 8) return g[t];
  if (bits == 2) return (g[t % 8] >> (2 * (t / 8))) & 3;
  const int nibble = t < 16 ? (g[t] & 0xF) : (g[t - 16] >> 4);  // 4, 5 and 6 bits: the 4-bit layout first
  switch (bits) {
    case 5: return nibble | ((g[16 + t / 8] >> (t % 8)) & 1) << 4;
    case 6: return nibble | ((g[16 + t % 8] >> (2 * (t / 8))) & 3) << 4;
    default: return nibble;
  }
}

struct Product {
  std::vector<double> y;    // M x N, exact-ish (double) result
  std::vector<double> mag;  // M x N, sum of |a|·d·(|L|+|o|) + |bias|: the scale of rounding errors
  std::vector<double> l1;   // M, sum of |a| over the row
  std::vector<bool> row_finite;  // M, row of A holds no NaN/Inf
  // N: no block of the column has d·(128 + |o|) near FLT_MAX. Where one has, a kernel may overflow in an
  // intermediate (d·o, d·(L+o)) even though the exact product is finite: valid, but nothing to compare.
  std::vector<bool> col_tame;
  // N: rounded operations a kernel may add past its dot products, two per outlier of the column (§5.2: the
  // correction a_k·(v − d·(L + o)) is a product and a sum after the blocks'). Empty: none.
  std::vector<double> extra_terms;
};

// §2.1's int8 activations of one finite row, dequantized: s·q_k for k < K (per block b, a_k = 0 past K).
inline std::vector<double> dequantized_row(const float* a, int64_t K, int64_t bs) {
  std::vector<double> out(static_cast<size_t>(K), 0.0);
  for (int64_t k0 = 0; k0 < K; k0 += bs) {
    const int64_t k1 = std::min(K, k0 + bs);
    float amax = 0.f;
    for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(a[k]));
    if (amax == 0.f) continue;
    // One float32 division each, and the product rounded to float32 before rounding half to even.
    const float s = amax / 127.f, inv = 127.f / amax;
    for (int64_t k = k0; k < k1; ++k) {
      const float x = a[k] * inv;
      out[k] = static_cast<double>(s) * std::nearbyint(static_cast<double>(x));
    }
  }
  return out;
}

// Y = A·W + bias in double from the raw seeds and codes (the weight must be valid); with a center (K
// floats), w = d·(L + o) + α·c_k (§5.1); with outliers (the §5.2 records, as valid for these seeds), an
// outlier's w = v (+ α·c_k). accuracy_level 4 (§2.1): the codes' part takes the dequantized int8
// activations, the center term and the outliers' corrections a_k·(v − d·(L + o)) the float ones.
inline Product reference_gemm(int64_t K, int64_t N, int64_t bs, int bits, float scale0, const int64_t* seeds,
                              const uint8_t* codes, const float* A, int64_t M, const float* bias,
                              const float* center = nullptr, const uint8_t* outliers = nullptr,
                              int accuracy_level = 0) {
  const int64_t nb = (K + bs - 1) / bs, block_bytes = bs * bits / 8;
  const bool int8 = accuracy_level == 4;
  Product p;
  p.y.assign(static_cast<size_t>(M * N), 0.0);
  p.mag.assign(static_cast<size_t>(M * N), 0.0);
  p.l1.assign(static_cast<size_t>(M), 0.0);
  p.row_finite.assign(static_cast<size_t>(M), true);
  p.col_tame.assign(static_cast<size_t>(N), true);
  p.extra_terms.assign(static_cast<size_t>(N), 0.0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      const double a = A[m * K + k];
      if (!std::isfinite(a)) p.row_finite[m] = false;
      p.l1[m] += std::fabs(a);
    }
  // The activations the codes' part multiplies: A itself, or its int8 form (rows with NaN/Inf are all NaN
  // at level 4 and are not compared, so they keep A).
  std::vector<double> Acode(static_cast<size_t>(M * K));
  for (int64_t m = 0; m < M; ++m) {
    const std::vector<double> q = int8 && p.row_finite[m] ? dequantized_row(A + m * K, K, bs) : std::vector<double>();
    for (int64_t k = 0; k < K; ++k) Acode[m * K + k] = q.empty() ? A[m * K + k] : q[k];
  }
  std::vector<std::vector<int>> tables(16);
  for (int t = 0; t < 16; ++t) tables[t] = rbe::level_table(bits, uniform_bits(bits) ? 4 : t);
  // Per column: wcode the codes' d·(L + o), wval the weight without its center term (v at an outlier, else
  // wcode), wcenter α·c_k; wmag bounds the magnitude of every term a kernel may form at k (an outlier's
  // correction subtracts d·(L + o) from v, so both count).
  std::vector<double> wcode(static_cast<size_t>(K)), wval(static_cast<size_t>(K)), wcenter(static_cast<size_t>(K)),
      wmag(static_cast<size_t>(K));
  const uint8_t* rec = outliers;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t b = 0; b < nb; ++b) {
      const Seed f = seed_fields(static_cast<uint64_t>(seeds[n * nb + b]));
      const double d = block_scale(scale0, f.rho);
      if (!(d * (128.0 + std::abs(f.offset)) < 0.25 * FLT_MAX)) p.col_tame[n] = false;
      const std::vector<int>& L = tables[f.theta];
      const uint8_t* block = codes + (n * nb + b) * block_bytes;
      const double alpha = center ? half_value(f.alpha_bits) : 0.0;
      for (int64_t i = 0; i < bs && b * bs + i < K; ++i) {
        const int level = L[static_cast<size_t>(code_at(block, bits, bs, static_cast<int>(i)))];
        const double c = center ? center[b * bs + i] : 0.0;
        wcode[b * bs + i] = wval[b * bs + i] = d * (level + f.offset);
        wcenter[b * bs + i] = alpha * c;
        wmag[b * bs + i] = d * (std::abs(level) + std::abs(f.offset)) + std::fabs(alpha * c);
      }
      if (outliers == nullptr) continue;
      for (uint32_t r = 0; r < f.outliers; ++r, rec += kOutlierRecordBytes) {
        const int64_t k = b * bs + record_row(rec);
        wval[k] = half_value(record_half(rec));
        wmag[k] += std::fabs(wval[k]);
        p.extra_terms[n] += 2.0;
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      double acc = bias ? bias[n] : 0.0, mag = bias ? std::fabs(bias[n]) : 0.0;
      for (int64_t k = 0; k < K; ++k) {
        const double a = A[m * K + k], aq = Acode[m * K + k];
        acc += int8 ? aq * wcode[k] + a * ((wval[k] - wcode[k]) + wcenter[k]) : a * (wval[k] + wcenter[k]);
        // Level 4 multiplies the codes by s·q and the corrections by a: |a| + |s·q| bounds both.
        mag += (int8 ? std::fabs(a) + std::fabs(aq) : std::fabs(a)) * wmag[k];
      }
      p.y[m * N + n] = acc;
      p.mag[m * N + n] = mag;
    }
  }
  return p;
}

// Checks a float result against the reference; "" when it agrees, else a description of the first
// disagreement. A float kernel that sums K products in float (any order, any blocking) stays within
// (K + nb + 64)·eps·mag; subnormal intermediates add at most a few FLT_MIN per term. Rows of A holding
// NaN/Inf must give non-finite outputs, every other output must be finite unless mag overflows float or
// the column has block scales near FLT_MAX. With `other` (another kernel's result for the same product)
// y is held to that instead of the reference's value, within twice the bound: both are within it of the
// exact result of the same float inputs.
inline std::string check_against(const Product& ref, const float* y, int64_t M, int64_t N, int64_t K,
                                 int64_t nb, const char* what, const float* other = nullptr) {
  const double terms = static_cast<double>(K + nb + 64) * (other ? 2.0 : 1.0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      const double got = y[m * N + n], want = other ? other[m * N + n] : ref.y[m * N + n], mag = ref.mag[m * N + n];
      const double extra = ref.extra_terms.empty() ? 0.0 : ref.extra_terms[static_cast<size_t>(n)];
      std::ostringstream msg;
      msg << what << ": Y[" << m << ", " << n << "] = " << got << ", reference " << want << " (mag " << mag
          << ", K=" << K << ")";
      if (!ref.row_finite[m]) {
        if (std::isfinite(got)) return msg.str() + ": finite output from a row holding NaN/Inf";
        continue;
      }
      if (!(mag < 0.25 * FLT_MAX) || !ref.col_tame[n]) continue;  // may overflow float legitimately
      if (!std::isfinite(got)) return msg.str() + ": non-finite output";
      const double tol = 4.0 * (terms + extra) * (FLT_EPSILON * mag + FLT_MIN * (1.0 + ref.l1[m]));
      if (std::fabs(got - want) > tol) {
        msg << ": off by " << std::fabs(got - want) << " > tolerance " << tol;
        return msg.str();
      }
    }
  return "";
}

// §5.3 in double: (A·Q)[m, k] = Σ_j a[m, j]·s_j·H[j, k] / √R over the R values j of k's block,
// H[i, j] = (−1)^popcount(i & j), s_j = −1 where bit j mod 64 of splitmix64 output ⌊j/64⌋ (from the state
// `seed`) is set. The sum over j is taken as Sylvester's factorization of H, log2 R butterfly stages: O(K log R)
// a row, where the sum as written is O(K·R), which for K = 2^20 and R = 4096 took the fuzzer 110 s on one
// input. In double, the stages' rounding stays ~1e-15 relative, far below what a float kernel is allowed.
inline std::vector<double> rotate_rows(const float* A, int64_t M, int64_t K, int64_t R, uint64_t seed) {
  std::vector<double> s(static_cast<size_t>(K));
  uint64_t state = seed, z = 0;
  for (int64_t k = 0; k < K; ++k) {
    if (k % 64 == 0) z = splitmix64_next(state);
    s[static_cast<size_t>(k)] = (z >> (k % 64)) & 1 ? -1.0 : 1.0;
  }
  std::vector<double> out(static_cast<size_t>(M * K));
  const double norm = 1.0 / std::sqrt(static_cast<double>(R));
  for (int64_t m = 0; m < M; ++m) {
    double* x = out.data() + m * K;
    for (int64_t k = 0; k < K; ++k) x[k] = s[static_cast<size_t>(k)] * A[m * K + k];
    for (int64_t k0 = 0; k0 < K; k0 += R)
      for (int64_t h = 1; h < R; h *= 2)
        for (int64_t i = k0; i < k0 + R; i += 2 * h)
          for (int64_t j = i; j < i + h; ++j) {
            const double u = x[j], v = x[j + h];
            x[j] = u + v;
            x[j + h] = u - v;
          }
    for (int64_t k = 0; k < K; ++k) x[k] *= norm;
  }
  return out;
}

}  // namespace rbe_ref

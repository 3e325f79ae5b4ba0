// A·Q (FORMAT.md §5.3) on AVX2, bit for bit what rotation.cc's scalar rotate_row computes: the same float32
// additions and subtractions on the same operands (a sum is commutative, so x + swapped equals the spec's
// x_j + x_{j+h} exactly), the signs and the final scale as single float32 products. The first three stages
// run inside one 8-float register with lane swaps; each wider stage adds and subtracts whole registers.
#include <immintrin.h>

#include "kernels_internal.h"

namespace rbe {

void rotate_row_avx2(const PreparedWeight& w, const float* a, float* out) {
  const int64_t K = w.shape.K, R = w.rotation;
  if (R < 8) {
    rotate_row(w, a, out);
    return;
  }
  const float* signs = w.rotation_signs.data();
  for (int64_t k = 0; k < K; k += 8) {  // R | K and 8 | R
    __m256 x = _mm256_mul_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(signs + k));
    // Stage h: lanes whose bit h is clear take x + partner, the others partner − x (= u − v of their pair).
    __m256 p = _mm256_permute_ps(x, 0xB1);
    x = _mm256_blend_ps(_mm256_add_ps(x, p), _mm256_sub_ps(p, x), 0xAA);
    p = _mm256_permute_ps(x, 0x4E);
    x = _mm256_blend_ps(_mm256_add_ps(x, p), _mm256_sub_ps(p, x), 0xCC);
    p = _mm256_permute2f128_ps(x, x, 0x01);
    x = _mm256_blend_ps(_mm256_add_ps(x, p), _mm256_sub_ps(p, x), 0xF0);
    _mm256_storeu_ps(out + k, x);
  }
  for (int64_t h = 8; h < R; h *= 2)
    for (int64_t k0 = 0; k0 < K; k0 += 2 * h)
      for (int64_t j = k0; j < k0 + h; j += 8) {
        const __m256 u = _mm256_loadu_ps(out + j), v = _mm256_loadu_ps(out + j + h);
        _mm256_storeu_ps(out + j, _mm256_add_ps(u, v));
        _mm256_storeu_ps(out + j + h, _mm256_sub_ps(u, v));
      }
  const __m256 norm = _mm256_set1_ps(rotation_norm(R));
  for (int64_t k = 0; k < K; k += 8) _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_loadu_ps(out + k), norm));
}

}  // namespace rbe

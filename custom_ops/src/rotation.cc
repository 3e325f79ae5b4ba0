// The input rotation of FORMAT.md §5.3: A·Q with Q = D·B, D the ±1 signs of a splitmix64 stream, B
// block-diagonal normalized Walsh-Hadamard. Computed once per product on the activations, so no kernel knows
// about it. The butterflies run in the spec's order (h = 1, 2, 4, ...) with the scale applied last, so this
// and the numpy spec (rbe_onnx/codec/rotation.py) give the same float32 bits.
#include <cmath>
#include <string>

#include "rbe/format.h"

namespace rbe {

namespace {

uint64_t splitmix64_next(uint64_t& state) {
  state += 0x9E3779B97F4A7C15ull;
  uint64_t z = state;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The stages h = 1 .. R/2 of an R-point transform with R known at compile time (unrolled).
template <int R>
void small_hadamard(float* y) {
  for (int h = 1; h < R; h *= 2)
    for (int i = 0; i < R; i += 2 * h)
      for (int j = i; j < i + h; ++j) {
        const float u = y[j], v = y[j + h];
        y[j] = u + v;
        y[j + h] = u - v;
      }
}

// In place: every block of R values replaced by its unnormalized Walsh-Hadamard transform. Each value sees
// the spec's operations in the spec's order; only the interleaving across independent values differs: the
// first three stages per 8 values, unrolled, then each wider stage over all of K (2h divides R, so its
// groups never straddle two blocks) with a contiguous inner loop the compiler vectorizes.
void hadamard_blocks(float* x, int64_t K, int64_t R) {
  const int64_t first = R < 8 ? R : 8;
  for (int64_t k = 0; k < K; k += first) {
    if (first == 8) small_hadamard<8>(x + k);
    else if (first == 4) small_hadamard<4>(x + k);
    else small_hadamard<2>(x + k);
  }
  for (int64_t h = 8; h < R; h *= 2)
    for (int64_t k0 = 0; k0 < K; k0 += 2 * h) {
      float* lo = x + k0;
      float* hi = lo + h;
      for (int64_t j = 0; j < h; ++j) {
        const float u = lo[j], v = hi[j];
        lo[j] = u + v;
        hi[j] = u - v;
      }
    }
}

}  // namespace

float rotation_norm(int64_t R) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(R))); }

bool is_valid_rotation(int64_t K, int64_t block) {
  return block >= 2 && block <= kMaxRotation && (block & (block - 1)) == 0 && K % block == 0;
}

void set_rotation(PreparedWeight& w, int64_t block, uint64_t seed) {
  if (block == 0) {
    w.rotation = 0;
    w.rotation_signs.clear();
    return;
  }
  if (!is_valid_rotation(w.shape.K, block))
    throw FormatError("attribute 'rotation'=" + std::to_string(block) + " must be 0 or a power of two in [2, " +
                      std::to_string(kMaxRotation) + "] dividing K=" + std::to_string(w.shape.K));
  w.rotation = block;
  w.rotation_signs.assign(static_cast<size_t>(w.shape.K), 1.f);
  uint64_t state = seed, word = 0;
  for (int64_t k = 0; k < w.shape.K; ++k) {
    if (k % 64 == 0) word = splitmix64_next(state);
    if ((word >> (k % 64)) & 1u) w.rotation_signs[static_cast<size_t>(k)] = -1.f;
  }
}

void rotate_row(const PreparedWeight& w, const float* a, float* out) {
  const int64_t K = w.shape.K, R = w.rotation;
  for (int64_t k = 0; k < K; ++k) out[k] = a[k] * w.rotation_signs[static_cast<size_t>(k)];
  hadamard_blocks(out, K, R);
  const float norm = rotation_norm(R);
  for (int64_t k = 0; k < K; ++k) out[k] *= norm;
}

void unrotate_column(const PreparedWeight& w, float* col) {
  // Q·v = D·B·v, B symmetric: the same butterflies, then the signs.
  const int64_t K = w.shape.K;
  hadamard_blocks(col, K, w.rotation);
  const float norm = rotation_norm(w.rotation);
  for (int64_t k = 0; k < K; ++k) col[k] = col[k] * norm * w.rotation_signs[static_cast<size_t>(k)];
}

}  // namespace rbe

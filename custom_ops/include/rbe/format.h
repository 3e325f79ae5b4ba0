// RBE weight format v2 (docs/FORMAT.md): seed fields, level tables and the validated, kernel-ready view
// of one weight. The codes are never copied: PreparedWeight points into the caller's (memory-mapped) bytes.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace rbe {

constexpr uint32_t kSeedTag = 0xB2;
constexpr uint32_t kSeedTagRotated = 0xB3;  // the seeds of a node with an input rotation (§5.3)
constexpr uint32_t kSeedTagV1 = 0xB1;  // format 1: refused with a pointer to `rbe-onnx rewrite` (§3)
constexpr int kThetaSteps = 16;
constexpr int kUniformTheta = 4;
constexpr int kGroup = 32;  // codes per packing group (§4)
// Codes per chunk of a 3-bit block (§4): min(block_size, 128).
constexpr int chunk_3bit(int64_t block_size) { return block_size < 128 ? static_cast<int>(block_size) : 128; }
constexpr int64_t kMaxDim = int64_t{1} << 24;

// A format or shape violation; the message names the rule broken. The ORT layer adds the node name.
struct FormatError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct SeedFields {
  uint32_t rho, theta, width, outliers, alpha_bits, tag;  // alpha_bits: the binary16 pattern (§3, §5.1)
  int32_t offset;
};

SeedFields unpack_seed(uint64_t seed);
// The inverse, for writers of seeds in C++ (tests, benchmarks): fields masked to their widths, offset as int8.
uint64_t pack_seed(const SeedFields& f);
// IEEE 754 binary16 -> float32, exact for every pattern (subnormals, ±0, ±Inf; NaN stays NaN).
float half_to_float(uint16_t h);
// A block's step d = s0·(1+r)/(1−r) with r = tanh(rho/1024), computed as s0·exp(rho/512) in double and rounded
// once (§3); Inf when scale0 is too large for the rho, which the callers refuse.
float block_scale(float scale0, uint32_t rho);
bool is_supported_bits(int64_t bits);
// 5-, 6- and 8-bit codes have one uniform level table (§5): theta must be 4, and L[c] + 128 is the code
// shifted to 8 bits, so the kernels run them as 8-bit codes once unpacked.
bool has_uniform_table(int64_t bits);
bool is_supported_block_size(int64_t block_size);

// L_theta for a code width: 2^bits int levels (§5). Computed in double exactly as the numpy spec does.
std::vector<int> level_table(int bits, int theta);

struct WeightShape {
  int64_t K = 0, N = 0, block_size = 0, bits = 0;
  float scale0 = 0.f;
  int64_t blocks_per_column() const { return (K + block_size - 1) / block_size; }
  int64_t padded_K() const { return blocks_per_column() * block_size; }
  int64_t block_bytes() const { return block_size * bits / 8; }
  int64_t code_bytes() const { return N * blocks_per_column() * block_bytes(); }
};

// Per block: scale d, offset o and the codebook index (decoded once from the seeds).
struct PreparedWeight {
  WeightShape shape;
  const uint8_t* codes = nullptr;      // borrowed: shape.code_bytes() bytes
  std::vector<float> scale;            // [N·nb]
  std::vector<float> offset;           // [N·nb]: o
  std::vector<float> scaled_offset;    // [N·nb]: d·o, the offset term's weight side (int8 GEMV, tiles)
  std::vector<uint8_t> theta;          // [N·nb]
  alignas(32) int8_t lut[kThetaSteps][16] = {};  // int8 levels for 2/3/4-bit codes, by theta (else zero)
  // The same levels as VPDPBUSD's unsigned operand, L + 128, repeated every 2^bits entries up to 64: what
  // every x86 int8 GEMV looks codes up in (pshufb the first 16 bytes, vpermb 32 or 64, which may see index
  // bits above a code's width), built once here rather than per kernel call. Zero for 5-, 6- and 8-bit codes.
  alignas(64) uint8_t lut_vnni[kThetaSteps][64] = {};
  std::vector<std::vector<int>> levels;           // [16][2^bits] int levels (5/6/8-bit: 16 copies of one)
  // The center vector (§5.1), both empty without one: alpha [nb·N], the seeds' binary16 α as float32, block
  // b of column n at b·N + n (block-major, unlike the other tables: the center term runs along n, so its
  // loop vectorizes), and center [padded_K], a copy of the node's K values, zero past K so tail blocks need
  // no special case.
  std::vector<float> alpha;
  std::vector<float> center;
  bool has_center() const { return !center.empty(); }
  // Exact outliers (§5.2), all empty without any: outlier_first [N·nb + 1] indexes the records of block blk at
  // [outlier_first[blk], outlier_first[blk + 1]) (so column n's at [outlier_first[n·nb], outlier_first[(n+1)·nb])),
  // outlier_k their row in the weight, outlier_value the stored value widened to float32 and outlier_delta that
  // value less what the code decodes to, d·(L[c] + o): the products add a_k·delta after the kernels.
  std::vector<int64_t> outlier_first;
  std::vector<int32_t> outlier_k;
  std::vector<float> outlier_value;
  std::vector<float> outlier_delta;
  bool has_outliers() const { return !outlier_k.empty(); }
  // The input rotation (§5.3): R (0: none) and D's K signs as ±1 floats. The product is (A·Q)·W with
  // Q = D·B; the codes, center and outliers all describe the rotated weight.
  int64_t rotation = 0;
  std::vector<float> rotation_signs;
};

// Checks K, N, block_size, bits and scale0 against §2 (throws FormatError).
void validate_shape(const WeightShape& shape);

// Validates shape, seeds, code length, center, outliers and rotation against §6 and builds the per-block
// tables. Throws FormatError. seeds: N·nb values; codes: code_bytes; center: K floats, or null for a node
// without one (then every seed's alpha must be +0); outliers: the §5.2 records (3 bytes each), or null for a
// node without them (then every seed's outlier count must be 0); rotation, rotation_seed: the §5.3
// attributes (rotation 0: none, and every seed's tag must be 0xB2; else 0xB3).
PreparedWeight prepare_weight(const WeightShape& shape, const int64_t* seeds, int64_t n_seeds,
                              const uint8_t* codes, int64_t n_code_bytes, const float* center = nullptr,
                              int64_t n_center = 0, const uint8_t* outliers = nullptr, int64_t n_outlier_bytes = 0,
                              int64_t rotation = 0, uint64_t rotation_seed = 0);

// Decodes block blk (= n·nb + b) to block_size floats d·(L[c]+o), or an outlier's value (§5.2), (+ α·c_k with
// a center, §5.1, bit for bit as the spec), tail positions included (§4).
void decode_block(const PreparedWeight& w, int64_t blk, float* out);

// §5.3. A rotation block R is 0 (none) or a power of two in [2, kMaxRotation] dividing K.
constexpr int64_t kMaxRotation = 4096;
bool is_valid_rotation(int64_t K, int64_t block);
// Sets w's rotation and signs (prepare_weight's last step; throws FormatError for an invalid block).
void set_rotation(PreparedWeight& w, int64_t block, uint64_t seed);
// float32(1/√R), the scale applied after the butterflies.
float rotation_norm(int64_t R);
// out = a·Q for one row of K activations (w.rotation > 0), bit for bit as the numpy spec.
void rotate_row(const PreparedWeight& w, const float* a, float* out);
// col = Q·col for one K-value column of the stored weight: the weight the rotated product stands for.
void unrotate_column(const PreparedWeight& w, float* col);

// Unpacks the codes of one block (block_size values) per §4.
void unpack_block_codes(const uint8_t* block, int bits, int block_size, uint8_t* out_codes);

}  // namespace rbe

// Carves a libFuzzer input into little-endian fields; reading past its end yields zeros, so every input is
// meaningful to the fuzz targets that use it (fuzz_prepare.cc, fuzz_rice.cc).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

struct Reader {
  const uint8_t* p;
  size_t n, pos = 0;
  template <typename T>
  T take() {
    T v{};
    const size_t k = pos < n ? std::min(sizeof(T), n - pos) : 0;
    if (k) std::memcpy(&v, p + pos, k);
    pos += sizeof(T);
    return v;
  }
  size_t left() const { return pos < n ? n - pos : 0; }
  const uint8_t* here() const { return p + std::min(pos, n); }
};

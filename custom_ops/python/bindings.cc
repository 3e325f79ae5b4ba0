// pybind11 module rbe_onnx._kernels: the op library's kernels, callable from Python so the codec tests can
// compare every ISA against the numpy spec without going through ONNX Runtime.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <exception>
#include <vector>

#include "rbe/format.h"
#include "rbe/kernels.h"
#include "rbe/spin_pool.h"

namespace py = pybind11;

namespace {

using I64 = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using U8 = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;
using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;

// Keeps the numpy buffers alive as long as the prepared weight points into them.
struct Weight {
  U8 codes;
  rbe::PreparedWeight w;
};

// center: None or K floats (FORMAT.md §5.1); outliers: None or the §5.2 records. prepare_weight copies what
// it needs of both, so they need not outlive the call.
Weight make_weight(const I64& seeds, const U8& codes, int64_t K, int64_t N, int64_t block_size, int64_t bits,
                   float scale0, py::object center, py::object outliers, int64_t rotation, uint64_t rotation_seed) {
  rbe::WeightShape s{K, N, block_size, bits, scale0};
  Weight out{codes, {}};
  F32 c;
  if (!center.is_none()) {
    c = center.cast<F32>();
    if (c.ndim() != 1) throw rbe::FormatError("center must be 1-D");
  }
  U8 o;
  static const uint8_t kNone = 0;
  if (!outliers.is_none()) {
    o = outliers.cast<U8>();
    if (o.ndim() != 1) throw rbe::FormatError("outliers must be 1-D");
  }
  out.w = rbe::prepare_weight(s, seeds.data(), seeds.size(), out.codes.data(), out.codes.size(),
                              center.is_none() ? nullptr : c.data(), center.is_none() ? 0 : c.size(),
                              outliers.is_none() ? nullptr : (o.size() ? o.data() : &kNone),
                              outliers.is_none() ? 0 : o.size(), rotation, rotation_seed);
  return out;
}


// Y = A·W (+ bias) into y ([M, N], allocated by the caller); returns the seconds the C++ call took.
double gemm_into(const Weight& self, const F32& a, py::object bias, const std::string& isa, int threads,
                 int accuracy_level, py::array_t<float>& y) {
  const rbe::WeightShape& s = self.w.shape;
  F32 b;
  if (!bias.is_none()) {
    b = bias.cast<F32>();
    if (b.ndim() != 1 || b.shape(0) != s.N) throw rbe::FormatError("bias must have shape [N]");
  }
  const rbe::Isa which = rbe::isa_from_name(isa);
  const float* bp = bias.is_none() ? nullptr : b.data();
  py::gil_scoped_release release;
  const auto start = std::chrono::steady_clock::now();
  rbe::gemm(self.w, a.data(), a.shape(0), bp, y.mutable_data(), which, rbe::spin_pool_for(threads), accuracy_level);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

py::array_t<float> output_for(const Weight& self, const F32& a) {
  const rbe::WeightShape& s = self.w.shape;
  if (a.ndim() != 2 || a.shape(1) != s.K)
    throw rbe::FormatError("A must be 2-D with K=" + std::to_string(s.K) + " columns");
  return py::array_t<float>({static_cast<int64_t>(a.shape(0)), s.N});
}

py::array_t<float> gemm(const Weight& self, const F32& a, py::object bias, const std::string& isa, int threads,
                        int accuracy_level) {
  py::array_t<float> y = output_for(self, a);
  gemm_into(self, a, bias, isa, threads, accuracy_level, y);
  return y;
}

// The same product, timed inside C++ (activation quantization, the thread hand-off and the kernel, not
// Python's per-call overhead of a few microseconds): what tools/bench.py reports for the kernels alone.
double gemm_seconds(const Weight& self, const F32& a, const std::string& isa, int threads, int accuracy_level) {
  py::array_t<float> y = output_for(self, a);
  return gemm_into(self, a, py::none(), isa, threads, accuracy_level, y);
}

// accuracy_level 4's activation quantization (FORMAT.md §2.1) of an M x K array: (q [M, nb·block_size] int8,
// scale [M, nb] float32, qsum [M, nb] int32).
py::tuple quantize_int8(const F32& a, int64_t block_size) {
  if (a.ndim() != 2) throw rbe::FormatError("A must be 2-D");
  if (!rbe::is_supported_block_size(block_size)) throw rbe::FormatError("unsupported block_size");
  const int64_t M = a.shape(0), K = a.shape(1), nb = (K + block_size - 1) / block_size;
  py::array_t<int8_t> q({M, nb * block_size});
  py::array_t<float> scale({M, nb});
  py::array_t<int32_t> qsum({M, nb});
  for (int64_t m = 0; m < M; ++m)
    rbe::quantize_row_int8(a.data() + m * K, K, block_size, q.mutable_data() + m * nb * block_size,
                           scale.mutable_data() + m * nb, qsum.mutable_data() + m * nb);
  return py::make_tuple(q, scale, qsum);
}

py::array_t<float> decode(const Weight& self) {
  py::array_t<float> W({self.w.shape.K, self.w.shape.N});
  rbe::decode_weight(self.w, W.mutable_data());
  return W;
}

}  // namespace

PYBIND11_MODULE(_kernels, m) {
  m.doc() = "RBE kernels (scalar reference, AVX2/FMA, NEON) behind one dispatch";
  py::register_exception<rbe::FormatError>(m, "FormatError", PyExc_ValueError);
  py::class_<Weight>(m, "Weight")
      .def(py::init(&make_weight), py::arg("seeds"), py::arg("codes"), py::arg("K"), py::arg("N"),
           py::arg("block_size"), py::arg("bits"), py::arg("scale0"), py::arg("center") = py::none(),
           py::arg("outliers") = py::none(), py::arg("rotation") = 0, py::arg("rotation_seed") = 0)
      .def("gemm", &gemm, py::arg("a"), py::arg("bias") = py::none(), py::arg("isa") = "auto",
           py::arg("threads") = 1, py::arg("accuracy_level") = 0)
      .def("gemm_seconds", &gemm_seconds, py::arg("a"), py::arg("isa") = "auto", py::arg("threads") = 1,
           py::arg("accuracy_level") = 0)
      .def("decode", &decode);
  m.def("level_table", &rbe::level_table, py::arg("bits"), py::arg("theta"));
  m.def("quantize_int8", &quantize_int8, py::arg("a"), py::arg("block_size"));
  m.def("isa_available", [](const std::string& n) { return rbe::isa_available(rbe::isa_from_name(n)); });
  m.def("best_isa", [] { return std::string(rbe::isa_name(rbe::best_isa())); });
}

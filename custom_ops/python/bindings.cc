// pybind11 module rbe_onnx._kernels: the op library's kernels, callable from Python so the codec tests can
// compare every ISA against the numpy spec without going through ONNX Runtime.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <thread>
#include <vector>

#include "rbe/format.h"
#include "rbe/kernels.h"

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

Weight make_weight(const I64& seeds, const U8& codes, int64_t K, int64_t N, int64_t block_size, int64_t bits,
                   float scale0) {
  rbe::WeightShape s{K, N, block_size, bits, scale0};
  Weight out{codes, {}};
  out.w = rbe::prepare_weight(s, seeds.data(), seeds.size(), out.codes.data(), out.codes.size());
  return out;
}

rbe::ParallelFor thread_pool(int threads) {
  return [threads](size_t n, const std::function<void(size_t)>& task) {
    const size_t workers = std::min<size_t>(std::max(threads, 1), n);
    if (workers <= 1) return rbe::serial_for(n, task);
    std::atomic<size_t> next{0};
    std::vector<std::thread> pool;
    for (size_t t = 0; t < workers; ++t)
      pool.emplace_back([&] {
        for (size_t i; (i = next.fetch_add(1)) < n;) task(i);
      });
    for (auto& th : pool) th.join();
  };
}

py::array_t<float> gemm(const Weight& self, const F32& a, py::object bias, const std::string& isa, int threads) {
  const rbe::WeightShape& s = self.w.shape;
  if (a.ndim() != 2 || a.shape(1) != s.K)
    throw rbe::FormatError("A must be 2-D with K=" + std::to_string(s.K) + " columns");
  F32 b;
  if (!bias.is_none()) {
    b = bias.cast<F32>();
    if (b.ndim() != 1 || b.shape(0) != s.N) throw rbe::FormatError("bias must have shape [N]");
  }
  const int64_t M = a.shape(0);
  py::array_t<float> y({M, s.N});
  const rbe::Isa which = rbe::isa_from_name(isa);
  const float* bp = bias.is_none() ? nullptr : b.data();
  {
    py::gil_scoped_release release;
    rbe::gemm(self.w, a.data(), M, bp, y.mutable_data(), which, thread_pool(threads));
  }
  return y;
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
           py::arg("block_size"), py::arg("bits"), py::arg("scale0"))
      .def("gemm", &gemm, py::arg("a"), py::arg("bias") = py::none(), py::arg("isa") = "auto",
           py::arg("threads") = 1)
      .def("decode", &decode);
  m.def("level_table", &rbe::level_table, py::arg("bits"), py::arg("theta"));
  m.def("isa_available", [](const std::string& n) { return rbe::isa_available(rbe::isa_from_name(n)); });
  m.def("best_isa", [] { return std::string(rbe::isa_name(rbe::best_isa())); });
}

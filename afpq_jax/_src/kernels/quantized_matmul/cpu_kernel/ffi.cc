// The "cpu" implementation of quantized_matmul as an XLA FFI handler (built on first use by cpu.py): the kernel
// (kernel.h) on XLA's intra-op thread pool.

#include "kernel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error QuantizedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                           ffi::Buffer<ffi::F32> pos, ffi::Buffer<ffi::F32> neg, ffi::Buffer<ffi::F32> zero,
                           ffi::ResultBuffer<ffi::F32> y, int64_t bits, int64_t group, bool is_int,
                           bool has_neg, bool has_zero, bool round_bf16, ffi::Span<const float> table) {
  const auto xd = x.dimensions();
  const auto cd = codes.dimensions();
  if (xd.size() != 2 || cd.size() != 2) return ffi::Error::InvalidArgument("x and codes must be 2-D");
  afpq::Problem p{};
  const std::string error = afpq::Prepare(p, xd[0], xd[1], cd[1], cd[0], bits, group, is_int, has_neg, has_zero,
                                          round_bf16, table.begin(), static_cast<int64_t>(table.size()));
  if (!error.empty()) return ffi::Error::InvalidArgument(error);
  const int64_t groups = (p.k + group - 1) / group;
  const auto has_shape = [&](ffi::Buffer<ffi::F32>& b, bool used) {
    const auto d = b.dimensions();
    return d.size() == 2 && (used ? d[0] == groups && d[1] == p.n : d[0] == 1 && d[1] == 1);
  };
  if (!has_shape(pos, true) || !has_shape(neg, has_neg) || !has_shape(zero, has_zero))
    return ffi::Error::InvalidArgument("scales must be (ceil(K / group), N), unused ones (1, 1)");
  if (p.m == 0 || p.n == 0) return ffi::Error::Success();  // nothing to compute (the paths assume a row)
  p.x = x.typed_data();
  p.codes = codes.typed_data();
  p.pos = pos.typed_data();
  p.neg = neg.typed_data();
  p.zero = zero.typed_data();
  p.y = y->typed_data();
  afpq::RunBlocks(p, pool);
  return ffi::Error::Success();
}

}  // namespace

// The vector ISA this library was compiled for: "avx512", "avx2", "neon" or "portable" (logged by cpu.py).
extern "C" const char* AfpqCpuKernelIsa() { return afpq::kIsaName; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(AfpqQuantizedMatmulCpu, QuantizedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x (M, K)
                                  .Arg<ffi::Buffer<ffi::U8>>()   // packed codes (packed rows, N)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // pos scale (G, N)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // neg scale (G, N), or (1, 1) unused
                                  .Arg<ffi::Buffer<ffi::F32>>()  // zero (G, N), or (1, 1) unused
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y (M, N)
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group")
                                  .Attr<bool>("is_int")
                                  .Attr<bool>("has_neg")
                                  .Attr<bool>("has_zero")
                                  .Attr<bool>("round_bf16")
                                  .Attr<ffi::Span<const float>>("table"));

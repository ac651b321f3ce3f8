// A standalone driver of the kernel (kernel.h) without XLA, for the numerics of each ISA path, including paths
// this machine cannot run natively (aarch64 NEON under qemu-user): `selftest IN OUT` reads problems from IN and
// writes each one's y to OUT. Built and run by tests/kernels/test_cpu_isas.py; not part of the package's
// runtime. The tasks run in order on this thread, split as for `--threads` (default 2) pool threads.
//
// IN, little-endian, problems back to back until the end of the file, each:
//   int64 m, k, n, code_rows, bits, group, is_int, has_neg, has_zero, round_bf16, table_size;
//   float32 table[table_size]; float32 x[m k]; uint8 codes[code_rows n];
//   float32 pos[G n]; float32 neg[G n] if has_neg; float32 zero[G n] if has_zero   (G = ceil(k / group))
// OUT: float32 y[m n] per problem, then the ISA's name and a newline.

#include <cstdio>
#include <cstdlib>
#include <string>

#include "kernel.h"

namespace {

struct InlinePool {
  int64_t threads;
  int64_t num_threads() const { return threads; }
  template <class Fn>
  void Schedule(Fn&& fn) { fn(); }
};

template <class T>
bool Read(std::FILE* f, std::vector<T>& v, int64_t count) {
  v.resize(static_cast<size_t>(count));
  return count == 0 || std::fread(v.data(), sizeof(T), v.size(), f) == v.size();
}

int Fail(const std::string& why) {
  std::fprintf(stderr, "selftest: %s\n", why.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) return Fail("usage: selftest IN OUT [--threads N]");
  const int64_t threads = argc >= 5 && std::string(argv[3]) == "--threads" ? std::atoll(argv[4]) : 2;
  std::FILE* in = std::fopen(argv[1], "rb");
  std::FILE* out = std::fopen(argv[2], "wb");
  if (in == nullptr || out == nullptr) return Fail("cannot open the files");
  InlinePool pool{threads};
  for (;;) {
    int64_t h[11];
    const size_t got = std::fread(h, sizeof(int64_t), 11, in);
    if (got == 0) break;
    if (got != 11) return Fail("truncated header");
    const int64_t m = h[0], k = h[1], n = h[2], code_rows = h[3], bits = h[4], group = h[5];
    const bool is_int = h[6], has_neg = h[7], has_zero = h[8], round_bf16 = h[9];
    const int64_t groups = (k + group - 1) / group;
    std::vector<float> table, x, pos, neg, zero, y(static_cast<size_t>(m * n));
    std::vector<uint8_t> codes;
    if (!Read(in, table, h[10]) || !Read(in, x, m * k) || !Read(in, codes, code_rows * n) ||
        !Read(in, pos, groups * n) || !Read(in, neg, has_neg ? groups * n : 0) ||
        !Read(in, zero, has_zero ? groups * n : 0))
      return Fail("truncated problem");
    afpq::Problem p{};
    const std::string error = afpq::Prepare(p, m, k, n, code_rows, bits, group, is_int, has_neg, has_zero,
                                            round_bf16, table.data(), static_cast<int64_t>(table.size()));
    if (!error.empty()) return Fail(error);
    p.x = x.data();
    p.codes = codes.data();
    p.pos = pos.data();
    p.neg = has_neg ? neg.data() : nullptr;
    p.zero = has_zero ? zero.data() : nullptr;
    p.y = y.data();
    if (m > 0 && n > 0) afpq::RunBlocks(p, pool);
    std::fwrite(y.data(), sizeof(float), y.size(), out);
  }
  std::fprintf(out, "%s\n", afpq::kIsaName);
  std::fclose(in);
  return std::fclose(out) == 0 ? 0 : Fail("cannot write the output");
}

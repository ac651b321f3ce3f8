// The CPU quantized matmul's core, free of XLA: the problem, the packed-code layout, the portable path, the
// column tasks and their scheduling. `ffi.cc` binds it to an XLA FFI handler; `selftest.cc` to a standalone
// driver (the numerics of each ISA path, including aarch64 under qemu).
//
// y (M, N) f32 = x (M, K) f32 @ W, W given as packed codes (afpq_jax._src.packing layout) and float32 group
// scales. Tasks are blocks of output columns; within one, the weight is decoded a K row at a time and accumulated
// into float32, so the codes are read once and no float weight is ever materialised. One SIMD implementation
// (`simd_blocks.h`) over the vector ISA the compiler targets (`isa_*.h`: AVX-512, AVX2 + FMA, NEON): blocks of
// up to 512 columns (a multiple of the vector width), decoded a chunk of 4 vectors of codes per load, codebook
// levels by register lookups (BlockScaled for M <= Isa::kScaledMaxM with float32 x: per-group post-scaling,
// accumulators in registers; BlockWide up to M = 4; BlockPanel from M = 5: K chunks decoded once into a float
// buffer, then a register-tiled micro-kernel). Otherwise, and for the last columns short of a vector: a
// portable loop (ColumnBlock). The columns are split evenly over the tasks (`Tasks`).
//
// Numerics, two contracts (both within 1e-5 * |x| @ |w| of a float64 product, tested):
// - M <= Isa::kScaledMaxM (AVX-512, NEON: 2; AVX2: 1) with float32 x (decode; `BlockScaled`): per group, float32
//   sums of x * level (INT: x * (code - zero)), times the group's scale(s) once; the groups' terms added in K
//   order. Weights are never formed, so they are not rounded as level * scale first.
// - Otherwise: each weight is computed exactly as afpq_jax._src.quantizer.decode does in float32 —
//   (code - zero) * scale (INT) or level * scale (codebook; s_neg for negative levels) — rounded to bfloat16 when
//   x is bfloat16 (the caller passes x as float32, exactly), and the products are summed in float32 in K order.
// Keep -ffast-math off: it would let the compiler change the decode arithmetic.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

// Per-vector helpers of the SIMD path are forced inline (see simd_blocks.h).
#define AFPQ_INLINE __attribute__((always_inline)) inline

namespace afpq {

constexpr int64_t kBlockN = 256;  // most columns per portable task: the (M, 256) f32 accumulator stays in L1 / L2
constexpr int64_t kWideN = 512;   // most columns per SIMD task

struct Problem {
  int64_t m, k, n, bits, group, kp;
  bool is_int, has_neg, has_zero;
  bool round_bf16;     // bfloat16 x: each weight rounded to bfloat16 first (the op's contract: weights in x's dtype)
  int64_t n_negative;  // codebook: codes below this have negative levels (scaled by s_neg); from the table
                       // (AVX2 reads the level's sign instead: the same but for a -0.0 level, a zero weight)
  alignas(64) float table[16];  // codebook levels, padded to 16
  const float* x;
  const uint8_t* codes;
  const float *pos, *neg, *zero;
  float* y;
};

// Checks the shapes and fills everything but the pointers; "" or the error.
inline std::string Prepare(Problem& p, int64_t m, int64_t k, int64_t n, int64_t code_rows, int64_t bits,
                           int64_t group, bool is_int, bool has_neg, bool has_zero, bool round_bf16,
                           const float* table, int64_t table_size) {
  p.m = m;
  p.k = k;
  p.n = n;
  p.bits = bits;
  p.group = group;
  p.kp = (k + 7) / 8 * 8;
  if (bits < 1 || bits > 8 || (8 % bits != 0 && bits != 3)) return "bad bits";
  if (code_rows != p.kp * bits / 8) return "codes rows do not match K and bits";
  if (table_size < 1 || table_size > 16) return "the code book needs 1 to 16 levels";
  if (group < 1) return "group must be >= 1";
  p.is_int = is_int;
  p.has_neg = has_neg;
  p.has_zero = has_zero;
  p.round_bf16 = round_bf16;
  std::fill(p.table, p.table + 16, table[table_size - 1]);
  std::copy(table, table + table_size, p.table);
  p.n_negative = std::count_if(table, table + table_size, [](float v) { return v < 0; });  // levels ascend
  return "";
}

// float32 -> nearest bfloat16 (ties to even), kept in float32; weights are finite. bf16 x bf16 products are exact
// in float32, so rounding the weight is all it takes to multiply in bfloat16 with float32 accumulation.
inline float RoundBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000u;
  std::memcpy(&f, &u, 4);
  return f;
}

// Where row k's codes live: byte rows (column 0) and bit offsets of its plane(s) (afpq_jax._src.packing: a
// 2-bit plane, 4 rows per byte, then a 1-bit plane, 8 rows per byte, for 3-bit codes; one plane otherwise), and
// the byte rows kPrefetchRows ahead. Computed once per row: the divisions cost more than decoding a chunk. Each
// K row's bytes sit in another 4 KiB page, where hardware prefetchers stop; fetching the lines kPrefetchRows
// byte rows ahead made the AVX-512 M=1 loop ~1.8x faster (as fast as with cache-resident codes).
constexpr int64_t kPrefetchRows = 16;

struct RowRef {
  const uint8_t *lo, *hi, *lo_ahead, *hi_ahead;  // hi: the 1-bit plane of 3-bit codes, else null
  int lo_shift, hi_shift, lo_mask;
};

inline RowRef RowOf(const Problem& p, int64_t k) {
  RowRef r{};
  if (p.bits == 3) {
    const int64_t lo_rows = p.kp / 4, hi_rows = p.kp / 8;
    r.lo = p.codes + (k / 4) * p.n;
    r.hi = p.codes + (lo_rows + k / 8) * p.n;
    r.lo_ahead = p.codes + std::min(k / 4 + kPrefetchRows, lo_rows - 1) * p.n;
    r.hi_ahead = p.codes + (lo_rows + std::min(k / 8 + kPrefetchRows, hi_rows - 1)) * p.n;
    r.lo_shift = 2 * static_cast<int>(k % 4);
    r.hi_shift = static_cast<int>(k % 8);
    r.lo_mask = 3;
    return r;
  }
  const int log2_per_byte = p.bits == 1 ? 3 : p.bits == 2 ? 2 : p.bits == 4 ? 1 : 0;  // shifts, not divisions
  const int64_t byte_row = k >> log2_per_byte, rows = p.kp >> log2_per_byte;
  r.lo = p.codes + byte_row * p.n;
  r.lo_ahead = p.codes + std::min(byte_row + kPrefetchRows, rows - 1) * p.n;
  r.lo_shift = static_cast<int>(p.bits * (k & ((int64_t{1} << log2_per_byte) - 1)));
  r.lo_mask = (1 << p.bits) - 1;
  return r;
}

// ---- the portable path ---------------------------------------------------------------------------------

// Codes of a row, columns [n0, n0 + nb), into out.
inline void RowCodes(const RowRef& r, int64_t n0, int64_t nb, uint8_t* out) {
  for (int64_t j = 0; j < nb; ++j) out[j] = (r.lo[n0 + j] >> r.lo_shift) & r.lo_mask;
  if (r.hi != nullptr)
    for (int64_t j = 0; j < nb; ++j) out[j] |= ((r.hi[n0 + j] >> r.hi_shift) & 1) << 2;
}

// Weights of row k (scales of its group) from its codes.
inline void RowWeights(const Problem& p, int64_t group, int64_t n0, int64_t nb, const uint8_t* c, float* w) {
  const float* pos = p.pos + group * p.n + n0;
  if (p.is_int) {
    if (p.has_zero) {
      const float* zero = p.zero + group * p.n + n0;
      for (int64_t j = 0; j < nb; ++j) w[j] = (static_cast<float>(c[j]) - zero[j]) * pos[j];
    } else {
      const float mid = static_cast<float>(1 << (p.bits - 1));
      for (int64_t j = 0; j < nb; ++j) w[j] = (static_cast<float>(c[j]) - mid) * pos[j];
    }
    return;
  }
  const float* neg = p.has_neg ? p.neg + group * p.n + n0 : pos;
  for (int64_t j = 0; j < nb; ++j) w[j] = p.table[c[j]] * (c[j] < p.n_negative ? neg[j] : pos[j]);
}

// Columns [n0, n0 + nb), every row of x.
inline void ColumnBlock(const Problem& p, int64_t n0, int64_t nb) {
  std::vector<float> acc(p.m * nb, 0.0f), w(nb);
  std::vector<uint8_t> c(nb);
  for (int64_t k = 0; k < p.k; ++k) {
    RowCodes(RowOf(p, k), n0, nb, c.data());
    RowWeights(p, k / p.group, n0, nb, c.data(), w.data());
    if (p.round_bf16)
      for (int64_t j = 0; j < nb; ++j) w[j] = RoundBf16(w[j]);
    for (int64_t i = 0; i < p.m; ++i) {
      const float xv = p.x[i * p.k + k];
      float* a = acc.data() + i * nb;
      for (int64_t j = 0; j < nb; ++j) a[j] += xv * w[j];
    }
  }
  for (int64_t i = 0; i < p.m; ++i) std::copy(acc.begin() + i * nb, acc.begin() + (i + 1) * nb, p.y + i * p.n + n0);
}

}  // namespace afpq

// ---- the SIMD path of the ISA this file is compiled for ----------------------------------------------------
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include "isa_avx512.h"
#elif defined(__AVX2__) && defined(__FMA__)
#include "isa_avx2.h"
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include "isa_neon.h"
#endif

#if defined(AFPQ_SIMD_ISA)
#include "simd_blocks.h"
#endif

namespace afpq {

#if defined(AFPQ_SIMD_ISA)
constexpr const char* kIsaName = AFPQ_SIMD_ISA;
constexpr int64_t kUnit = Isa::W;  // columns per vector: the SIMD path takes blocks of a multiple of this
inline void SimdBlock(const Problem& p, int64_t n0, int64_t nb) { Blocks<Isa>::Run(p, n0, nb); }
#else
constexpr const char* kIsaName = "portable";
constexpr int64_t kUnit = 0;
inline void SimdBlock(const Problem&, int64_t, int64_t) {}
#endif

// Column ranges [n0, n0 + nb), one per task.
struct Span {
  int64_t n0, nb;
};

// The tasks: the fewest blocks of at most kWideN columns (kBlockN on the portable path), their count rounded up
// to a multiple of the threads, the columns split evenly among them in units of a vector and no narrower than 64
// where N allows; on a SIMD path the last N mod (vector width) columns are one more (portable) task. SmolLM2 on
// 2 threads with AVX-512: N = 576 is two tasks of 288 columns, not 512 + 64; N = 192 two of 96.
inline std::vector<Span> Tasks(int64_t n, int64_t threads) {
  const int64_t unit = kUnit > 0 ? kUnit : 1, cap = kUnit > 0 ? kWideN : kBlockN;
  const int64_t units = n / unit, even = units * unit;
  std::vector<Span> tasks;
  if (units > 0) {
    int64_t t = (even + cap - 1) / cap;
    if (threads > 1) t = (t + threads - 1) / threads * threads;
    t = std::min<int64_t>({t, units, std::max<int64_t>(1, even / 64)});
    for (int64_t i = 0; i < t; ++i) {
      const int64_t a = i * units / t * unit, b = (i + 1) * units / t * unit;
      tasks.push_back({a, b - a});
    }
  }
  if (even < n) tasks.push_back({even, n - even});
  return tasks;
}

inline void RunTask(const Problem& p, const Span& s) {
  if (kUnit > 0 && s.nb % kUnit == 0) {
    SimdBlock(p, s.n0, s.nb);
  } else {
    ColumnBlock(p, s.n0, s.nb);
  }
}

// Runs every task, on ``pool`` (num_threads(), Schedule(callable)) when it has more than one thread. The tasks
// are claimed from a shared counter by this thread and by helpers scheduled on the pool, and this thread waits
// only for tasks that were claimed, never for a helper to start: the pool's threads may all be busy elsewhere
// (with 4 simulated CPU devices, a call that waited for its queued helper never returned). A helper that starts
// after every task is claimed touches only the state it co-owns (`Shared`), so it may outlive this call.
template <class Pool>
void RunBlocks(const Problem& p, Pool& pool) {
  const std::vector<Span> tasks = Tasks(p.n, pool.num_threads());
  const int64_t blocks = static_cast<int64_t>(tasks.size());
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), blocks) - 1;
  if (helpers <= 0) {
    for (const Span& s : tasks) RunTask(p, s);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0};
    std::mutex mu;
    std::condition_variable all_done;
    int64_t done = 0;
  };
  auto shared = std::make_shared<Shared>();
  const Problem* problem = &p;
  const Span* spans = tasks.data();
  auto work = [shared, problem, spans, blocks]() {
    for (int64_t b = shared->next++; b < blocks; b = shared->next++) {
      RunTask(*problem, spans[b]);  // b < blocks: the caller is still waiting, so problem and spans are alive
      std::lock_guard<std::mutex> lock(shared->mu);
      if (++shared->done == blocks) shared->all_done.notify_all();
    }
  };
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work(); });  // each helper holds a copy
  work();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->all_done.wait(lock, [&] { return shared->done == blocks; });
}

}  // namespace afpq

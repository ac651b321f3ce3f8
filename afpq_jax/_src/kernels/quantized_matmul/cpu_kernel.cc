// The "cpu" implementation of quantized_matmul: an XLA FFI handler, built on first use by cpu.py.
//
// y (M, N) f32 = x (M, K) f32 @ W, W given as packed codes (afpq_jax._src.packing layout) and float32 group
// scales. Tasks are blocks of output columns on XLA's intra-op thread pool; within one, the weight is decoded a
// K row at a time and accumulated into float32, so the codes are read once and no float weight is ever
// materialised. With AVX-512 (-march=native on such a machine): blocks of up to 512 columns (any multiple of 16),
// decoded 64 codes per load, codebook levels by one register permute (BlockScaled for M <= 2 with float32 x:
// per-group post-scaling, accumulators in registers; BlockWide for M <= 4; BlockPanel from M = 5: K chunks
// decoded once into a float buffer, then a register-tiled micro-kernel). Otherwise, and for the
// last N mod 16 columns: a portable loop over up to kBlockN columns (ColumnBlock). The columns are split evenly
// over the tasks (`Tasks`), so no thread idles while another runs an extra block.
//
// Numerics, two contracts (both within 1e-5 * |x| @ |w| of XLA's dot, tested):
// - M <= kScaledMaxM with float32 x (decode; `BlockScaled`): per group, float32 sums of x * level (INT:
//   x * (code - zero)), times the group's scale(s) once; the groups' terms added in K order. Weights are never
//   formed, so they are not rounded as level * scale first.
// - Otherwise: each weight is computed exactly as afpq_jax._src.quantizer.decode does in float32 —
//   (code - zero) * scale (INT) or level * scale (codebook; s_neg for negative levels) — rounded to bfloat16 when
//   x is bfloat16 (the caller passes x as float32, exactly), and the products are summed in float32 in K order.
// XLA's dot sums in another order: the results differ by rounding only.
// Keep -ffast-math off: it would let the compiler change the decode arithmetic.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlockN = 256;  // most columns per portable task: the (M, 256) f32 accumulator stays in L1 / L2

struct Problem {
  int64_t m, k, n, bits, group, kp;
  bool is_int, has_neg, has_zero;
  bool round_bf16;     // bfloat16 x: each weight rounded to bfloat16 first (the op's contract: weights in x's dtype)
  int64_t n_negative;  // codebook: codes below this have negative levels (scaled by s_neg); from the table
  float table[16];     // codebook levels, padded to 16
  const float* x;
  const uint8_t* codes;
  const float *pos, *neg, *zero;
  float* y;
};

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
// the byte rows kPrefetchRows ahead. Computed once per row: the divisions cost more than decoding a 64-column
// chunk. Each K row's bytes sit in another 4 KiB page, where hardware prefetchers stop; fetching the lines
// kPrefetchRows byte rows ahead made the M=1 loop ~1.8x faster (as fast as with cache-resident codes).
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

// Portable path: columns [n0, n0 + nb), every row of x.
void ColumnBlock(const Problem& p, int64_t n0, int64_t nb) {
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

#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr bool kWide = true;
constexpr int64_t kWideN = 512;

inline __m512 RoundBf16(__m512 w) {
  const __m512i u = _mm512_castps_si512(w);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

inline void PrefetchAhead(const RowRef& r, int64_t col) {
  _mm_prefetch(reinterpret_cast<const char*>(r.lo_ahead + col), _MM_HINT_T0);
  if (r.hi != nullptr) _mm_prefetch(reinterpret_cast<const char*>(r.hi_ahead + col), _MM_HINT_T0);
}

// Up to 64 bytes at p; a short chunk (width < 64, a block's last) by a masked load, which never reads past it.
inline __m512i LoadBytes(const uint8_t* p, int64_t width) {
  return width == 64 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(~0ULL >> (64 - width), p);
}

// The codes of a row, columns [col, col + width), width <= 64, one per byte.
inline __m512i RowCodes64(const RowRef& r, int64_t col, int64_t width) {
  const __m512i lo = _mm512_and_si512(
      _mm512_srl_epi16(LoadBytes(r.lo + col, width), _mm_cvtsi32_si128(r.lo_shift)),
      _mm512_set1_epi8(static_cast<char>(r.lo_mask)));
  if (r.hi == nullptr) return lo;
  const __m512i h = _mm512_and_si512(_mm512_srl_epi16(LoadBytes(r.hi + col, width), _mm_cvtsi32_si128(r.hi_shift)),
                                     _mm512_set1_epi8(1));
  return _mm512_or_si512(lo, _mm512_add_epi8(h, _mm512_add_epi8(h, _mm512_add_epi8(h, h))));  // h << 2
}

// Codes [16 q, 16 q + 16) of 64, as int32 lanes (the extract needs an immediate).
__attribute__((always_inline)) inline __m512i Codes16(__m512i codes, int q) {
  switch (q) {
    case 0: return _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(codes, 0));
    case 1: return _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(codes, 1));
    case 2: return _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(codes, 2));
    default: return _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(codes, 3));
  }
}

// f(q) for the 16-column quarters of a chunk of ``width`` codes. A full chunk (all but a block's last) is
// unrolled, so each `Codes16` folds to one extract with its immediate and no branch.
template <class F>
__attribute__((always_inline)) inline void ForQuarters(int64_t width, F&& f) {
  if (width == 64) {
    f(0), f(1), f(2), f(3);
    return;
  }
  for (int q = 0; q < width / 16; ++q) f(q);
}

// Weights16 / Other16 are forced inline: GCC left them out of line, and M=1 INT4 ran ~15% slower.
// 16 weights from their codes (int32 lanes). ``other``: the zero point (INT; 2^(bits-1) when symmetric) or s_neg
// (codebook; s_pos when symmetric).
__attribute__((always_inline)) inline __m512 Weights16(const Problem& p, __m512i c, __m512 pos, __m512 other, __m512 table) {
  __m512 w;
  if (p.is_int) {
    w = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(c), other), pos);
  } else {  // the level by one permute of the 16-entry table in a register; the scale by the level's sign
    const __mmask16 is_neg = _mm512_cmplt_epu32_mask(c, _mm512_set1_epi32(static_cast<int>(p.n_negative)));
    w = _mm512_mul_ps(_mm512_permutexvar_ps(c, table), _mm512_mask_blend_ps(is_neg, pos, other));
  }
  if (p.round_bf16) w = RoundBf16(w);
  return w;
}

// The ``other`` of `Weights16` for the 16 columns at ``at`` (an offset into the scale arrays).
__attribute__((always_inline)) inline __m512 Other16(const Problem& p, int64_t at) {
  if (p.is_int) return p.has_zero ? _mm512_loadu_ps(p.zero + at) : _mm512_set1_ps(static_cast<float>(1 << (p.bits - 1)));
  return _mm512_loadu_ps((p.has_neg ? p.neg : p.pos) + at);
}

// f(col, w) for the weights of row k, columns [n0 + col, n0 + col + 16), col = 0, 16, ... < nb (a multiple of 16),
// decoded 64 codes per load; ``base``: the row's group's offset into the scale arrays, at column n0.
template <class F>
__attribute__((always_inline)) inline void RowWeights16(const Problem& p, int64_t k, int64_t n0, int64_t nb,
                                                        int64_t base, __m512 table, F&& f) {
  const RowRef row = RowOf(p, k);
  for (int64_t c0 = 0; c0 < nb; c0 += 64) {
    const int64_t width = std::min<int64_t>(64, nb - c0);
    PrefetchAhead(row, n0 + c0);
    const __m512i codes = RowCodes64(row, n0 + c0, width);
    ForQuarters(width, [&](int q) __attribute__((always_inline)) {
      const int64_t col = c0 + 16 * q;
      f(col, Weights16(p, Codes16(codes, q), _mm512_loadu_ps(p.pos + base + col), Other16(p, base + col), table));
    });
  }
}

// Columns [n0, n0 + nb) (nb <= kWideN, a multiple of 16), x rows [i0, i0 + MI): rows in K order, each row's nb
// code bytes decoded 64 at a time into float32 accumulators in L1. Out of line: inlined into Wide, the M = 1
// INT4 loop ran 15-20% slower (min of 200 calls).
template <int MI>
__attribute__((noinline)) void BlockWide(const Problem& p, int64_t n0, int64_t nb, int64_t i0) {
  alignas(64) float acc[MI][kWideN] = {};
  const __m512 table = _mm512_loadu_ps(p.table);
  for (int64_t g0 = 0; g0 < p.k; g0 += p.group) {
    const int64_t base = (g0 / p.group) * p.n + n0, g1 = std::min(g0 + p.group, p.k);
    for (int64_t k = g0; k < g1; ++k) {
      __m512 xv[MI];
      for (int i = 0; i < MI; ++i) xv[i] = _mm512_set1_ps(p.x[(i0 + i) * p.k + k]);
      RowWeights16(p, k, n0, nb, base, table, [&](int64_t col, __m512 w) __attribute__((always_inline)) {
        for (int i = 0; i < MI; ++i)
          _mm512_store_ps(acc[i] + col, _mm512_fmadd_ps(xv[i], w, _mm512_load_ps(acc[i] + col)));
      });
    }
  }
  for (int i = 0; i < MI; ++i) std::copy(acc[i], acc[i] + nb, p.y + (i0 + i) * p.n + n0);
}

// Panel path (M >= kPanelMinM): K in chunks of kChunk rows. A chunk's weights for the block's nb columns are
// decoded once into a float buffer (up to 64 KiB, L2), then a register-tiled micro-kernel (up to kMicroRows x rows
// by 64 columns: 24 accumulators, 4 weight loads and kMicroRows broadcasts per 24 FMAs; 16 columns for the block's
// last nb mod 64) adds the chunk into the float32 accumulators of every x row. Each code row is read for all nb
// columns at once (up to 8 cache lines in one page) instead of 16 columns per pass over K, and the decode is paid
// once per weight whatever M is. Sums stay in K order, as in the other paths.
constexpr int64_t kChunk = 32;
constexpr int kMicroRows = 6;
constexpr int64_t kPanelMinM = 5;  // measured: M = 4 is faster in BlockWide, M = 5 here

// Columns [c, c + 16 J) of the chunk, x rows [i0, i0 + MI).
template <int MI, int J>
void MicroTile(const Problem& p, const float* w, int64_t kc, int64_t k0, int64_t i0, int64_t c, float* acc) {
  __m512 a[MI][J];
  for (int i = 0; i < MI; ++i)
    for (int j = 0; j < J; ++j) a[i][j] = _mm512_loadu_ps(acc + (i0 + i) * kWideN + c + 16 * j);
  const float* x = p.x + i0 * p.k + k0;
  for (int64_t kk = 0; kk < kc; ++kk) {
    const float* wr = w + kk * kWideN + c;
    __m512 wv[J];
    for (int j = 0; j < J; ++j) wv[j] = _mm512_loadu_ps(wr + 16 * j);  // unaligned forms: same speed
    for (int i = 0; i < MI; ++i) {
      const __m512 xb = _mm512_set1_ps(x[i * p.k + kk]);
      for (int j = 0; j < J; ++j) a[i][j] = _mm512_fmadd_ps(xb, wv[j], a[i][j]);
    }
  }
  for (int i = 0; i < MI; ++i)
    for (int j = 0; j < J; ++j) _mm512_storeu_ps(acc + (i0 + i) * kWideN + c + 16 * j, a[i][j]);
}

template <int MI>
void MicroPanel(const Problem& p, const float* w, int64_t nb, int64_t kc, int64_t k0, int64_t i0, float* acc) {
  int64_t c = 0;
  for (; c + 64 <= nb; c += 64) MicroTile<MI, 4>(p, w, kc, k0, i0, c, acc);
  for (; c < nb; c += 16) MicroTile<MI, 1>(p, w, kc, k0, i0, c, acc);
}

__attribute__((noinline)) void BlockPanel(const Problem& p, int64_t n0, int64_t nb) {
  alignas(64) static thread_local float w[kChunk * kWideN];
  std::vector<float> acc(p.m * kWideN, 0.0f);
  const __m512 table = _mm512_loadu_ps(p.table);
  for (int64_t k0 = 0; k0 < p.k; k0 += kChunk) {
    const int64_t kc = std::min(kChunk, p.k - k0);
    for (int64_t kk = 0; kk < kc; ++kk) {
      const int64_t k = k0 + kk;
      RowWeights16(p, k, n0, nb, (k / p.group) * p.n + n0, table,
                   [&](int64_t col, __m512 wv) __attribute__((always_inline)) {
                     _mm512_storeu_ps(w + kk * kWideN + col, wv);
                   });
    }
    int64_t i = 0;
    for (; i + kMicroRows <= p.m; i += kMicroRows) MicroPanel<kMicroRows>(p, w, nb, kc, k0, i, acc.data());
    switch (p.m - i) {
      case 5: MicroPanel<5>(p, w, nb, kc, k0, i, acc.data()); break;
      case 4: MicroPanel<4>(p, w, nb, kc, k0, i, acc.data()); break;
      case 3: MicroPanel<3>(p, w, nb, kc, k0, i, acc.data()); break;
      case 2: MicroPanel<2>(p, w, nb, kc, k0, i, acc.data()); break;
      case 1: MicroPanel<1>(p, w, nb, kc, k0, i, acc.data()); break;
      default: break;
    }
  }
  for (int64_t i = 0; i < p.m; ++i) std::copy(acc.begin() + i * kWideN, acc.begin() + i * kWideN + nb, p.y + i * p.n + n0);
}

// Post-scaled path (M <= kScaledMaxM, float32 x): per group and strip of up to 64 columns, the code -> level
// products accumulate in registers, and the group's scales are applied once per strip:
//   codebook: y += s_pos * sum_k x_k level+(c_k) + s_neg * sum_k x_k level-(c_k)   (level+ / level-: the
//             non-negative / negative levels, the others zero; symmetric: y += s * sum_k x_k level(c_k))
//   INT:      y += s * sum_k x_k (c_k - zero)
// The per-weight work is the decode and one FMA per x row (two for AFPQ): no scale loads, select or multiply and
// no accumulator load / store. Numerics differ from the row-walking path: a weight is not first rounded as
// level * scale, and the sums add per group, then across groups (tested to the same bound). bfloat16 x, whose
// contract rounds each weight to bfloat16, keeps the row-walking path.
constexpr int64_t kScaledMaxM = 2;  // 2 x rows x 4 vectors x 2 accumulators = 16 of the 32 registers
enum Kind { kIntKind, kCodebookKind, kAsymCodebookKind };

// One strip: columns [n0 + c0, n0 + c0 + 16 NQ) over the K rows [g0, g1) of one group, x rows [0, MI), added into
// acc (the block's accumulators, columns counted from n0).
template <int MI, int NQ, int KIND>
__attribute__((always_inline)) inline void Strip(const Problem& p, int64_t n0, int64_t c0, int64_t g0, int64_t g1,
                                                 __m512 t_pos, __m512 t_neg, float (*acc)[kWideN],
                                                 int64_t next_lo, int64_t next_hi) {
  const int64_t base = (g0 / p.group) * p.n + n0 + c0;
  __m512 a[MI][NQ], b[MI][NQ], zero[NQ];
  for (int i = 0; i < MI; ++i)
    for (int q = 0; q < NQ; ++q) a[i][q] = b[i][q] = _mm512_setzero_ps();
  if (KIND == kIntKind)
    for (int q = 0; q < NQ; ++q) zero[q] = Other16(p, base + 16 * q);
  for (int64_t k = g0; k < g1; ++k) {
    const RowRef row = RowOf(p, k);
    PrefetchAhead(row, n0 + c0);
    _mm_prefetch(reinterpret_cast<const char*>(row.lo + n0 + c0 + next_lo), _MM_HINT_T0);
    if (row.hi != nullptr) _mm_prefetch(reinterpret_cast<const char*>(row.hi + n0 + c0 + next_hi), _MM_HINT_T0);
    const __m512i codes = RowCodes64(row, n0 + c0, 16 * NQ);
    __m512 xv[MI];
    for (int i = 0; i < MI; ++i) xv[i] = _mm512_set1_ps(p.x[i * p.k + k]);
    for (int q = 0; q < NQ; ++q) {
      const __m512i c = Codes16(codes, q);
      if (KIND == kIntKind) {
        const __m512 w = _mm512_sub_ps(_mm512_cvtepi32_ps(c), zero[q]);
        for (int i = 0; i < MI; ++i) a[i][q] = _mm512_fmadd_ps(xv[i], w, a[i][q]);
      } else {
        const __m512 w = _mm512_permutexvar_ps(c, t_pos);
        for (int i = 0; i < MI; ++i) a[i][q] = _mm512_fmadd_ps(xv[i], w, a[i][q]);
        if (KIND == kAsymCodebookKind) {
          const __m512 wn = _mm512_permutexvar_ps(c, t_neg);
          for (int i = 0; i < MI; ++i) b[i][q] = _mm512_fmadd_ps(xv[i], wn, b[i][q]);
        }
      }
    }
  }
  for (int q = 0; q < NQ; ++q) {
    const __m512 pos = _mm512_loadu_ps(p.pos + base + 16 * q);
    const __m512 neg = KIND == kAsymCodebookKind ? _mm512_loadu_ps(p.neg + base + 16 * q) : pos;
    for (int i = 0; i < MI; ++i) {
      float* out = acc[i] + c0 + 16 * q;
      __m512 r = _mm512_fmadd_ps(a[i][q], pos, _mm512_load_ps(out));
      if (KIND == kAsymCodebookKind) r = _mm512_fmadd_ps(b[i][q], neg, r);
      _mm512_store_ps(out, r);
    }
  }
}

template <int MI, int KIND>
__attribute__((noinline)) void BlockScaled(const Problem& p, int64_t n0, int64_t nb) {
  alignas(64) float acc[MI][kWideN] = {};
  alignas(64) float pos_levels[16], neg_levels[16];  // AFPQ: each sign's levels, the other sign's zeroed
  for (int j = 0; j < 16; ++j) {
    const bool negative = j < p.n_negative;
    pos_levels[j] = KIND == kAsymCodebookKind && negative ? 0.0f : p.table[j];
    neg_levels[j] = negative ? p.table[j] : 0.0f;
  }
  const __m512 t_pos = _mm512_load_ps(pos_levels), t_neg = _mm512_load_ps(neg_levels);
  // Each row also fetches the line the next strip reads: the same row 64 columns on, or after a block's last
  // strip, the next group's row at the block's first column (a hint: past the end it fetches nothing useful).
  const int64_t lo_rows = p.bits == 3 ? p.group / 4 : p.group * p.bits / 8, hi_rows = p.group / 8;
  for (int64_t g0 = 0; g0 < p.k; g0 += p.group) {
    const int64_t g1 = std::min(g0 + p.group, p.k);
    for (int64_t c0 = 0; c0 < nb; c0 += 64) {
      const bool last = c0 + 64 >= nb;
      const int64_t next_lo = last ? lo_rows * p.n - c0 : 64, next_hi = last ? hi_rows * p.n - c0 : 64;
      switch (std::min<int64_t>(64, nb - c0) / 16) {
        case 4: Strip<MI, 4, KIND>(p, n0, c0, g0, g1, t_pos, t_neg, acc, next_lo, next_hi); break;
        case 3: Strip<MI, 3, KIND>(p, n0, c0, g0, g1, t_pos, t_neg, acc, next_lo, next_hi); break;
        case 2: Strip<MI, 2, KIND>(p, n0, c0, g0, g1, t_pos, t_neg, acc, next_lo, next_hi); break;
        default: Strip<MI, 1, KIND>(p, n0, c0, g0, g1, t_pos, t_neg, acc, next_lo, next_hi); break;
      }
    }
  }
  for (int i = 0; i < MI; ++i) std::copy(acc[i], acc[i] + nb, p.y + i * p.n + n0);
}

template <int MI>
void Scaled(const Problem& p, int64_t n0, int64_t nb) {
  if (p.is_int) return BlockScaled<MI, kIntKind>(p, n0, nb);
  if (p.has_neg) return BlockScaled<MI, kAsymCodebookKind>(p, n0, nb);
  BlockScaled<MI, kCodebookKind>(p, n0, nb);
}

void Wide(const Problem& p, int64_t n0, int64_t nb) {
  if (p.m >= kPanelMinM) return BlockPanel(p, n0, nb);
  if (p.m <= kScaledMaxM && !p.round_bf16) return p.m == 1 ? Scaled<1>(p, n0, nb) : Scaled<2>(p, n0, nb);
  int64_t i = 0;
  for (; i + 4 <= p.m; i += 4) BlockWide<4>(p, n0, nb, i);
  switch (p.m - i) {
    case 3: BlockWide<3>(p, n0, nb, i); break;
    case 2: BlockWide<2>(p, n0, nb, i); break;
    case 1: BlockWide<1>(p, n0, nb, i); break;
    default: break;
  }
}
#else
constexpr bool kWide = false;
constexpr int64_t kWideN = kBlockN;
void Wide(const Problem&, int64_t, int64_t) {}
#endif

// Column ranges [n0, n0 + nb), one per task.
struct Span {
  int64_t n0, nb;
};

// The tasks: the fewest blocks of at most kWideN columns (kBlockN on the portable path), their count rounded up
// to a multiple of the threads, the columns split evenly among them in units of 16 (AVX-512) and no narrower
// than 64 where N allows; on AVX-512 the last N mod 16 columns are one more (portable) task. SmolLM2 on 2 threads:
// N = 576 is two tasks of 288 columns, not 512 + 64; N = 192 two of 96, not one portable block.
std::vector<Span> Tasks(int64_t n, int64_t threads) {
  const int64_t unit = kWide ? 16 : 1, cap = kWide ? kWideN : kBlockN;
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

void RunTask(const Problem& p, const Span& s) {
  if (kWide && s.nb % 16 == 0) {
    Wide(p, s.n0, s.nb);
  } else {
    ColumnBlock(p, s.n0, s.nb);
  }
}

// Runs every task, on XLA's intra-op thread pool when it has more than one thread. The tasks are claimed from a
// shared counter by this thread and by helpers scheduled on the pool, and this thread waits only for tasks that
// were claimed, never for a helper to start: the pool's threads may all be busy elsewhere (with 4 simulated CPU
// devices, a call that waited for its queued helper never returned). A helper that starts after every task is
// claimed touches only the state it co-owns (`Shared`), so it may outlive this call.
void RunBlocks(const Problem& p, ffi::ThreadPool& pool) {
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

ffi::Error QuantizedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                           ffi::Buffer<ffi::F32> pos, ffi::Buffer<ffi::F32> neg, ffi::Buffer<ffi::F32> zero,
                           ffi::ResultBuffer<ffi::F32> y, int64_t bits, int64_t group, bool is_int,
                           bool has_neg, bool has_zero, bool round_bf16, ffi::Span<const float> table) {
  const auto xd = x.dimensions();
  const auto cd = codes.dimensions();
  if (xd.size() != 2 || cd.size() != 2) return ffi::Error::InvalidArgument("x and codes must be 2-D");
  Problem p{};
  p.m = xd[0];
  p.k = xd[1];
  p.n = cd[1];
  p.bits = bits;
  p.group = group;
  p.kp = (p.k + 7) / 8 * 8;
  if (bits < 1 || bits > 8 || (8 % bits != 0 && bits != 3)) return ffi::Error::InvalidArgument("bad bits");
  if (cd[0] != p.kp * bits / 8) return ffi::Error::InvalidArgument("codes rows do not match K and bits");
  if (table.size() == 0 || table.size() > 16) return ffi::Error::InvalidArgument("the code book needs 1 to 16 levels");
  if (group < 1) return ffi::Error::InvalidArgument("group must be >= 1");
  const int64_t groups = (p.k + group - 1) / group;
  const auto has_shape = [&](ffi::Buffer<ffi::F32>& b, bool used) {
    const auto d = b.dimensions();
    return d.size() == 2 && (used ? d[0] == groups && d[1] == p.n : d[0] == 1 && d[1] == 1);
  };
  if (!has_shape(pos, true) || !has_shape(neg, has_neg) || !has_shape(zero, has_zero))
    return ffi::Error::InvalidArgument("scales must be (ceil(K / group), N), unused ones (1, 1)");
  if (p.m == 0 || p.n == 0) return ffi::Error::Success();  // nothing to compute (the paths assume a row)
  p.is_int = is_int;
  p.has_neg = has_neg;
  p.has_zero = has_zero;
  p.round_bf16 = round_bf16;
  std::fill(p.table, p.table + 16, table.back());
  std::copy(table.begin(), table.end(), p.table);
  p.n_negative = std::count_if(table.begin(), table.end(), [](float v) { return v < 0; });  // levels ascend
  p.x = x.typed_data();
  p.codes = codes.typed_data();
  p.pos = pos.typed_data();
  p.neg = neg.typed_data();
  p.zero = zero.typed_data();
  p.y = y->typed_data();
  RunBlocks(p, pool);
  return ffi::Error::Success();
}

}  // namespace

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

// The SIMD path of the CPU quantized matmul, written once over a vector ISA's traits (`isa_avx512.h`,
// `isa_avx2.h`, `isa_neon.h`; included by kernel.h for the ISA the compiler targets). An ISA gives:
//   W (floats per vector); kScaledMaxM, kMicroRows, kMicroVecs (register budgets of the paths below);
//   F (W floats), I (W codes as 32-bit lanes), Chunk (4 W codes, one per byte), Table (the 16
//   code-book levels in registers);
//   Zero, Set1, Load, Store, Fma (a * b + c), Mul, Sub, ToFloat (I -> F), LoadTable, Lookup (I -> levels),
//   ScaleFor (per lane, s_neg where the code's level is negative, else s_pos: by code < n_negative, or on AVX2 by
//   the level's sign bit, which also sends a -0.0 level to s_neg: a zero weight either way), RoundBf16 (as
//   afpq::RoundBf16, per lane), Prefetch,
//   LoadCodes (a row's codes for up to 4 W columns, never reading past them), Part (codes [q W, q W + W) of a
//   chunk as I); kSplitBySign: the post-scaled AFPQ path looks the level up once and splits it by its sign
//   (NegativePart: the level where negative, else zero) instead of looking up two half tables.
// Every per-vector helper is forced inline: GCC left AVX-512's weight decode out of line, and M = 1 INT4 ran
// ~15% slower. The block functions are kept out of line: inlined into their dispatcher, the AVX-512 M = 1 INT4
// loop ran 15-20% slower (min of 200 calls).
#pragma once

namespace afpq {

template <class Isa>
struct Blocks {
  using F = typename Isa::F;
  using I = typename Isa::I;
  using Chunk = typename Isa::Chunk;
  using Table = typename Isa::Table;
  static constexpr int W = Isa::W;
  static constexpr int64_t kChunkCols = 4 * W;  // codes per load

  static AFPQ_INLINE void PrefetchAhead(const RowRef& r, int64_t col) {
    Isa::Prefetch(r.lo_ahead + col);
    if (r.hi != nullptr) Isa::Prefetch(r.hi_ahead + col);
  }

  // f(q) for the vectors of a chunk of ``width`` codes. A full chunk (all but a block's last) is unrolled, so each
  // `Part` folds to its constant lane offset and no branch.
  template <class Fn>
  static AFPQ_INLINE void ForParts(int64_t width, Fn&& f) {
    if (width == kChunkCols) {
      f(0), f(1), f(2), f(3);
      return;
    }
    for (int q = 0; q < width / W; ++q) f(q);
  }

  // W weights from their codes. ``other``: the zero point (INT; 2^(bits-1) when symmetric) or s_neg (codebook;
  // s_pos when symmetric).
  template <bool INT, bool ROUND>
  static AFPQ_INLINE F Weights(const Problem& p, I c, F pos, F other, const Table& table) {
    F w;
    if (INT) {
      w = Isa::Mul(Isa::Sub(Isa::ToFloat(c), other), pos);
    } else {  // the level by a register lookup; the scale by the level's sign
      const F level = Isa::Lookup(c, table);
      w = Isa::Mul(level, Isa::ScaleFor(c, level, static_cast<int>(p.n_negative), other, pos));
    }
    if (ROUND) w = Isa::RoundBf16(w);
    return w;
  }

  // The ``other`` of `Weights` for the W columns at ``at`` (an offset into the scale arrays).
  template <bool INT>
  static AFPQ_INLINE F Other(const Problem& p, int64_t at) {
    if (INT) return p.has_zero ? Isa::Load(p.zero + at) : Isa::Set1(static_cast<float>(1 << (p.bits - 1)));
    return Isa::Load((p.has_neg ? p.neg : p.pos) + at);
  }

  // f(col, w) for the weights of row k, columns [n0 + col, n0 + col + W), col = 0, W, ... < nb (a multiple of W),
  // decoded a chunk per load; ``base``: the row's group's offset into the scale arrays, at column n0.
  template <bool INT, bool ROUND, class Fn>
  static AFPQ_INLINE void RowWeights(const Problem& p, int64_t k, int64_t n0, int64_t nb, int64_t base,
                                     const Table& table, Fn&& f) {
    const RowRef row = RowOf(p, k);
    for (int64_t c0 = 0; c0 < nb; c0 += kChunkCols) {
      const int64_t width = std::min<int64_t>(kChunkCols, nb - c0);
      PrefetchAhead(row, n0 + c0);
      const Chunk codes = Isa::LoadCodes(row, n0 + c0, static_cast<int>(width));
      ForParts(width, [&](int q) __attribute__((always_inline)) {
        const int64_t col = c0 + W * q;
        f(col, Weights<INT, ROUND>(p, Isa::Part(codes, q), Isa::Load(p.pos + base + col), Other<INT>(p, base + col),
                                   table));
      });
    }
  }

  // Columns [n0, n0 + nb) (nb <= kWideN, a multiple of W), x rows [i0, i0 + MI): rows in K order, each row's nb
  // code bytes decoded a chunk at a time into float32 accumulators in L1.
  template <int MI, bool INT, bool ROUND>
  __attribute__((noinline)) static void BlockWide(const Problem& p, int64_t n0, int64_t nb, int64_t i0) {
    alignas(64) float acc[MI][kWideN] = {};
    const Table table = Isa::LoadTable(p.table);
    for (int64_t g0 = 0; g0 < p.k; g0 += p.group) {
      const int64_t base = (g0 / p.group) * p.n + n0, g1 = std::min(g0 + p.group, p.k);
      for (int64_t k = g0; k < g1; ++k) {
        F xv[MI];
        for (int i = 0; i < MI; ++i) xv[i] = Isa::Set1(p.x[(i0 + i) * p.k + k]);
        RowWeights<INT, ROUND>(p, k, n0, nb, base, table, [&](int64_t col, F w) __attribute__((always_inline)) {
          for (int i = 0; i < MI; ++i) Isa::Store(acc[i] + col, Isa::Fma(xv[i], w, Isa::Load(acc[i] + col)));
        });
      }
    }
    for (int i = 0; i < MI; ++i) std::copy(acc[i], acc[i] + nb, p.y + (i0 + i) * p.n + n0);
  }

  // Panel path (M >= kPanelMinM): K in chunks of kChunk rows. A chunk's weights for the block's nb columns are
  // decoded once into a float buffer (up to 64 KiB, L2), then a register-tiled micro-kernel (up to kMicroRows x
  // rows by kMicroVecs vectors; one vector for the block's last columns) adds the chunk into the float32
  // accumulators of every x row. Each code row is read for all nb columns at once instead of a strip per pass
  // over K, and the decode is paid once per weight whatever M is. Sums stay in K order, as in the other paths.
  static constexpr int64_t kChunk = 32;
  static constexpr int64_t kPanelMinM = 5;  // measured on AVX-512: M = 4 is faster in BlockWide, M = 5 here

  // Columns [c, c + J W) of the chunk, x rows [i0, i0 + MI).
  template <int MI, int J>
  static void MicroTile(const Problem& p, const float* w, int64_t kc, int64_t k0, int64_t i0, int64_t c,
                        float* acc) {
    F a[MI][J];
    for (int i = 0; i < MI; ++i)
      for (int j = 0; j < J; ++j) a[i][j] = Isa::Load(acc + (i0 + i) * kWideN + c + W * j);
    const float* x = p.x + i0 * p.k + k0;
    for (int64_t kk = 0; kk < kc; ++kk) {
      const float* wr = w + kk * kWideN + c;
      F wv[J];
      for (int j = 0; j < J; ++j) wv[j] = Isa::Load(wr + W * j);
      for (int i = 0; i < MI; ++i) {
        const F xb = Isa::Set1(x[i * p.k + kk]);
        for (int j = 0; j < J; ++j) a[i][j] = Isa::Fma(xb, wv[j], a[i][j]);
      }
    }
    for (int i = 0; i < MI; ++i)
      for (int j = 0; j < J; ++j) Isa::Store(acc + (i0 + i) * kWideN + c + W * j, a[i][j]);
  }

  template <int MI>
  static void MicroPanel(const Problem& p, const float* w, int64_t nb, int64_t kc, int64_t k0, int64_t i0,
                         float* acc) {
    constexpr int64_t kTile = Isa::kMicroVecs * W;
    int64_t c = 0;
    for (; c + kTile <= nb; c += kTile) MicroTile<MI, Isa::kMicroVecs>(p, w, kc, k0, i0, c, acc);
    for (; c < nb; c += W) MicroTile<MI, 1>(p, w, kc, k0, i0, c, acc);
  }

  // x rows [i, m) in micro panels of kMicroRows rows, the last one shorter.
  template <int MI>
  static AFPQ_INLINE void MicroPanels(const Problem& p, const float* w, int64_t nb, int64_t kc, int64_t k0,
                                      int64_t i, float* acc) {
    if constexpr (MI == Isa::kMicroRows) {
      for (; i + MI <= p.m; i += MI) MicroPanel<MI>(p, w, nb, kc, k0, i, acc);
      if (i < p.m) MicroPanels<MI - 1>(p, w, nb, kc, k0, i, acc);
    } else if constexpr (MI >= 1) {
      if (p.m - i == MI) return MicroPanel<MI>(p, w, nb, kc, k0, i, acc);
      MicroPanels<MI - 1>(p, w, nb, kc, k0, i, acc);
    }
  }

  template <bool INT, bool ROUND>
  __attribute__((noinline)) static void BlockPanel(const Problem& p, int64_t n0, int64_t nb) {
    alignas(64) static thread_local float w[kChunk * kWideN];
    std::vector<float> acc(p.m * kWideN, 0.0f);
    const Table table = Isa::LoadTable(p.table);
    for (int64_t k0 = 0; k0 < p.k; k0 += kChunk) {
      const int64_t kc = std::min(kChunk, p.k - k0);
      for (int64_t kk = 0; kk < kc; ++kk) {
        const int64_t k = k0 + kk;
        RowWeights<INT, ROUND>(p, k, n0, nb, (k / p.group) * p.n + n0, table,
                               [&](int64_t col, F wv) __attribute__((always_inline)) {
                                 Isa::Store(w + kk * kWideN + col, wv);
                               });
      }
      MicroPanels<Isa::kMicroRows>(p, w, nb, kc, k0, 0, acc.data());
    }
    for (int64_t i = 0; i < p.m; ++i)
      std::copy(acc.begin() + i * kWideN, acc.begin() + i * kWideN + nb, p.y + i * p.n + n0);
  }

  // Post-scaled path (M <= Isa::kScaledMaxM, float32 x): per group and strip of up to a chunk of columns, the
  // code -> level products accumulate in registers, and the group's scales are applied once per strip:
  //   codebook: y += s_pos * sum_k x_k level+(c_k) + s_neg * sum_k x_k level-(c_k)   (level+ / level-: the
  //             non-negative / negative levels, the others zero; symmetric: y += s * sum_k x_k level(c_k))
  //   INT:      y += s * sum_k x_k (c_k - zero)
  // The per-weight work is the decode and one FMA per x row (two for AFPQ): no scale loads, select or multiply
  // and no accumulator load / store. Numerics differ from the row-walking path: a weight is not first rounded
  // as level * scale, and the sums add per group, then across groups (tested to the same bound). bfloat16 x,
  // whose contract rounds each weight to bfloat16, keeps the row-walking path.
  enum Kind { kIntKind, kCodebookKind, kAsymCodebookKind };

  // One strip: columns [n0 + c0, n0 + c0 + W NQ) over the K rows [g0, g1) of one group, x rows [0, MI), added
  // into acc (the block's accumulators, columns counted from n0).
  template <int MI, int NQ, int KIND>
  static AFPQ_INLINE void Strip(const Problem& p, int64_t n0, int64_t c0, int64_t g0, int64_t g1,
                                const Table& t_pos, const Table& t_neg, float (*acc)[kWideN], int64_t next_lo,
                                int64_t next_hi) {
    const int64_t base = (g0 / p.group) * p.n + n0 + c0;
    F a[MI][NQ], b[MI][NQ], zero[NQ];
    for (int i = 0; i < MI; ++i)
      for (int q = 0; q < NQ; ++q) a[i][q] = b[i][q] = Isa::Zero();
    if (KIND == kIntKind)
      for (int q = 0; q < NQ; ++q) zero[q] = Other<true>(p, base + W * q);
    for (int64_t k = g0; k < g1; ++k) {
      const RowRef row = RowOf(p, k);
      PrefetchAhead(row, n0 + c0);
      Isa::Prefetch(row.lo + n0 + c0 + next_lo);
      if (row.hi != nullptr) Isa::Prefetch(row.hi + n0 + c0 + next_hi);
      const Chunk codes = Isa::LoadCodes(row, n0 + c0, W * NQ);
      F xv[MI];
      for (int i = 0; i < MI; ++i) xv[i] = Isa::Set1(p.x[i * p.k + k]);
      for (int q = 0; q < NQ; ++q) {
        const I c = Isa::Part(codes, q);
        if (KIND == kIntKind) {
          const F w = Isa::Sub(Isa::ToFloat(c), zero[q]);
          for (int i = 0; i < MI; ++i) a[i][q] = Isa::Fma(xv[i], w, a[i][q]);
        } else {
          F w, wn;
          if constexpr (KIND == kAsymCodebookKind && Isa::kSplitBySign) {
            const F level = Isa::Lookup(c, t_pos);  // t_pos: the whole table here (see BlockScaled)
            wn = Isa::NegativePart(level);
            w = Isa::Sub(level, wn);  // exact: one of the two is zero
          } else {
            w = Isa::Lookup(c, t_pos);
            if (KIND == kAsymCodebookKind) wn = Isa::Lookup(c, t_neg);
          }
          for (int i = 0; i < MI; ++i) a[i][q] = Isa::Fma(xv[i], w, a[i][q]);
          if (KIND == kAsymCodebookKind)
            for (int i = 0; i < MI; ++i) b[i][q] = Isa::Fma(xv[i], wn, b[i][q]);
        }
      }
    }
    for (int q = 0; q < NQ; ++q) {
      const F pos = Isa::Load(p.pos + base + W * q);
      const F neg = KIND == kAsymCodebookKind ? Isa::Load(p.neg + base + W * q) : pos;
      for (int i = 0; i < MI; ++i) {
        float* out = acc[i] + c0 + W * q;
        F r = Isa::Fma(a[i][q], pos, Isa::Load(out));
        if (KIND == kAsymCodebookKind) r = Isa::Fma(b[i][q], neg, r);
        Isa::Store(out, r);
      }
    }
  }

  template <int MI, int KIND>
  __attribute__((noinline)) static void BlockScaled(const Problem& p, int64_t n0, int64_t nb) {
    alignas(64) float acc[MI][kWideN] = {};
    // AFPQ: each sign's levels, the other sign's zeroed; with kSplitBySign (a lookup costs more than a mask) the
    // whole table in t_pos, each level split by its sign after the one lookup.
    constexpr bool kTwoTables = KIND == kAsymCodebookKind && !Isa::kSplitBySign;
    alignas(64) float pos_levels[16], neg_levels[16];
    for (int j = 0; j < 16; ++j) {
      const bool negative = j < p.n_negative;
      pos_levels[j] = kTwoTables && negative ? 0.0f : p.table[j];
      neg_levels[j] = negative ? p.table[j] : 0.0f;
    }
    const Table t_pos = Isa::LoadTable(pos_levels), t_neg = Isa::LoadTable(neg_levels);
    // Each row also fetches the line the next strip reads: the same row a chunk on, or after a block's last
    // strip, the next group's row at the block's first column (a hint: past the end it fetches nothing useful).
    const int64_t lo_rows = p.bits == 3 ? p.group / 4 : p.group * p.bits / 8, hi_rows = p.group / 8;
    for (int64_t g0 = 0; g0 < p.k; g0 += p.group) {
      const int64_t g1 = std::min(g0 + p.group, p.k);
      for (int64_t c0 = 0; c0 < nb; c0 += kChunkCols) {
        const bool last = c0 + kChunkCols >= nb;
        const int64_t next_lo = last ? lo_rows * p.n - c0 : kChunkCols;
        const int64_t next_hi = last ? hi_rows * p.n - c0 : kChunkCols;
        switch (std::min<int64_t>(kChunkCols, nb - c0) / W) {
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
  static void Scaled(const Problem& p, int64_t n0, int64_t nb) {
    if (p.is_int) return BlockScaled<MI, kIntKind>(p, n0, nb);
    if (p.has_neg) return BlockScaled<MI, kAsymCodebookKind>(p, n0, nb);
    BlockScaled<MI, kCodebookKind>(p, n0, nb);
  }

  // x rows [i0, i0 + 4 k + r) in groups of 4 and one of r < 4, walked row by row (`BlockWide`).
  template <bool INT, bool ROUND>
  static void Wide(const Problem& p, int64_t n0, int64_t nb) {
    int64_t i = 0;
    for (; i + 4 <= p.m; i += 4) BlockWide<4, INT, ROUND>(p, n0, nb, i);
    switch (p.m - i) {
      case 3: BlockWide<3, INT, ROUND>(p, n0, nb, i); break;
      case 2: BlockWide<2, INT, ROUND>(p, n0, nb, i); break;
      case 1: BlockWide<1, INT, ROUND>(p, n0, nb, i); break;
      default: break;
    }
  }

  // The decode's kind (INT or code book; bfloat16 weights or not) as template arguments, so the per-vector
  // decode carries no branch on them.
  template <bool INT, bool ROUND>
  static void Decoded(const Problem& p, int64_t n0, int64_t nb) {
    if (p.m >= kPanelMinM) return BlockPanel<INT, ROUND>(p, n0, nb);
    Wide<INT, ROUND>(p, n0, nb);
  }

  // Columns [n0, n0 + nb) (a multiple of W, at most kWideN), every row of x.
  static void Run(const Problem& p, int64_t n0, int64_t nb) {
    static_assert(Isa::kScaledMaxM >= 1 && Isa::kScaledMaxM <= 2, "the post-scaled path has 1- and 2-row forms");
    if (p.m < kPanelMinM && p.m <= Isa::kScaledMaxM && !p.round_bf16) {
      if constexpr (Isa::kScaledMaxM >= 2) {
        if (p.m == 2) return Scaled<2>(p, n0, nb);
      }
      return Scaled<1>(p, n0, nb);
    }
    if (p.is_int) return p.round_bf16 ? Decoded<true, true>(p, n0, nb) : Decoded<true, false>(p, n0, nb);
    return p.round_bf16 ? Decoded<false, true>(p, n0, nb) : Decoded<false, false>(p, n0, nb);
  }
};

}  // namespace afpq

// AVX2 + FMA traits for simd_blocks.h (x86-64-v3: AMD Zen 1-3, Intel client CPUs without AVX-512): 8 floats per
// vector, 32 codes per load, the 16-entry code book in two registers, looked up by two 8-entry permutes and a
// blend on the code's bit 3 (AVX2 has no 16-entry float permute).
#pragma once

#include <immintrin.h>

#define AFPQ_SIMD_ISA "avx2"

namespace afpq {

struct Isa {
  static constexpr int W = 8;
  // 16 registers: the post-scaled AFPQ strip holds 4 + 4 accumulators per x row and a 2-register table; at
  // M = 2 it spilled (NF4-asym 7.08 ms against 3.31 for the row walk, single thread, K = N = 4096).
  static constexpr int kScaledMaxM = 1;
  static constexpr int kMicroRows = 6;  // 6 x 2 accumulators, 2 weight loads and 6 broadcasts per 12 FMAs
  static constexpr int kMicroVecs = 2;
  static constexpr bool kSplitBySign = true;  // a lookup is 2 permutes + a blend; the split 2 cheap ops + a subtract
  using F = __m256;
  using I = __m256i;
  using Chunk = __m256i;
  struct Table {
    __m256 lo, hi;  // levels 0-7, 8-15
  };

  static AFPQ_INLINE F Zero() { return _mm256_setzero_ps(); }
  static AFPQ_INLINE F Set1(float v) { return _mm256_set1_ps(v); }
  static AFPQ_INLINE F Load(const float* p) { return _mm256_loadu_ps(p); }
  static AFPQ_INLINE void Store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static AFPQ_INLINE F Fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static AFPQ_INLINE F Mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static AFPQ_INLINE F Sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static AFPQ_INLINE F ToFloat(I c) { return _mm256_cvtepi32_ps(c); }
  static AFPQ_INLINE Table LoadTable(const float* t) { return {_mm256_loadu_ps(t), _mm256_loadu_ps(t + 8)}; }
  static AFPQ_INLINE F Lookup(I c, const Table& t) {  // permutes use the low 3 bits; bit 3 picks the half
    const __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(c, 28));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.lo, c), _mm256_permutevar8x32_ps(t.hi, c), upper);
  }
  // blendv reads the sign bit: the level's own (a -0.0 level takes s_neg: its weight is a zero all the same).
  static AFPQ_INLINE F ScaleFor(I, F level, int, F neg, F pos) { return _mm256_blendv_ps(pos, neg, level); }
  static AFPQ_INLINE F NegativePart(F level) {  // the sign bit spread over the lane, as a mask
    return _mm256_and_ps(level, _mm256_castsi256_ps(_mm256_srai_epi32(_mm256_castps_si256(level), 31)));
  }
  static AFPQ_INLINE void Prefetch(const void* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }

  static AFPQ_INLINE F RoundBf16(F w) {
    const __m256i u = _mm256_castps_si256(w);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }

  // Up to 32 bytes at p; a short chunk (a block's last) through a zeroed copy, never reading past it.
  static AFPQ_INLINE __m256i LoadBytes(const uint8_t* p, int width) {
    if (width == 32) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    alignas(32) uint8_t buf[32] = {};
    std::memcpy(buf, p, width);
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
  }

  static AFPQ_INLINE Chunk LoadCodes(const RowRef& r, int64_t col, int width) {
    const __m256i lo = _mm256_and_si256(
        _mm256_srl_epi16(LoadBytes(r.lo + col, width), _mm_cvtsi32_si128(r.lo_shift)),
        _mm256_set1_epi8(static_cast<char>(r.lo_mask)));
    if (r.hi == nullptr) return lo;
    const __m256i h = _mm256_and_si256(
        _mm256_srl_epi16(LoadBytes(r.hi + col, width), _mm_cvtsi32_si128(r.hi_shift)), _mm256_set1_epi8(1));
    return _mm256_or_si256(lo, _mm256_slli_epi16(h, 2));  // bytes of 0 / 1: nothing crosses a byte
  }

  // Codes [8 q, 8 q + 8) of 32.
  static AFPQ_INLINE I Part(Chunk codes, int q) {
    switch (q) {
      case 0: return _mm256_cvtepu8_epi32(_mm256_castsi256_si128(codes));
      case 1: return _mm256_cvtepu8_epi32(_mm_srli_si128(_mm256_castsi256_si128(codes), 8));
      case 2: return _mm256_cvtepu8_epi32(_mm256_extracti128_si256(codes, 1));
      default: return _mm256_cvtepu8_epi32(_mm_srli_si128(_mm256_extracti128_si256(codes, 1), 8));
    }
  }
};

}  // namespace afpq

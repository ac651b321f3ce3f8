// AVX-512 (F + BW) traits for simd_blocks.h: 16 floats per vector, 64 codes per load (a masked load for a
// block's last, shorter chunk), the 16-entry code book in one register, looked up by one permute.
#pragma once

#include <immintrin.h>

#define AFPQ_SIMD_ISA "avx512"

namespace afpq {

struct Isa {
  static constexpr int W = 16;
  static constexpr int kScaledMaxM = 2;  // 2 x rows x 4 vectors x 2 accumulators = 16 of the 32 registers
  static constexpr int kMicroRows = 6;   // 6 x 4 accumulators, 4 weight loads and 6 broadcasts per 24 FMAs
  static constexpr int kMicroVecs = 4;
  static constexpr bool kSplitBySign = false;  // a lookup is one permute: two half tables
  using F = __m512;
  using I = __m512i;
  using Chunk = __m512i;
  using Table = __m512;

  static AFPQ_INLINE F Zero() { return _mm512_setzero_ps(); }
  static AFPQ_INLINE F Set1(float v) { return _mm512_set1_ps(v); }
  static AFPQ_INLINE F Load(const float* p) { return _mm512_loadu_ps(p); }  // unaligned forms: same speed
  static AFPQ_INLINE void Store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static AFPQ_INLINE F Fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static AFPQ_INLINE F Mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static AFPQ_INLINE F Sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static AFPQ_INLINE F ToFloat(I c) { return _mm512_cvtepi32_ps(c); }
  static AFPQ_INLINE Table LoadTable(const float* t) { return _mm512_loadu_ps(t); }
  static AFPQ_INLINE F Lookup(I c, Table t) { return _mm512_permutexvar_ps(c, t); }
  static AFPQ_INLINE F ScaleFor(I c, F, int n_negative, F neg, F pos) {  // codes below n_negative: negative
    return _mm512_mask_blend_ps(_mm512_cmplt_epu32_mask(c, _mm512_set1_epi32(n_negative)), pos, neg);
  }
  static AFPQ_INLINE void Prefetch(const void* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }

  static AFPQ_INLINE F RoundBf16(F w) {
    const __m512i u = _mm512_castps_si512(w);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }

  // Up to 64 bytes at p; a short chunk by a masked load, which never reads past it.
  static AFPQ_INLINE __m512i LoadBytes(const uint8_t* p, int width) {
    return width == 64 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(~0ULL >> (64 - width), p);
  }

  static AFPQ_INLINE Chunk LoadCodes(const RowRef& r, int64_t col, int width) {
    const __m512i lo = _mm512_and_si512(
        _mm512_srl_epi16(LoadBytes(r.lo + col, width), _mm_cvtsi32_si128(r.lo_shift)),
        _mm512_set1_epi8(static_cast<char>(r.lo_mask)));
    if (r.hi == nullptr) return lo;
    const __m512i h = _mm512_and_si512(
        _mm512_srl_epi16(LoadBytes(r.hi + col, width), _mm_cvtsi32_si128(r.hi_shift)), _mm512_set1_epi8(1));
    return _mm512_or_si512(lo, _mm512_add_epi8(h, _mm512_add_epi8(h, _mm512_add_epi8(h, h))));  // h << 2
  }

  // Codes [16 q, 16 q + 16) of 64 (the extract needs an immediate: q is a constant once inlined).
  static AFPQ_INLINE I Part(Chunk codes, int q) {
    switch (q) {
      case 0: return _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(codes, 0));
      case 1: return _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(codes, 1));
      case 2: return _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(codes, 2));
      default: return _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(codes, 3));
    }
  }
};

}  // namespace afpq

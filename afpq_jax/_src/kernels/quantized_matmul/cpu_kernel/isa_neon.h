// aarch64 NEON traits for simd_blocks.h (Apple silicon, Graviton, Grace): 4 floats per vector, 16 codes per
// load, the 16-entry code book as 64 bytes in four registers, looked up by one `vqtbl4q_u8` per vector (each
// code becomes the byte indices 4 c .. 4 c + 3 of its float).
#pragma once

#include <arm_neon.h>

#define AFPQ_SIMD_ISA "neon"

namespace afpq {

struct Isa {
  static constexpr int W = 4;
  static constexpr int kScaledMaxM = 2;  // 2 x rows x 4 vectors x 2 accumulators = 16 of the 32 registers
  static constexpr int kMicroRows = 6;   // 6 x 4 accumulators, 4 weight loads and 6 broadcasts per 24 FMAs
  static constexpr int kMicroVecs = 4;
  static constexpr bool kSplitBySign = false;  // a lookup is one vqtbl4q_u8: two half tables
  using F = float32x4_t;
  using I = uint32x4_t;
  using Chunk = uint8x16_t;
  using Table = uint8x16x4_t;

  static AFPQ_INLINE F Zero() { return vdupq_n_f32(0.0f); }
  static AFPQ_INLINE F Set1(float v) { return vdupq_n_f32(v); }
  static AFPQ_INLINE F Load(const float* p) { return vld1q_f32(p); }
  static AFPQ_INLINE void Store(float* p, F v) { vst1q_f32(p, v); }
  static AFPQ_INLINE F Fma(F a, F b, F c) { return vfmaq_f32(c, a, b); }
  static AFPQ_INLINE F Mul(F a, F b) { return vmulq_f32(a, b); }
  static AFPQ_INLINE F Sub(F a, F b) { return vsubq_f32(a, b); }
  static AFPQ_INLINE F ToFloat(I c) { return vcvtq_f32_u32(c); }
  static AFPQ_INLINE Table LoadTable(const float* t) {  // four loads: vld1q_u8_x4 is missing from older GCCs
    const uint8_t* b = reinterpret_cast<const uint8_t*>(t);
    return {{vld1q_u8(b), vld1q_u8(b + 16), vld1q_u8(b + 32), vld1q_u8(b + 48)}};
  }
  static AFPQ_INLINE F Lookup(I c, const Table& t) {
    const uint32x4_t bytes = vmlaq_n_u32(vdupq_n_u32(0x03020100u), c, 0x04040404u);  // 4c, 4c+1, 4c+2, 4c+3
    return vreinterpretq_f32_u8(vqtbl4q_u8(t, vreinterpretq_u8_u32(bytes)));
  }
  static AFPQ_INLINE F ScaleFor(I c, F, int n_negative, F neg, F pos) {  // codes below n_negative: negative
    return vbslq_f32(vcltq_u32(c, vdupq_n_u32(static_cast<uint32_t>(n_negative))), neg, pos);
  }
  static AFPQ_INLINE void Prefetch(const void* p) { __builtin_prefetch(p); }

  static AFPQ_INLINE F RoundBf16(F w) {
    const uint32x4_t u = vreinterpretq_u32_f32(w);
    const uint32x4_t lsb = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
    const uint32x4_t r = vaddq_u32(u, vaddq_u32(lsb, vdupq_n_u32(0x7FFF)));
    return vreinterpretq_f32_u32(vandq_u32(r, vdupq_n_u32(0xFFFF0000u)));
  }

  // Up to 16 bytes at p; a short chunk (a block's last) through a zeroed copy, never reading past it.
  static AFPQ_INLINE uint8x16_t LoadBytes(const uint8_t* p, int width) {
    if (width == 16) return vld1q_u8(p);
    uint8_t buf[16] = {};
    std::memcpy(buf, p, width);
    return vld1q_u8(buf);
  }

  static AFPQ_INLINE Chunk LoadCodes(const RowRef& r, int64_t col, int width) {
    const uint8x16_t lo = vandq_u8(vshlq_u8(LoadBytes(r.lo + col, width), vdupq_n_s8(static_cast<int8_t>(-r.lo_shift))),
                                   vdupq_n_u8(static_cast<uint8_t>(r.lo_mask)));
    if (r.hi == nullptr) return lo;
    const uint8x16_t h = vandq_u8(vshlq_u8(LoadBytes(r.hi + col, width), vdupq_n_s8(static_cast<int8_t>(-r.hi_shift))),
                                  vdupq_n_u8(1));
    return vorrq_u8(lo, vshlq_n_u8(h, 2));
  }

  // Codes [4 q, 4 q + 4) of 16.
  static AFPQ_INLINE I Part(Chunk codes, int q) {
    const uint16x8_t half = q < 2 ? vmovl_u8(vget_low_u8(codes)) : vmovl_high_u8(codes);
    return q % 2 == 0 ? vmovl_u16(vget_low_u16(half)) : vmovl_high_u16(half);
  }
};

}  // namespace afpq

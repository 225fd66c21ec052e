/* ARM64 kernels: NEON (widening multiplies) and NEON with the dot-product extension (sdot). */
#if defined(__aarch64__)
#include <arm_neon.h>

#include "ternary.h"

#define KCAT2(a, b) a##b
#define KCAT(a, b) KCAT2(a, b)

/* Digits (0..2) of 16 packed bytes for digit i: (q * 3^i mod 256) * 3 >> 8, byte arithmetic wraps. */
static inline uint8x16_t digit16(uint8x16_t q, uint8_t pow3) {
  uint8x16_t qi = vmulq_u8(q, vdupq_n_u8(pow3));
  uint8x8_t three = vdup_n_u8(3);
  return vcombine_u8(vshrn_n_u16(vmull_u8(vget_low_u8(qi), three), 8), vshrn_n_u16(vmull_u8(vget_high_u8(qi), three), 8));
}

/* codes (-1, 0, 1) of digit i of one 32-byte block: c[0] lanes 0-15, c[1] lanes 16-31 */
static inline void codes32(const uint8_t *blk, int i, int8x16_t c[2]) {
  static const uint8_t POW3[5] = {1, 3, 9, 27, 81};
  for (int h = 0; h < 2; h++)
    c[h] = vreinterpretq_s8_u8(vsubq_u8(digit16(vld1q_u8(blk + 16 * h), POW3[i]), vdupq_n_u8(1)));
}

static inline void decode_row(const uint8_t *row, int K, int8_t *codes) {
  uint8_t pad[TB_BYTES];
  for (int b = 0; b < t_blocks(K); b++) {
    __builtin_prefetch(row + (size_t)b * TB_BYTES + 2048); /* weights stream from memory: ask ahead */
    const uint8_t *blk = t_block_at(row, b, K, pad);
    for (int i = 0; i < 5; i++) {
      int8x16_t c[2];
      codes32(blk, i, c);
      vst1q_s8(codes + (size_t)b * TB_CODES + 32 * i, c[0]);
      vst1q_s8(codes + (size_t)b * TB_CODES + 32 * i + 16, c[1]);
    }
  }
}

static inline int32x4_t dot_mull(int32x4_t acc, int8x16_t a, int8x16_t b) {
  acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(a), vget_low_s8(b)));
  return vpadalq_s16(acc, vmull_s8(vget_high_s8(a), vget_high_s8(b)));
}

/* Integer kernel body: KDOT(acc, codes, x) accumulates 16 products into 4 int32 lanes. */
#define DOT_I8_BODY(KDOT)                                                                       \
  size_t rb = t_row_bytes(K), len = t_blocked_len(K);                                         \
  int8_t codes[len];                                                                          \
  (void)xsum;                                                                                 \
  for (size_t row = 0; row < n; row++) {                                                      \
    decode_row(w + row * rb, K, codes);                                                       \
    for (size_t r = 0; r < m; r++) {                                                          \
      const int8_t *xr = x + r * xstride;                                                     \
      int32x4_t a0 = vdupq_n_s32(0), a1 = a0;                                                 \
      for (size_t p = 0; p < len; p += 32) {                                                  \
        a0 = KDOT(a0, vld1q_s8(codes + p), vld1q_s8(xr + p));                                 \
        a1 = KDOT(a1, vld1q_s8(codes + p + 16), vld1q_s8(xr + p + 16));                       \
      }                                                                                       \
      acc[r * ld + row] = vaddvq_s32(vaddq_s32(a0, a1));                                      \
    }                                                                                         \
  }

static void dot_i8_neon(const uint8_t *w, size_t n, int K, const int8_t *x, const int32_t *xsum, size_t m,
                        size_t xstride, int32_t *acc, size_t ld) {
  DOT_I8_BODY(dot_mull)
}

__attribute__((target("arch=armv8.2-a+dotprod"))) static void dot_i8_neon_dot(const uint8_t *w, size_t n, int K,
                                                                 const int8_t *x, const int32_t *xsum, size_t m,
                                                                 size_t xstride, int32_t *acc, size_t ld) {
  DOT_I8_BODY(vdotq_s32)
}

/* Float kernel (shared by both: the dot-product extension has no float form); lanes 4c..4c+3 in a[c],
 * fma with an exact product (t is -1, 0, 1) rounds as the portable sum does. */
static void dot_f32_neon(const uint8_t *w, size_t n, int K, const float *x, size_t m, size_t xstride,
                         float *out, size_t ld) {
  size_t rb = t_row_bytes(K), len = t_blocked_len(K);
  int8_t codes[len];
  for (size_t row = 0; row < n; row++) {
    decode_row(w + row * rb, K, codes);
    for (size_t r = 0; r < m; r++) {
      const float *xr = x + r * xstride;
      float32x4_t a[8];
      for (int c = 0; c < 8; c++) a[c] = vdupq_n_f32(0.0f);
      for (size_t p = 0; p < len; p += 32)
        for (int h = 0; h < 2; h++) {
          int16x8_t c16[2];
          int8x16_t c8 = vld1q_s8(codes + p + 16 * h);
          c16[0] = vmovl_s8(vget_low_s8(c8));
          c16[1] = vmovl_s8(vget_high_s8(c8));
          for (int q = 0; q < 4; q++) {
            int16x4_t part = (q & 1) ? vget_high_s16(c16[q >> 1]) : vget_low_s16(c16[q >> 1]);
            float32x4_t t = vcvtq_f32_s32(vmovl_s16(part));
            int lane = 4 * h + q;
            a[lane] = vfmaq_f32(a[lane], vld1q_f32(xr + p + 4 * lane), t);
          }
        }
      float32x4_t r4 = vaddq_f32(vaddq_f32(vaddq_f32(a[0], a[4]), vaddq_f32(a[2], a[6])),
                                 vaddq_f32(vaddq_f32(a[1], a[5]), vaddq_f32(a[3], a[7])));
      float32x2_t r2 = vadd_f32(vget_low_f32(r4), vget_high_f32(r4));
      out[r * ld + row] = vget_lane_f32(r2, 0) + vget_lane_f32(r2, 1);
    }
  }
}

const TernaryKernel t_kernel_neon = {"neon", dot_i8_neon, dot_f32_neon};
const TernaryKernel t_kernel_neon_dot = {"neon-dot", dot_i8_neon_dot, dot_f32_neon};
#endif

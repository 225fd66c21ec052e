/* x86-64 kernels: AVX2 (maddubs) and AVX-VNNI (vpdpbusd), one body (kernels_x86_body.h). */
#if defined(__x86_64__)
#include <immintrin.h>

#include "ternary.h"

#define PREFETCH_AHEAD 2048 /* bytes of weights ahead of the decode */

#define KNAME "avx2"
#define KSUFFIX avx2
#define KTARGET "avx2,fma"
/* u8 digits (<= 2) x s8 activations: each pair sum is within +-512, so 63 of them add up in int16
 * exactly (63 * 512 < 32768); the int16 sums are widened to int32 every KSPAN steps */
#define KSTEP(a, u, s) _mm256_add_epi16(a, _mm256_maddubs_epi16(u, s))
#define KWIDEN(a32, a) _mm256_add_epi32(a32, _mm256_madd_epi16(a, _mm256_set1_epi16(1)))
#define KSUM _mm256_add_epi16
#define KSPAN 63
#define KNARROW 1 /* int16 lanes: the decode sums a block in a tree and widens every KSPAN / 5 blocks */
#include "kernels_x86_body.h"
#undef KNAME
#undef KSUFFIX
#undef KTARGET
#undef KSTEP
#undef KWIDEN
#undef KSPAN
#undef KSUM
#undef KNARROW

#define KNAME "avxvnni"
#define KSUFFIX avxvnni
#define KTARGET "avx2,fma,avxvnni"
#define KSTEP _mm256_dpbusd_avx_epi32 /* int32 lanes already: never widened */
#define KWIDEN(a32, a) _mm256_add_epi32(a32, a)
#define KSUM _mm256_add_epi32
#define KSPAN 0x7fffffff
#define KNARROW 0
#include "kernels_x86_body.h"
#endif


#if defined(__x86_64__)
/* AVX-512 VNNI: the decode GEMV (m = 1, integer activations) on two weight rows at once, one 32-byte
 * block of each in the two halves of a 64-byte register, against the block's activations broadcast
 * to both halves; every other case is AVX-VNNI's. */
#define K512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,avxvnni")))

K512 static inline __m512i digits512(__m512i s, __m512i lo, __m512i hi, __m512i one, __m512i two) {
  __m512i d = _mm512_maskz_mov_epi8(_mm512_cmpgt_epi8_mask(s, lo), one);
  return _mm512_mask_mov_epi8(d, _mm512_cmpgt_epi8_mask(s, hi), two);
}

K512 static void dot_i8_avx512(const uint8_t *w, size_t n, int K, const int8_t *x, const int32_t *xsum, size_t m,
                               size_t xstride, int32_t *acc, size_t ld) {
  if (m != 1 || n < 4) {
    t_kernel_avxvnni.dot_i8(w, n, K, x, xsum, m, xstride, acc, ld);
    return;
  }
  size_t rb = t_row_bytes(K);
  int nblk = t_blocks(K);
  const __m512i lo = _mm512_set1_epi8(-43), hi = _mm512_set1_epi8(42), one = _mm512_set1_epi8(1);
  const __m512i two = _mm512_set1_epi8(2), flip = _mm512_set1_epi8((char)0x80);
  const __m256i pad = _mm256_set1_epi8((char)T_PAD_BYTE);
  int full = K / TB_CODES;
  size_t tail_bytes = t_row_bytes(K - full * TB_CODES);
  size_t row = 0;
  for (; row + 4 <= n; row += 4) { /* rows (0, 1) in one register, (2, 3) in another: one x load for four */
    const uint8_t *wr = w + row * rb;
    __m512i a[2][5];
    for (int i = 0; i < 5; i++) a[0][i] = a[1][i] = _mm512_setzero_si512();
    for (int b = 0; b < nblk; b++) {
      __m512i s[2];
      for (int h = 0; h < 2; h++) {
        const uint8_t *r0 = wr + (size_t)(2 * h) * rb, *r1 = r0 + rb;
        _mm_prefetch((const char *)(r0 + (size_t)b * TB_BYTES + PREFETCH_AHEAD), _MM_HINT_T0);
        _mm_prefetch((const char *)(r1 + (size_t)b * TB_BYTES + PREFETCH_AHEAD), _MM_HINT_T0);
        /* the tail block: a masked load (no read past the row), the rest padded with zero codes */
        __mmask32 keep = b < full ? ~(__mmask32)0 : (__mmask32)((1ull << tail_bytes) - 1);
        __m256i q0 = _mm256_mask_loadu_epi8(pad, keep, r0 + (size_t)b * TB_BYTES);
        __m256i q1 = _mm256_mask_loadu_epi8(pad, keep, r1 + (size_t)b * TB_BYTES);
        s[h] = _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(q0), q1, 1), flip);
      }
      const int8_t *xb = x + (size_t)b * TB_CODES;
      for (int i = 0; i < 5; i++) {
        __m512i xv = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(xb + 32 * i)));
        for (int h = 0; h < 2; h++) {
          if (i) s[h] = _mm512_add_epi8(s[h], _mm512_add_epi8(s[h], s[h]));
          a[h][i] = _mm512_dpbusd_epi32(a[h][i], digits512(s[h], lo, hi, one, two), xv);
        }
      }
    }
    for (int h = 0; h < 2; h++) {
      __m512i t = _mm512_add_epi32(_mm512_add_epi32(a[h][0], a[h][1]),
                                   _mm512_add_epi32(_mm512_add_epi32(a[h][2], a[h][3]), a[h][4]));
      acc[row + 2 * h] = _mm512_mask_reduce_add_epi32(0x00FF, t) - xsum[0];
      acc[row + 2 * h + 1] = _mm512_mask_reduce_add_epi32((__mmask16)0xFF00, t) - xsum[0];
    }
  }
  if (row < n) t_kernel_avxvnni.dot_i8(w + row * rb, n - row, K, x, xsum, 1, xstride, acc + row, ld);
}

/* Masks of one or two digits' signed bytes (64 or 32 lanes): t = -1 (s <= -43) and t != 0 (s+42 > 84
 * unsigned), kept in memory so that the float loop loads each 16-lane piece straight into a mask register. */
typedef union Masks { __mmask64 q[3]; __mmask16 piece[12]; } Masks; /* GNU C: read through the union */

K512 static inline void code_masks512(__m512i s, int i, Masks *neg, Masks *nz) {
  neg->q[i] = _mm512_cmplt_epi8_mask(s, _mm512_set1_epi8(-42));
  nz->q[i] = _mm512_cmpgt_epu8_mask(_mm512_add_epi8(s, _mm512_set1_epi8(42)), _mm512_set1_epi8(84));
}

/* Sign and zero masks of one row's block b: piece 4(i/2) + 2(i%2) + h is digit i, lanes 16h..16h+15. */
K512 static inline void block_masks512(const uint8_t *wr, int b, int full, size_t tail_bytes, Masks *neg, Masks *nz) {
  const __m256i pad = _mm256_set1_epi8((char)T_PAD_BYTE), flip = _mm256_set1_epi8((char)0x80);
  _mm_prefetch((const char *)(wr + (size_t)b * TB_BYTES + PREFETCH_AHEAD), _MM_HINT_T0);
  __mmask32 keep = b < full ? ~(__mmask32)0 : (__mmask32)((1ull << tail_bytes) - 1);
  __m256i s = _mm256_xor_si256(_mm256_mask_loadu_epi8(pad, keep, wr + (size_t)b * TB_BYTES), flip);
  __m256i s3 = _mm256_add_epi8(s, _mm256_add_epi8(s, s));
  /* digits (0, 1), (2, 3) in the halves of one register each (x9 = two x3 steps), digit 4 alone */
  __m512i s01 = _mm512_inserti64x4(_mm512_castsi256_si512(s), s3, 1);
  __m512i s23 = _mm512_add_epi8(s01, _mm512_add_epi8(s01, s01));
  s23 = _mm512_add_epi8(s23, _mm512_add_epi8(s23, s23));
  __m256i s4 = _mm512_extracti64x4_epi64(s23, 1);
  s4 = _mm256_add_epi8(s4, _mm256_add_epi8(s4, s4));
  code_masks512(s01, 0, neg, nz);
  code_masks512(s23, 1, neg, nz);
  code_masks512(_mm512_castsi256_si512(s4), 2, neg, nz);
}

/* The float decode GEMV (m = 1, act_bits 0): acc + x*t in the canonical order, with t applied by sign
 * and zero masks instead of converting every code to a float: x*t is x, -x (sign bit flipped) or
 * nothing added; acc + x*t rounds the same (acc is never -0: it starts at +0 and an exact zero sum
 * is +0), so the bits are the portable kernel's for finite activations. Four rows at a time, so
 * that the lane sums (five dependent adds a block) of one row wait while the others' run. Other
 * cases are AVX-VNNI's. */
K512 static inline void rows_f32_512(const uint8_t *w, size_t rb, int nblk, int full, size_t tail_bytes,
                                     const float *x, float *out, int R) {
  const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
  __m512 a[4][2];
  for (int r = 0; r < R; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();
  for (int b = 0; b < nblk; b++) {
    Masks neg[4], nz[4];
    for (int r = 0; r < R; r++) block_masks512(w + (size_t)r * rb, b, full, tail_bytes, &neg[r], &nz[r]);
    const float *xb = x + (size_t)b * TB_CODES;
    for (int i = 0; i < 5; i++) {
      int g = 4 * (i / 2) + 2 * (i % 2);
      for (int h = 0; h < 2; h++) {
        __m512i xv = _mm512_castps_si512(_mm512_loadu_ps(xb + 32 * i + 16 * h));
        for (int r = 0; r < R; r++) {
          __m512i v = _mm512_mask_xor_epi32(xv, neg[r].piece[g + h], xv, sign);
          a[r][h] = _mm512_mask_add_ps(a[r][h], nz[r].piece[g + h], a[r][h], _mm512_castsi512_ps(v));
        }
      }
    }
  }
  for (int r = 0; r < R; r++)
    out[r] = reduce32avxvnni(_mm512_castps512_ps256(a[r][0]), _mm512_extractf32x8_ps(a[r][0], 1),
                             _mm512_castps512_ps256(a[r][1]), _mm512_extractf32x8_ps(a[r][1], 1));
}

K512 static void dot_f32_avx512(const uint8_t *w, size_t n, int K, const float *x, size_t m, size_t xstride,
                                float *out, size_t ld) {
  if (m != 1) {
    t_kernel_avxvnni.dot_f32(w, n, K, x, m, xstride, out, ld);
    return;
  }
  size_t rb = t_row_bytes(K);
  int nblk = t_blocks(K), full = K / TB_CODES;
  size_t tail_bytes = t_row_bytes(K - full * TB_CODES), row = 0;
  for (; row + 4 <= n; row += 4) rows_f32_512(w + row * rb, rb, nblk, full, tail_bytes, x, out + row, 4);
  for (; row < n; row++) rows_f32_512(w + row * rb, rb, nblk, full, tail_bytes, x, out + row, 1);
}

const TernaryKernel t_kernel_avx512vnni = {"avx512vnni", dot_i8_avx512, dot_f32_avx512};
#endif

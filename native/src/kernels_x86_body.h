/* The x86-64 kernel body, included once per instruction set by kernels_x86.c with
 *   KNAME (kernel name), KSUFFIX (function suffix), KTARGET (gcc target string) and
 *   KSTEP(acc, u8, s8) (acc += u8 x s8 dot products in narrow lanes), KWIDEN(acc32, acc) (acc32 += acc
 *   in int32 lanes), KSUM(a, b) (a + b in the narrow lanes), KSPAN (KSTEPs an accumulator takes
 *   before it must be widened) and KNARROW (1: the lanes are narrower than int32). */
#define KCAT2(a, b) a##b
#define KCAT(a, b) KCAT2(a, b)
#define KFN(name) KCAT(name, KSUFFIX)
#define KATTR __attribute__((target(KTARGET))) static inline

/* Digits (0..2) of 32 packed bytes, d[i] lane j = digit i of byte j (see ternary.h), with byte adds
 * and compares only: with s = q - 128 (mod 256), digit i of q is
 * [3^i s > -43] + [3^i s > 42] in signed bytes (q_i >= 86, q_i >= 171), and 3^(i+1) s = 3 * 3^i s
 * (mod 256) needs no carry: two byte adds. */
KATTR void KFN(decode5)(__m256i q, __m256i d[5]) {
  const __m256i lo = _mm256_set1_epi8(-43), hi = _mm256_set1_epi8(42), zero = _mm256_setzero_si256();
  __m256i s = _mm256_xor_si256(q, _mm256_set1_epi8((char)0x80));
  for (int i = 0; i < 5; i++) {
    if (i) s = _mm256_add_epi8(s, _mm256_add_epi8(s, s));
    d[i] = _mm256_sub_epi8(_mm256_sub_epi8(zero, _mm256_cmpgt_epi8(s, lo)), _mm256_cmpgt_epi8(s, hi));
  }
}

KATTR int32_t KFN(hsum_i32)(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

/* The canonical 32-lane reduction (ternary.h t_reduce32) of lanes a0 (0-7), a1 (8-15), a2, a3. */
KATTR float KFN(reduce32)(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  __m256 r8 = _mm256_add_ps(_mm256_add_ps(a0, a2), _mm256_add_ps(a1, a3));
  __m128 r4 = _mm_add_ps(_mm256_castps256_ps128(r8), _mm256_extractf128_ps(r8, 1));
  __m128 r2 = _mm_add_ps(r4, _mm_movehl_ps(r4, r4));
  return _mm_cvtss_f32(_mm_add_ss(r2, _mm_shuffle_ps(r2, r2, 1)));
}

KATTR __m256i KFN(load_block)(const uint8_t *row, int b, int K) {
  uint8_t pad[TB_BYTES];
  return _mm256_loadu_si256((const __m256i *)t_block_at(row, b, K, pad));
}

/* Where the decode GEMVs read the blocks of n rows from: the tail block of a row is loaded whole
 * (its bytes past the row, the next row's, replaced by the padding byte) while 32 bytes from its
 * start lie inside the n rows, and copied into a padded block only near their end. */
typedef struct KFN(Rows) { const uint8_t *w; size_t rb, end; int K, full; __m256i keep, pad; } KFN(Rows);

KATTR KFN(Rows) KFN(rows)(const uint8_t *w, size_t n, int K) {
  const __m256i lane = _mm256_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21,
                                        22, 23, 24, 25, 26, 27, 28, 29, 30, 31);
  size_t rb = t_row_bytes(K);
  int full = K / TB_CODES;
  KFN(Rows) r = {w, rb, n * rb, K, full, _mm256_cmpgt_epi8(_mm256_set1_epi8((char)(rb - (size_t)full * TB_BYTES)), lane),
                 _mm256_set1_epi8((char)T_PAD_BYTE)};
  return r;
}

/* Block b of row `row`, with the weights about PREFETCH_AHEAD bytes ahead asked for (the hardware
 * prefetcher alone keeps too few lines in flight while the decode works). */
KATTR __m256i KFN(row_block)(const KFN(Rows) *r, size_t row, int b) {
  size_t at = row * r->rb + (size_t)b * TB_BYTES;
  _mm_prefetch((const char *)(r->w + at + PREFETCH_AHEAD), _MM_HINT_T0);
  if (b < r->full) return _mm256_loadu_si256((const __m256i *)(r->w + at));
  if (at + TB_BYTES <= r->end) return _mm256_blendv_epi8(r->pad, _mm256_loadu_si256((const __m256i *)(r->w + at)), r->keep);
  return KFN(load_block)(r->w + row * r->rb, b, r->K);
}

/* Decodes a whole row into digits (m > 1: decoded once, used by every activation row). */
KATTR void KFN(decode_row)(const uint8_t *row, int K, uint8_t *dig) {
  __m256i d[5];
  for (int b = 0; b < t_blocks(K); b++) {
    _mm_prefetch((const char *)(row + (size_t)b * TB_BYTES + PREFETCH_AHEAD), _MM_HINT_T0);
    KFN(decode5)(KFN(load_block)(row, b, K), d);
    for (int i = 0; i < 5; i++) _mm256_storeu_si256((__m256i *)(dig + (size_t)b * TB_CODES + TB_BYTES * i), d[i]);
  }
}

/* Widens accumulators a[0..n) into a32 (and clears them) once they have taken KSPAN steps. */
KATTR void KFN(widen)(__m256i *a, __m256i *a32, int n, int *span, int force) {
  if (++*span < KSPAN && !force) return;
  for (int i = 0; i < n; i++) {
    a32[i] = KWIDEN(a32[i], a[i]);
    a[i] = _mm256_setzero_si256();
  }
  *span = 0;
}

KATTR int32_t KFN(dot_digits)(const uint8_t *dig, const int8_t *x, size_t len) {
  __m256i a = _mm256_setzero_si256(), a32 = a;
  int span = 0;
  for (size_t p = 0; p < len; p += 32) {
    a = KSTEP(a, _mm256_loadu_si256((const __m256i *)(dig + p)), _mm256_loadu_si256((const __m256i *)(x + p)));
    KFN(widen)(&a, &a32, 1, &span, 0);
  }
  KFN(widen)(&a, &a32, 1, &span, 1);
  return KFN(hsum_i32)(a32);
}

__attribute__((target(KTARGET))) static void KFN(dot_i8)(const uint8_t *w, size_t n, int K, const int8_t *x,
                                                        const int32_t *xsum, size_t m, size_t xstride,
                                                        int32_t *acc, size_t ld) {
  size_t rb = t_row_bytes(K), len = t_blocked_len(K);
  int nblk = t_blocks(K);
  if (m == 1) { /* decode: stream each weight byte once, digits straight into the dot products */
    const KFN(Rows) rows = KFN(rows)(w, n, K);
    for (size_t row = 0; row < n; row++) {
#if KNARROW
      /* narrow lanes: a block's five digits summed in a tree, then into one accumulator, widened
       * every KSPAN / 5 blocks */
      __m256i a = _mm256_setzero_si256(), a32 = a, d[5];
      int span = 0;
#else
      /* one accumulator per digit: the dot-product instructions of a block do not wait on each other */
      __m256i a[5], d[5];
      for (int i = 0; i < 5; i++) a[i] = _mm256_setzero_si256();
#endif
      for (int b = 0; b < nblk; b++) {
        KFN(decode5)(KFN(row_block)(&rows, row, b), d);
        const int8_t *xb = x + (size_t)b * TB_CODES;
#if KNARROW
        __m256i z = _mm256_setzero_si256(), p[5];
        for (int i = 0; i < 5; i++) p[i] = KSTEP(z, d[i], _mm256_loadu_si256((const __m256i *)(xb + 32 * i)));
        a = KSUM(a, KSUM(KSUM(p[0], p[1]), KSUM(KSUM(p[2], p[3]), p[4])));
        if (++span == KSPAN / 5) { /* a took five steps a block */
          a32 = KWIDEN(a32, a);
          a = z;
          span = 0;
        }
#else
        for (int i = 0; i < 5; i++) a[i] = KSTEP(a[i], d[i], _mm256_loadu_si256((const __m256i *)(xb + 32 * i)));
#endif
      }
#if KNARROW
      acc[row] = KFN(hsum_i32)(KWIDEN(a32, a)) - xsum[0];
#else
      acc[row] = KFN(hsum_i32)(_mm256_add_epi32(_mm256_add_epi32(a[0], a[1]),
                                                _mm256_add_epi32(_mm256_add_epi32(a[2], a[3]), a[4]))) - xsum[0];
#endif
    }
    return;
  }
  /* prefill: two weight rows decoded once, summed against four activation rows at a time */
  uint8_t dig[2 * len];
  size_t row = 0;
  for (; row + 2 <= n; row += 2) {
    KFN(decode_row)(w + row * rb, K, dig);
    KFN(decode_row)(w + (row + 1) * rb, K, dig + len);
    size_t r = 0;
    for (; r + 4 <= m; r += 4) {
      const int8_t *x0 = x + r * xstride, *x1 = x0 + xstride, *x2 = x1 + xstride, *x3 = x2 + xstride;
      __m256i a[8], a32[8];
      for (int i = 0; i < 8; i++) a[i] = a32[i] = _mm256_setzero_si256();
      int span = 0;
      for (size_t p = 0; p < len; p += 32) {
        __m256i d0 = _mm256_loadu_si256((const __m256i *)(dig + p)), d1 = _mm256_loadu_si256((const __m256i *)(dig + len + p));
        __m256i v0 = _mm256_loadu_si256((const __m256i *)(x0 + p)), v1 = _mm256_loadu_si256((const __m256i *)(x1 + p));
        __m256i v2 = _mm256_loadu_si256((const __m256i *)(x2 + p)), v3 = _mm256_loadu_si256((const __m256i *)(x3 + p));
        a[0] = KSTEP(a[0], d0, v0); a[1] = KSTEP(a[1], d0, v1); a[2] = KSTEP(a[2], d0, v2); a[3] = KSTEP(a[3], d0, v3);
        a[4] = KSTEP(a[4], d1, v0); a[5] = KSTEP(a[5], d1, v1); a[6] = KSTEP(a[6], d1, v2); a[7] = KSTEP(a[7], d1, v3);
        KFN(widen)(a, a32, 8, &span, 0);
      }
      KFN(widen)(a, a32, 8, &span, 1);
      for (int i = 0; i < 8; i++) acc[(r + (size_t)(i & 3)) * ld + row + (size_t)(i >> 2)] = KFN(hsum_i32)(a32[i]) - xsum[r + (size_t)(i & 3)];
    }
    for (; r < m; r++)
      for (size_t h = 0; h < 2; h++) acc[r * ld + row + h] = KFN(dot_digits)(dig + h * len, x + r * xstride, len) - xsum[r];
  }
  for (; row < n; row++) {
    KFN(decode_row)(w + row * rb, K, dig);
    for (size_t r = 0; r < m; r++) acc[r * ld + row] = KFN(dot_digits)(dig, x + r * xstride, len) - xsum[r];
  }
}

/* Codes (d - 1) of 32 digits as floats, lanes 0-7, 8-15, 16-23, 24-31. */
KATTR void KFN(codes_f32)(__m256i d, __m256 t[4]) {
  __m256i c = _mm256_sub_epi8(d, _mm256_set1_epi8(1));
  __m128i lo = _mm256_castsi256_si128(c), hi = _mm256_extracti128_si256(c, 1);
  t[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
  t[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
  t[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
  t[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
}

/* acc += x * t is exact in the product (t is -1, 0 or 1), so fmadd rounds exactly as the portable sum. */
__attribute__((target(KTARGET))) static void KFN(dot_f32)(const uint8_t *w, size_t n, int K, const float *x,
                                                         size_t m, size_t xstride, float *out, size_t ld) {
  size_t rb = t_row_bytes(K), len = t_blocked_len(K);
  int nblk = t_blocks(K);
  if (m == 1) {
    const KFN(Rows) rows = KFN(rows)(w, n, K);
    for (size_t row = 0; row < n; row++) {
      __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      __m256i d[5];
      __m256 t[4];
      for (int b = 0; b < nblk; b++) {
        KFN(decode5)(KFN(row_block)(&rows, row, b), d);
        const float *xb = x + (size_t)b * TB_CODES;
        for (int i = 0; i < 5; i++) {
          KFN(codes_f32)(d[i], t);
          for (int c = 0; c < 4; c++) a[c] = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 32 * i + 8 * c), t[c], a[c]);
        }
      }
      out[row] = KFN(reduce32)(a[0], a[1], a[2], a[3]);
    }
    return;
  }
  uint8_t dig[len];
  float tf[len];
  for (size_t row = 0; row < n; row++) {
    KFN(decode_row)(w + row * rb, K, dig);
    for (size_t p = 0; p < len; p += 32) {
      __m256 t[4];
      KFN(codes_f32)(_mm256_loadu_si256((const __m256i *)(dig + p)), t);
      for (int c = 0; c < 4; c++) _mm256_storeu_ps(tf + p + 8 * c, t[c]);
    }
    for (size_t r = 0; r < m; r++) {
      const float *xr = x + r * xstride;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (size_t p = 0; p < len; p += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + p), _mm256_loadu_ps(tf + p), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + p + 8), _mm256_loadu_ps(tf + p + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + p + 16), _mm256_loadu_ps(tf + p + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + p + 24), _mm256_loadu_ps(tf + p + 24), a3);
      }
      out[r * ld + row] = KFN(reduce32)(a0, a1, a2, a3);
    }
  }
}

const TernaryKernel KCAT(t_kernel_, KSUFFIX) = {KNAME, KFN(dot_i8), KFN(dot_f32)};

#undef KFN
#undef KATTR

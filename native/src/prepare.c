/* Activation preparation shared by every kernel: norm, BitLinear int8 quantization, blocked order. */
#include <math.h>
#include <string.h>

#include "ternary.h"

/* The tail block of K: its r = K mod 160 codes in nb = ceil(r / 5) bytes, after `full` positions. */
typedef struct Tail { long full; int r, nb; } Tail;

static inline Tail tail_of(int K) {
  int full = K / TB_CODES * TB_CODES, r = K - full;
  Tail t = {full, r, (int)t_row_bytes(r)};
  return t;
}

/* Lane l = 32 i + j (i = 0..4, j = 0..31) of the tail block holds position full + nb i + j of x where
 * j < nb and nb i + j < r; -1: a padding lane. */
static inline long tail_source(const Tail *t, int l) {
  int i = l / TB_BYTES, j = l % TB_BYTES, k = t->nb * i + j;
  return (j < t->nb && k < t->r) ? t->full + k : -1;
}

void t_block_f32(const float *x, int K, float *xb) {
  Tail t = tail_of(K);
  memcpy(xb, x, (size_t)t.full * sizeof(float));
  if (t.r)
    for (int l = 0; l < TB_CODES; l++) {
      long src = tail_source(&t, l);
      xb[t.full + l] = src < 0 ? 0.0f : x[src];
    }
}

static inline int8_t quantize(float v, float s) {
  float r = nearbyintf(v / s); /* round half to even (the default rounding mode) */
  return (int8_t)(r > 127.0f ? 127 : (r < -128.0f ? -128 : (int)r));
}

#if defined(__x86_64__)
#include <immintrin.h>

/* max |x| of n values (max is exact: any order gives fmaxf's result for finite x). */
__attribute__((target("avx2"))) static float absmax_avx2(const float *x, size_t n) {
  const __m256 mag = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 m = _mm256_setzero_ps();
  size_t p = 0;
  for (; p + 8 <= n; p += 8) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(x + p), mag));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  float amax = fmaxf(_mm_cvtss_f32(h), _mm_cvtss_f32(_mm_shuffle_ps(h, h, 1)));
  for (; p < n; p++) amax = fmaxf(amax, fabsf(x[p]));
  return amax;
}

/* The full blocks' quantization, 32 values a step with AVX2 (the baseline x86-64 build has no rounding
 * instruction: every nearbyintf was a libm call): IEEE division, round half to even, the same clamps and
 * an exact integer sum, so the same codes as `quantize`. Returns how many values it did. */
__attribute__((target("avx2"))) static size_t quantize_avx2(const float *x, size_t n, float s, int8_t *xb, int32_t *sum) {
  const __m256 sv = _mm256_set1_ps(s), lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i acc = _mm256_setzero_si256();
  size_t p = 0;
  for (; p + 32 <= n; p += 32) {
    __m256i q[4];
    for (int i = 0; i < 4; i++) {
      __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + p + 8 * i), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q[i] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
      acc = _mm256_add_epi32(acc, q[i]);
    }
    /* int32 -> int8 without saturation effects (all within [-128, 127]); packs interleave 128-bit lanes */
    __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256((__m256i *)(xb + p), _mm256_permutevar8x32_epi32(w, order));
  }
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
  *sum += _mm_cvtsi128_si32(t);
  return p;
}
#endif

float t_quantize_i8(const float *x, int K, float act_eps, int8_t *xb, int32_t *xsum) {
  size_t full = (size_t)(K / TB_CODES) * TB_CODES, p = 0;
  float amax = 0.0f;
  int32_t sum = 0;
#if defined(__x86_64__)
  int avx2 = __builtin_cpu_supports("avx2");
  if (avx2) amax = absmax_avx2(x, (size_t)K);
  else
#endif
    for (int k = 0; k < K; k++) amax = fmaxf(amax, fabsf(x[k]));
  float s = fmaxf(amax, act_eps) / 127.0f;
#if defined(__x86_64__)
  if (avx2) p = quantize_avx2(x, full, s, xb, &sum);
#endif
  for (; p < full; p++) sum += xb[p] = quantize(x[p], s); /* full blocks: positions as they are */
  Tail t = tail_of(K);
  if (t.r)
    for (int l = 0; l < TB_CODES; l++) {
      long src = tail_source(&t, l);
      sum += xb[t.full + l] = src < 0 ? 0 : quantize(x[src], s);
    }
  *xsum = sum;
  return s;
}

void t_rms_norm(const float *x, const float *gain, int K, float eps, float *out) {
  double ss = 0.0;
  for (int k = 0; k < K; k++) ss += (double)x[k] * (double)x[k];
  float ms = (float)(ss / K);
  float r = sqrtf(ms + eps);
  for (int k = 0; k < K; k++) out[k] = (x[k] / r) * gain[k];
}

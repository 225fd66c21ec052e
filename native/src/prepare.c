/* Activation preparation shared by every kernel: norm, BitLinear int8 quantization, blocked order. */
#include <math.h>
#include <string.h>

#include "ternary.h"

/* Index in x of blocked position p (or -1 for a padding lane of the tail block). */
static long blocked_source(size_t p, int K) {
  int b = (int)(p / TB_CODES), full = K / TB_CODES;
  int within = (int)(p % TB_CODES);
  if (b < full) return (long)p;
  int r = K - full * TB_CODES, nb = (int)t_row_bytes(r), i = within / TB_BYTES, j = within % TB_BYTES;
  int k = nb * i + j;
  return (j < nb && k < r) ? (long)full * TB_CODES + k : -1;
}

void t_block_f32(const float *x, int K, float *xb) {
  size_t full = (size_t)(K / TB_CODES) * TB_CODES, len = t_blocked_len(K);
  memcpy(xb, x, full * sizeof(float));
  for (size_t p = full; p < len; p++) {
    long s = blocked_source(p, K);
    xb[p] = s < 0 ? 0.0f : x[s];
  }
}

static inline int8_t quantize(float v, float s) {
  float r = nearbyintf(v / s); /* round half to even (the default rounding mode) */
  return (int8_t)(r > 127.0f ? 127 : (r < -128.0f ? -128 : (int)r));
}

float t_quantize_i8(const float *x, int K, float act_eps, int8_t *xb, int32_t *xsum) {
  float amax = 0.0f;
  for (int k = 0; k < K; k++) amax = fmaxf(amax, fabsf(x[k]));
  float s = fmaxf(amax, act_eps) / 127.0f;
  size_t full = (size_t)(K / TB_CODES) * TB_CODES, len = t_blocked_len(K);
  int32_t sum = 0;
  for (size_t p = 0; p < full; p++) sum += xb[p] = quantize(x[p], s); /* full blocks: positions as they are */
  for (size_t p = full; p < len; p++) {
    long src = blocked_source(p, K);
    sum += xb[p] = src < 0 ? 0 : quantize(x[src], s);
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

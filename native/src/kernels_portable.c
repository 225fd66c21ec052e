/* The portable C kernel: the definition every SIMD kernel must match bit for bit. */
#include "ternary.h"

static const uint8_t POW3[5] = {1, 3, 9, 27, 81};

/* Digits (0..2, code + 1) of one 32-byte block in blocked order: d[32*i + j] = digit i of byte j. */
static void decode_block(const uint8_t *q, uint8_t d[TB_CODES]) {
  for (int i = 0; i < 5; i++)
    for (int j = 0; j < TB_BYTES; j++) {
      uint8_t qi = (uint8_t)(q[j] * POW3[i]);
      d[TB_BYTES * i + j] = (uint8_t)(((unsigned)qi * 3u) >> 8);
    }
}

static void dot_i8(const uint8_t *w, size_t n, int K, const int8_t *x, const int32_t *xsum, size_t m,
                   size_t xstride, int32_t *acc, size_t ld) {
  size_t rb = t_row_bytes(K);
  int nblk = t_blocks(K);
  uint8_t pad[TB_BYTES], d[TB_CODES];
  for (size_t row = 0; row < n; row++)
    for (size_t r = 0; r < m; r++) {
      int32_t s = 0;
      for (int b = 0; b < nblk; b++) {
        decode_block(t_block_at(w + row * rb, b, K, pad), d);
        const int8_t *xr = x + r * xstride + (size_t)b * TB_CODES;
        for (int p = 0; p < TB_CODES; p++) s += (int32_t)d[p] * xr[p];
      }
      acc[r * ld + row] = s - xsum[r];
    }
}

static void dot_f32(const uint8_t *w, size_t n, int K, const float *x, size_t m, size_t xstride, float *out,
                    size_t ld) {
  size_t rb = t_row_bytes(K);
  int nblk = t_blocks(K);
  uint8_t pad[TB_BYTES], d[TB_CODES];
  for (size_t row = 0; row < n; row++)
    for (size_t r = 0; r < m; r++) {
      float lane[32] = {0};
      for (int b = 0; b < nblk; b++) {
        decode_block(t_block_at(w + row * rb, b, K, pad), d);
        const float *xr = x + r * xstride + (size_t)b * TB_CODES;
        for (int p = 0; p < TB_CODES; p++) lane[p % 32] = lane[p % 32] + xr[p] * (float)((int)d[p] - 1);
      }
      out[r * ld + row] = t_reduce32(lane);
    }
}

const TernaryKernel t_kernel_portable = {"portable", dot_i8, dot_f32};

/* nativelm ternary kernels: the packed layout (docs/kernels.md) and the kernel table.
 *
 * A packed row of K codes is ceil(K/5) bytes: 32-byte blocks of 160 codes, then a tail block of
 * ceil(r/5) bytes for the r = K mod 160 last codes. Byte j of a block of nb bytes holds the codes at
 * positions j + nb*i (i = 0..4) as q = ceil(v*256/243), v = sum_i (t_i + 1) * 3^(4-i).
 *
 * Activations are given in the matching "blocked" order: block b of 160 values, chunk i (32 lanes)
 * lane j holds the activation multiplied by digit i of byte j; the tail's unused lanes hold 0.
 */
#ifndef NATIVELM_TERNARY_H
#define NATIVELM_TERNARY_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define TB_BYTES 32
#define TB_CODES 160
#define T_PAD_BYTE 128 /* q of five zero codes: a tail block is padded with it */

static inline size_t t_row_bytes(int K) { return (size_t)(K + 4) / 5; }
static inline int t_blocks(int K) { return (K + TB_CODES - 1) / TB_CODES; }
static inline size_t t_blocked_len(int K) { return (size_t)t_blocks(K) * TB_CODES; }

/* One kernel family: integer and float dot products of packed rows with blocked activations.
 *   dot_i8:  acc[r*ld + n] = sum_k t[n][k] * x[r][k]  (exact int32); xsum[r] = sum of x[r]'s blocked values
 *   dot_f32: out[r*ld + n] = sum_k t[n][k] * x[r][k]  in the canonical order (32 lane sums, then a fixed
 *            tree), so every kernel gives the same bits.
 * w: n rows of t_row_bytes(K) bytes; x rows `xstride` elements apart; m activation rows. */
typedef struct TernaryKernel {
  const char *name;
  void (*dot_i8)(const uint8_t *w, size_t n, int K, const int8_t *x, const int32_t *xsum, size_t m,
                 size_t xstride, int32_t *acc, size_t ld);
  void (*dot_f32)(const uint8_t *w, size_t n, int K, const float *x, size_t m, size_t xstride, float *out,
                  size_t ld);
} TernaryKernel;

extern const TernaryKernel t_kernel_portable;
#if defined(__x86_64__)
extern const TernaryKernel t_kernel_avx2;
extern const TernaryKernel t_kernel_avxvnni;
extern const TernaryKernel t_kernel_avx512vnni;
#endif
#if defined(__aarch64__)
extern const TernaryKernel t_kernel_neon;
extern const TernaryKernel t_kernel_neon_dot;
#endif

/* The kernels this CPU can run, best first (NULL-terminated), and the one chosen for this process:
 * the best, or the one NATIVELM_OPS_KERNEL names (NULL and *error set when it names none of them). */
const TernaryKernel *const *t_kernels_available(void);
const TernaryKernel *t_kernel_choose(const char **error);

/* Shared by the kernels: the tail block of a row copied into a padded 32-byte block. */
static inline const uint8_t *t_block_at(const uint8_t *row, int b, int K, uint8_t pad[TB_BYTES]) {
  int full = K / TB_CODES;
  if (b < full) return row + (size_t)b * TB_BYTES;
  memset(pad, T_PAD_BYTE, TB_BYTES);
  memcpy(pad, row + (size_t)full * TB_BYTES, t_row_bytes(K - full * TB_CODES));
  return pad;
}

/* Canonical float reduction of 32 lane sums (every kernel uses this exact order). */
static inline float t_reduce32(const float a[32]) {
  float r[16];
  for (int j = 0; j < 16; j++) r[j] = a[j] + a[j + 16];
  for (int j = 0; j < 8; j++) r[j] = r[j] + r[j + 8];
  for (int j = 0; j < 4; j++) r[j] = r[j] + r[j + 4];
  for (int j = 0; j < 2; j++) r[j] = r[j] + r[j + 2];
  return r[0] + r[1];
}

/* Activation preparation (prepare.c): x (K floats) -> blocked layout. */
void t_block_f32(const float *x, int K, float *xb);
/* BitLinear's int8 quantization of x into blocked codes; returns s_x, sets *xsum. */
float t_quantize_i8(const float *x, int K, float act_eps, int8_t *xb, int32_t *xsum);
/* x / sqrt(mean(x^2) + eps) * gain, fp32 (mean accumulated in double). */
void t_rms_norm(const float *x, const float *gain, int K, float eps, float *out);

#endif

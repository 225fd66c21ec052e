/* Checks every kernel this CPU runs against the portable one, bit for bit, on many shapes (no ORT
 * needed: CI runs the ARM64 build of it under qemu-user). Exit 0 when all agree, 1 at the first
 * difference (printed), 2 on bad arguments. Usage: kernel_check [seed] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ternary.h"

static uint64_t state = 88172645463325252ull;
static uint32_t next(void) {
  state ^= state << 13;
  state ^= state >> 7;
  state ^= state << 17;
  return (uint32_t)(state >> 11);
}
static float uniform(void) { return (float)(next() % 2000001u) / 1000000.0f - 1.0f; }

/* extreme: every code of a row +1 or -1 (bytes 255 / 0) against constant activations (int8 +-127): the
 * largest sums a kernel's narrow accumulators can meet */
static int compare(const TernaryKernel *k, int K, size_t n, size_t m, int extreme) {
  size_t rb = t_row_bytes(K), L = t_blocked_len(K);
  uint8_t *w = malloc(n * rb);
  float *x = malloc(m * K * sizeof(float)), *xb = malloc(m * L * sizeof(float));
  int8_t *xq = malloc(m * L);
  int32_t *xsum = malloc(m * sizeof(int32_t)), *a0 = malloc(n * m * 4), *a1 = malloc(n * m * 4);
  float *f0 = malloc(n * m * 4), *f1 = malloc(n * m * 4);
  /* random valid packed bytes: q = ceil(v * 256 / 243) for v in 0..242 */
  for (size_t i = 0; i < n * rb; i++)
    w[i] = extreme ? ((i / rb) % 2 ? 0 : 255) : (uint8_t)(((next() % 243u) * 256u + 242u) / 243u);
  for (size_t r = 0; r < m; r++) {
    for (int i = 0; i < K; i++)
      x[r * K + i] = extreme ? (r % 2 ? -1.0f : 1.0f) : uniform() * (r % 3 == 2 ? 1e-3f : 1.0f);
    t_block_f32(x + r * K, K, xb + r * L);
    t_quantize_i8(x + r * K, K, 1e-5f, xq + r * L, &xsum[r]);
  }
  t_kernel_portable.dot_i8(w, n, K, xq, xsum, m, L, a0, n);
  k->dot_i8(w, n, K, xq, xsum, m, L, a1, n);
  t_kernel_portable.dot_f32(w, n, K, xb, m, L, f0, n);
  k->dot_f32(w, n, K, xb, m, L, f1, n);
  int bad = memcmp(a0, a1, n * m * 4) != 0 || memcmp(f0, f1, n * m * 4) != 0;
  if (bad) printf("kernel %s differs from portable at K=%d N=%zu M=%zu\n", k->name, K, n, m);
  free(w); free(x); free(xb); free(xq); free(xsum); free(a0); free(a1); free(f0); free(f1);
  return bad;
}

int main(int argc, char **argv) {
  if (argc > 2 || (argc == 2 && !(state = strtoull(argv[1], NULL, 10)))) {
    fprintf(stderr, "usage: kernel_check [seed > 0]\n");
    return 2;
  }
  static const int Ks[] = {1, 2, 4, 5, 7, 31, 64, 159, 160, 161, 333, 384, 768, 1000, 1920, 2081, 4096};
  static const size_t Ms[] = {1, 2, 3, 4, 5, 9};
  const TernaryKernel *const *list = t_kernels_available();
  int checks = 0;
  for (int i = 0; list[i]; i++) {
    if (list[i] == &t_kernel_portable) continue;
    for (size_t a = 0; a < sizeof Ks / sizeof *Ks; a++)
      for (size_t b = 0; b < sizeof Ms / sizeof *Ms; b++, checks++)
        if (compare(list[i], Ks[a], 1 + next() % 7, Ms[b], 0) || compare(list[i], Ks[a], 2 + next() % 6, Ms[b], 1)) return 1;
  }
  printf("kernel_check: %d shape checks, kernels:", checks);
  for (int i = 0; list[i]; i++) printf(" %s", list[i]->name);
  printf(" agree with portable\n");
  return 0;
}

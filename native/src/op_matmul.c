/* TernaryMatMul (domain nativelm): Y[..., N] = BitLinear(X[..., K]) with packed ternary W (docs/kernels.md). */
#include <stdlib.h>
#include <string.h>

#include "ort_glue.h"

typedef struct MatMulKernel {
  int64_t K, N, act_bits;
  float act_eps, norm_eps;
  const TernaryKernel *k;
} MatMulKernel;

typedef struct MatMulJob {
  const MatMulKernel *op;
  const uint8_t *w;
  size_t M, rb, chunk, L;
  const int8_t *xq;
  const int32_t *xsum;
  const float *sx, *xf;
  float sw, *y;
  int failed;
} MatMulJob;

static void matmul_task(void *data, size_t task) {
  MatMulJob *j = data;
  size_t N = (size_t)j->op->N, n0 = task * j->chunk, cn = n0 + j->chunk > N ? N - n0 : j->chunk;
  int K = (int)j->op->K;
  if (j->xq) {
    int32_t *acc = op_alloc(j->M * cn * sizeof(int32_t));
    if (!acc) { j->failed = 1; return; }
    j->op->k->dot_i8(j->w + n0 * j->rb, cn, K, j->xq, j->xsum, j->M, j->L, acc, cn);
    for (size_t r = 0; r < j->M; r++)
      for (size_t n = 0; n < cn; n++) j->y[r * N + n0 + n] = ((float)acc[r * cn + n] * j->sx[r]) * j->sw;
    free(acc);
    return;
  }
  j->op->k->dot_f32(j->w + n0 * j->rb, cn, K, j->xf, j->M, j->L, j->y + n0, N);
  for (size_t r = 0; r < j->M; r++)
    for (size_t n = 0; n < cn; n++) j->y[r * N + n0 + n] *= j->sw;
}

static OrtStatus *matmul_compute(void *kernel, OrtKernelContext *ctx) {
  const MatMulKernel *op = kernel;
  const char *name = "TernaryMatMul";
  Tensor x, w, s, g;
  int present, has_gain;
  OrtStatus *st;
  if ((st = op_input(ctx, name, 0, ORT_TENSOR_FLOAT, &x, &present))) return st;
  if ((st = op_input(ctx, name, 1, ORT_TENSOR_UINT8, &w, &present))) return st;
  if ((st = op_input(ctx, name, 2, ORT_TENSOR_FLOAT, &s, &present))) return st;
  if ((st = op_input(ctx, name, 3, ORT_TENSOR_FLOAT, &g, &has_gain))) return st;
  size_t K = (size_t)op->K, N = (size_t)op->N, rb = t_row_bytes((int)K);
  if (x.nd < 1 || (size_t)x.dims[x.nd - 1] != K)
    return op_error("%s: X's last dimension is %lld, expected K=%zu", name, x.nd ? (long long)x.dims[x.nd - 1] : -1LL, K);
  if (w.nd != 2 || (size_t)w.dims[0] != N || (size_t)w.dims[1] != rb)
    return op_error("%s: W must be uint8 [N=%zu, %zu] (packed_row_bytes(K=%zu)), got %zu dims", name, N, rb, K, w.nd);
  if (s.count != 1) return op_error("%s: scale must hold one value, got %zu", name, s.count);
  if (has_gain && g.count != K) return op_error("%s: gain must be [K=%zu], got %zu values", name, K, g.count);
  size_t M = x.count / K, L = t_blocked_len((int)K);
  int64_t dims[8];
  memcpy(dims, x.dims, x.nd * sizeof(int64_t));
  dims[x.nd - 1] = (int64_t)N;
  float *y;
  if ((st = op_output(ctx, dims, x.nd, &y))) return st;
  if (M == 0) return NULL;

  MatMulJob job = {op, w.data, M, rb, op_chunk_rows(N, rb), L, NULL, NULL, NULL, NULL, *(float *)s.data, y, 0};
  int quant = op->act_bits == 8;
  void *xbuf = op_alloc(M * L * (quant ? 1 : sizeof(float))), *normed = has_gain ? op_alloc(K * sizeof(float)) : NULL;
  int32_t *xsum = op_alloc(M * sizeof(int32_t));
  float *sx = op_alloc(M * sizeof(float));
  if (!xbuf || !xsum || !sx || (has_gain && !normed)) {
    st = op_error("%s: out of memory", name);
    goto done;
  }
  for (size_t r = 0; r < M; r++) {
    const float *xr = (const float *)x.data + r * K;
    if (has_gain) {
      t_rms_norm(xr, g.data, (int)K, op->norm_eps, normed);
      xr = normed;
    }
    if (quant)
      sx[r] = t_quantize_i8(xr, (int)K, op->act_eps, (int8_t *)xbuf + r * L, &xsum[r]);
    else
      t_block_f32(xr, (int)K, (float *)xbuf + r * L);
  }
  if (quant) {
    job.xq = xbuf;
    job.xsum = xsum;
    job.sx = sx;
  } else {
    job.xf = xbuf;
  }
  st = op_parallel(ctx, matmul_task, (N + job.chunk - 1) / job.chunk, &job);
  if (!st && job.failed) st = op_error("%s: out of memory", name);
done:
  free(xbuf);
  free(normed);
  free(xsum);
  free(sx);
  return st;
}

static OrtStatus *matmul_create(const OrtCustomOp *self, const OrtApi *api, const OrtKernelInfo *info, void **out) {
  (void)self;
  (void)api;
  MatMulKernel *op = calloc(1, sizeof *op);
  OrtStatus *st = NULL;
  if (!op) return op_error("TernaryMatMul: out of memory");
  if (!st) st = op_attr_int(info, "K", 1, 0, &op->K);
  if (!st) st = op_attr_int(info, "N", 1, 0, &op->N);
  if (!st) st = op_attr_int(info, "act_bits", 0, 8, &op->act_bits);
  if (!st) st = op_attr_float(info, "act_eps", 1e-5f, &op->act_eps);
  if (!st) st = op_attr_float(info, "norm_eps", 1e-5f, &op->norm_eps);
  if (!st && (op->K < 1 || op->N < 1)) st = op_error("TernaryMatMul: K and N must be >= 1 (K=%lld, N=%lld)", (long long)op->K, (long long)op->N);
  return op_created("TernaryMatMul", op, op->act_bits, &op->k, st, out);
}

static const char *matmul_name(const OrtCustomOp *op) { (void)op; return "TernaryMatMul"; }
static int matmul_input_type(const OrtCustomOp *op, size_t i) { (void)op; return i == 1 ? ORT_TENSOR_UINT8 : ORT_TENSOR_FLOAT; }
static size_t matmul_input_count(const OrtCustomOp *op) { (void)op; return 4; }
static int matmul_input_kind(const OrtCustomOp *op, size_t i) { (void)op; return i == 3 ? ORT_IO_OPTIONAL : ORT_IO_REQUIRED; }

void op_matmul_define(OrtCustomOp *op) {
  static const OpCallbacks cb = {matmul_name, matmul_input_type, matmul_input_count, matmul_input_kind, matmul_create, matmul_compute};
  op_define(op, &cb);
}

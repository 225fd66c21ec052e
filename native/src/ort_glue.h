/* Small helpers over the declared ORT ABI (nativelm_ort_abi.h) shared by the operators. */
#ifndef NATIVELM_ORT_GLUE_H
#define NATIVELM_ORT_GLUE_H

#include "nativelm_ort_abi.h"
#include "ternary.h"

typedef struct Tensor {
  void *data;
  int64_t dims[8];
  size_t nd;
  int type;
  size_t count;
} Tensor;

typedef struct OpState {
  const OrtApi *api;
  int parallel; /* KernelContext_ParallelFor is there (API >= 17) */
} OpState;

extern OpState g_ort;

/* A status with one formatted line (ORT shows it as the session's error). */
OrtStatus *op_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Input `index` (present = 0 when an optional input is absent), checked to be of `type`. */
OrtStatus *op_input(OrtKernelContext *ctx, const char *op, size_t index, int type, Tensor *t, int *present);
OrtStatus *op_output(OrtKernelContext *ctx, const int64_t *dims, size_t nd, float **out);
OrtStatus *op_attr_int(const OrtKernelInfo *info, const char *name, int required, int64_t fallback, int64_t *out);
OrtStatus *op_attr_float(const OrtKernelInfo *info, const char *name, float fallback, float *out);
/* fn(data, i) for i in [0, total): on the session's intra-op threads when ORT offers them. */
OrtStatus *op_parallel(OrtKernelContext *ctx, void (*fn)(void *, size_t), size_t total, void *data);
/* Rows of weights per parallel task: at least 8 KiB of weights, at most 64 tasks. */
size_t op_chunk_rows(size_t n, size_t row_bytes);
/* The kernel for a new operator instance (NATIVELM_OPS_KERNEL or the best this CPU runs). */
OrtStatus *op_kernel(const TernaryKernel **out);
void *op_alloc(size_t bytes);
/* The end of every CreateKernelV2: checks act_bits (8 or 0), picks the kernel, then hands `op` to ORT
 * in *out, or frees it and returns the first error. */
OrtStatus *op_created(const char *name, void *op, int64_t act_bits, const TernaryKernel **k, OrtStatus *st,
                      void **out);

/* What differs between the operators; op_define (op_define.c) fills the rest of an OrtCustomOp. */
typedef struct OpCallbacks {
  const char *(*name)(const OrtCustomOp *op);
  int (*input_type)(const OrtCustomOp *op, size_t index);
  size_t (*input_count)(const OrtCustomOp *op);
  int (*input_kind)(const OrtCustomOp *op, size_t index);
  OrtStatus *(*create)(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **kernel);
  OrtStatus *(*compute)(void *kernel, OrtKernelContext *ctx);
} OpCallbacks;
void op_define(OrtCustomOp *op, const OpCallbacks *cb);

#endif

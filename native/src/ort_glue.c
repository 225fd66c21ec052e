/* ORT plumbing shared by the operators: inputs, outputs, attributes, errors, the thread pool. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "ort_glue.h"

OpState g_ort;

OrtStatus *op_error(const char *fmt, ...) {
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  return ORT_CALL(g_ort.api, CreateStatus)(ORT_INVALID_ARGUMENT_, msg);
}

void *op_alloc(size_t bytes) {
  void *p = NULL;
  return posix_memalign(&p, 64, bytes ? bytes : 64) == 0 ? p : NULL;
}

OrtStatus *op_input(OrtKernelContext *ctx, const char *op, size_t index, int type, Tensor *t, int *present) {
  const OrtApi *api = g_ort.api;
  size_t count = 0;
  OrtStatus *st = ORT_CALL(api, KernelContext_GetInputCount)(ctx, &count);
  if (st) return st;
  const OrtValue *value = NULL;
  if (index < count && (st = ORT_CALL(api, KernelContext_GetInput)(ctx, index, &value))) return st;
  *present = value != NULL;
  if (!value) return NULL;
  OrtTensorTypeAndShapeInfo *info = NULL;
  if ((st = ORT_CALL(api, GetTensorTypeAndShape)(value, &info))) return st;
  if (!(st = ORT_CALL(api, GetDimensionsCount)(info, &t->nd)) && t->nd > 8) st = op_error("%s: input %zu has %zu dims (at most 8)", op, index, t->nd);
  if (!st) st = ORT_CALL(api, GetDimensions)(info, t->dims, t->nd);
  if (!st) st = ORT_CALL(api, GetTensorElementType)(info, &t->type);
  ORT_CALL(api, ReleaseTensorTypeAndShapeInfo)(info);
  if (st) return st;
  if (t->type != type) return op_error("%s: input %zu has element type %d, expected %d", op, index, t->type, type);
  t->count = 1;
  for (size_t i = 0; i < t->nd; i++) t->count *= (size_t)t->dims[i];
  /* weights are read in place: the data pointer is the initializer's own buffer */
  return ORT_CALL(api, GetTensorMutableData)((OrtValue *)value, &t->data);
}

OrtStatus *op_output(OrtKernelContext *ctx, const int64_t *dims, size_t nd, float **out) {
  OrtValue *value = NULL;
  OrtStatus *st = ORT_CALL(g_ort.api, KernelContext_GetOutput)(ctx, 0, dims, nd, &value);
  if (st) return st;
  return ORT_CALL(g_ort.api, GetTensorMutableData)(value, (void **)out);
}

OrtStatus *op_attr_int(const OrtKernelInfo *info, const char *name, int required, int64_t fallback, int64_t *out) {
  OrtStatus *st = ORT_CALL(g_ort.api, KernelInfoGetAttribute_int64)(info, name, out);
  if (!st) return NULL;
  ORT_CALL(g_ort.api, ReleaseStatus)(st);
  if (required) return op_error("missing integer attribute '%s'", name);
  *out = fallback;
  return NULL;
}

OrtStatus *op_attr_float(const OrtKernelInfo *info, const char *name, float fallback, float *out) {
  OrtStatus *st = ORT_CALL(g_ort.api, KernelInfoGetAttribute_float)(info, name, out);
  if (st) {
    ORT_CALL(g_ort.api, ReleaseStatus)(st);
    *out = fallback;
  }
  return NULL;
}

OrtStatus *op_parallel(OrtKernelContext *ctx, void (*fn)(void *, size_t), size_t total, void *data) {
  if (total > 1 && g_ort.parallel)
    return ORT_CALL(g_ort.api, KernelContext_ParallelFor)(ctx, fn, total, 0, data);
  for (size_t i = 0; i < total; i++) fn(data, i);
  return NULL;
}

size_t op_chunk_rows(size_t n, size_t row_bytes) {
  size_t rows = (8192 + row_bytes - 1) / row_bytes, spread = (n + 63) / 64;
  if (rows < spread) rows = spread;
  return rows < n ? rows : (n ? n : 1);
}

OrtStatus *op_kernel(const TernaryKernel **out) {
  const char *error = NULL;
  *out = t_kernel_choose(&error);
  return *out ? NULL : op_error("%s", error);
}

OrtStatus *op_created(const char *name, void *op, int64_t act_bits, const TernaryKernel **k, OrtStatus *st,
                      void **out) {
  if (!st && act_bits != 8 && act_bits != 0)
    st = op_error("%s: act_bits must be 8 or 0, got %lld", name, (long long)act_bits);
  if (!st) st = op_kernel(k);
  if (st) {
    free(op);
    return st;
  }
  *out = op;
  return NULL;
}

/* The part of ONNX Runtime's C ABI that the nativelm operator library uses, declared here.
 *
 * ORT's Python wheel ships no C headers, so this library declares the documented ABI itself
 * (docs/kernels.md says how the slots were checked): OrtApi is a table of function pointers whose
 * order never changes between releases; only the slots used here are named, by their index.
 * OrtCustomOp is declared in full (ORT reads it by its `version` field).
 */
#ifndef NATIVELM_ORT_ABI_H
#define NATIVELM_ORT_ABI_H

#include <stddef.h>
#include <stdint.h>

typedef struct OrtStatus OrtStatus;
typedef struct OrtValue OrtValue;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtShapeInferContext OrtShapeInferContext;

enum { ORT_OK_ = 0, ORT_FAIL_ = 1, ORT_INVALID_ARGUMENT_ = 2 };                 /* OrtErrorCode */
enum { ORT_TENSOR_FLOAT = 1, ORT_TENSOR_UINT8 = 2 };                            /* ONNXTensorElementDataType */
enum { ORT_IO_REQUIRED = 0, ORT_IO_OPTIONAL = 1 };                              /* OrtCustomOpInputOutputCharacteristic */

/* The API version asked for: 17 is the first with KernelContext_ParallelFor; 16 runs on one thread. */
#define NATIVELM_ORT_API_VERSION 17
#define NATIVELM_ORT_API_VERSION_MIN 16

/* OrtApi slot indices (0-based positions in the function-pointer table). */
enum {
  ORT_SLOT_CreateStatus = 0,
  ORT_SLOT_GetErrorMessage = 2,
  ORT_SLOT_CreateCustomOpDomain = 26,
  ORT_SLOT_CustomOpDomain_Add = 27,
  ORT_SLOT_AddCustomOpDomain = 28,
  ORT_SLOT_GetTensorMutableData = 51,
  ORT_SLOT_GetTensorElementType = 60,
  ORT_SLOT_GetDimensionsCount = 61,
  ORT_SLOT_GetDimensions = 62,
  ORT_SLOT_GetTensorTypeAndShape = 65,
  ORT_SLOT_KernelInfoGetAttribute_float = 85,
  ORT_SLOT_KernelInfoGetAttribute_int64 = 86,
  ORT_SLOT_KernelContext_GetInputCount = 88,
  ORT_SLOT_KernelContext_GetInput = 90,
  ORT_SLOT_KernelContext_GetOutput = 91,
  ORT_SLOT_ReleaseStatus = 93,
  ORT_SLOT_ReleaseTensorTypeAndShapeInfo = 99,
  ORT_SLOT_GetBuildInfoString = 254, /* checked by the tests: its answer names ORT's build */
  ORT_SLOT_KernelContext_ParallelFor = 274,
};

typedef void (*OrtFnPtr)(void);
typedef struct OrtApi { OrtFnPtr slot[1]; } OrtApi; /* indexed past [0]: the real table is longer */

typedef struct OrtApiBase {
  const OrtApi *(*GetApi)(uint32_t version);
  const char *(*GetVersionString)(void);
} OrtApiBase;

/* Signatures of the slots used (all return NULL for success, else a status to release). */
typedef OrtStatus *(*OrtCreateStatusFn)(int code, const char *msg);
typedef const char *(*OrtGetErrorMessageFn)(const OrtStatus *status);
typedef OrtStatus *(*OrtCreateCustomOpDomainFn)(const char *domain, OrtCustomOpDomain **out);
typedef OrtStatus *(*OrtCustomOpDomain_AddFn)(OrtCustomOpDomain *domain, const void *op);
typedef OrtStatus *(*OrtAddCustomOpDomainFn)(OrtSessionOptions *options, OrtCustomOpDomain *domain);
typedef OrtStatus *(*OrtGetTensorMutableDataFn)(OrtValue *value, void **out);
typedef OrtStatus *(*OrtGetTensorElementTypeFn)(const OrtTensorTypeAndShapeInfo *info, int *out);
typedef OrtStatus *(*OrtGetDimensionsCountFn)(const OrtTensorTypeAndShapeInfo *info, size_t *out);
typedef OrtStatus *(*OrtGetDimensionsFn)(const OrtTensorTypeAndShapeInfo *info, int64_t *dims, size_t n);
typedef OrtStatus *(*OrtGetTensorTypeAndShapeFn)(const OrtValue *value, OrtTensorTypeAndShapeInfo **out);
typedef OrtStatus *(*OrtKernelInfoGetAttribute_floatFn)(const OrtKernelInfo *info, const char *name, float *out);
typedef OrtStatus *(*OrtKernelInfoGetAttribute_int64Fn)(const OrtKernelInfo *info, const char *name, int64_t *out);
typedef OrtStatus *(*OrtKernelContext_GetInputCountFn)(const OrtKernelContext *ctx, size_t *out);
typedef OrtStatus *(*OrtKernelContext_GetInputFn)(const OrtKernelContext *ctx, size_t index, const OrtValue **out);
typedef OrtStatus *(*OrtKernelContext_GetOutputFn)(OrtKernelContext *ctx, size_t index, const int64_t *dims,
                                                  size_t n, OrtValue **out);
typedef void (*OrtReleaseStatusFn)(OrtStatus *status);
typedef void (*OrtReleaseTensorTypeAndShapeInfoFn)(OrtTensorTypeAndShapeInfo *info);
typedef const char *(*OrtGetBuildInfoStringFn)(void);
typedef OrtStatus *(*OrtKernelContext_ParallelForFn)(const OrtKernelContext *ctx, void (*fn)(void *, size_t),
                                                    size_t total, size_t num_batch, void *user_data);

#define ORT_CALL(api, name) ((Ort##name##Fn)(api)->slot[ORT_SLOT_##name])

/* OrtCustomOp, every member in ORT's order (version 17 reads up to GetEndVersion). */
typedef struct OrtCustomOp {
  uint32_t version;
  void *(*CreateKernel)(const struct OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info);
  const char *(*GetName)(const struct OrtCustomOp *op);
  const char *(*GetExecutionProviderType)(const struct OrtCustomOp *op);
  int (*GetInputType)(const struct OrtCustomOp *op, size_t index);
  size_t (*GetInputTypeCount)(const struct OrtCustomOp *op);
  int (*GetOutputType)(const struct OrtCustomOp *op, size_t index);
  size_t (*GetOutputTypeCount)(const struct OrtCustomOp *op);
  void (*KernelCompute)(void *kernel, OrtKernelContext *ctx);
  void (*KernelDestroy)(void *kernel);
  int (*GetInputCharacteristic)(const struct OrtCustomOp *op, size_t index);
  int (*GetOutputCharacteristic)(const struct OrtCustomOp *op, size_t index);
  int (*GetInputMemoryType)(const struct OrtCustomOp *op, size_t index);
  int (*GetVariadicInputMinArity)(const struct OrtCustomOp *op);
  int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp *op);
  int (*GetVariadicOutputMinArity)(const struct OrtCustomOp *op);
  int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp *op);
  OrtStatus *(*CreateKernelV2)(const struct OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info,
                               void **kernel);
  OrtStatus *(*KernelComputeV2)(void *kernel, OrtKernelContext *ctx);
  OrtStatus *(*InferOutputShapeFn)(const struct OrtCustomOp *op, OrtShapeInferContext *ctx);
  int (*GetStartVersion)(const struct OrtCustomOp *op);
  int (*GetEndVersion)(const struct OrtCustomOp *op);
  size_t (*GetMayInplace)(int **input_index, int **output_index);
  void (*ReleaseMayInplace)(int *input_index, int *output_index);
  size_t (*GetAliasMap)(int **input_index, int **output_index);
  void (*ReleaseAliasMap)(int *input_index, int *output_index);
} OrtCustomOp;

#endif

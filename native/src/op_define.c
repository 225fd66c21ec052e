/* op_define: the parts of an OrtCustomOp that every nativelm operator shares (one float output, the
 * CPU provider, version 1, no aliasing); each operator file supplies only what differs (OpCallbacks). */
#include <stdlib.h>
#include <string.h>

#include "ort_glue.h"

static int output_type(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return ORT_TENSOR_FLOAT; }
static size_t output_count(const OrtCustomOp *op) { (void)op; return 1; }
static int output_kind(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return ORT_IO_REQUIRED; }
static int memory_type(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return 0; /* OrtMemTypeDefault */ }
static int one(const OrtCustomOp *op) { (void)op; return 1; }
static int zero(const OrtCustomOp *op) { (void)op; return 0; }
static int last_version(const OrtCustomOp *op) { (void)op; return 1; }
static void destroy(void *kernel) { free(kernel); }
static const char *cpu_provider(const OrtCustomOp *op) { (void)op; return NULL; /* NULL: the CPU provider */ }
static size_t no_pairs(int **inputs, int **outputs) { *inputs = *outputs = NULL; return 0; }
static void release_pairs(int *inputs, int *outputs) { (void)inputs; (void)outputs; }

void op_define(OrtCustomOp *op, const OpCallbacks *cb) {
  memset(op, 0, sizeof *op);
  op->GetName = cb->name;
  op->GetInputType = cb->input_type;
  op->GetInputTypeCount = cb->input_count;
  op->GetInputCharacteristic = cb->input_kind;
  op->CreateKernelV2 = cb->create;
  op->KernelComputeV2 = cb->compute;
  op->version = NATIVELM_ORT_API_VERSION;
  op->GetOutputType = output_type;
  op->GetOutputTypeCount = output_count;
  op->GetOutputCharacteristic = output_kind;
  op->GetInputMemoryType = memory_type;
  op->GetVariadicInputMinArity = one;
  op->GetVariadicInputHomogeneity = zero;
  op->GetVariadicOutputMinArity = one;
  op->GetVariadicOutputHomogeneity = zero;
  op->GetStartVersion = one;
  op->GetEndVersion = last_version;
  op->KernelDestroy = destroy;
  op->GetExecutionProviderType = cpu_provider; /* ORT calls these without a NULL check */
  op->GetMayInplace = no_pairs;
  op->ReleaseMayInplace = release_pairs;
  op->GetAliasMap = no_pairs;
  op->ReleaseAliasMap = release_pairs;
}

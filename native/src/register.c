/* The library's entry points: RegisterCustomOps (ORT calls it) and what the Python loader asks. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ort_glue.h"

#define EXPORT __attribute__((visibility("default")))

void op_matmul_define(OrtCustomOp *op);
void op_moe_define(OrtCustomOp *op);

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

static OrtCustomOp ops[2];
static pthread_once_t ops_once = PTHREAD_ONCE_INIT;

static void define_ops(void) {
  op_matmul_define(&ops[0]);
  op_moe_define(&ops[1]);
  if (!g_ort.parallel) ops[0].version = ops[1].version = NATIVELM_ORT_API_VERSION_MIN;
}

EXPORT OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
  const OrtApi *api = base->GetApi(NATIVELM_ORT_API_VERSION);
  g_ort.parallel = api != NULL;
  if (!api) api = base->GetApi(NATIVELM_ORT_API_VERSION_MIN);
  if (!api) return NULL; /* an ORT too old to report an error to: it then fails on the unknown operators */
  g_ort.api = api;
  const TernaryKernel *k;
  OrtStatus *st = op_kernel(&k);
  if (st) return st;
  pthread_once(&ops_once, define_ops); /* once: sessions already running keep reading these */
  OrtCustomOpDomain *domain = NULL; /* lives as long as the process: sessions keep using it */
  if ((st = ORT_CALL(api, CreateCustomOpDomain)("nativelm", &domain))) return st;
  for (int i = 0; i < 2; i++)
    if ((st = ORT_CALL(api, CustomOpDomain_Add)(domain, &ops[i]))) return st;
  return ORT_CALL(api, AddCustomOpDomain)(options, domain);
}

/* The kernel a session created now would use (NULL when NATIVELM_OPS_KERNEL names none this CPU runs). */
EXPORT const char *nativelm_ops_kernel(void) {
  const char *error = NULL;
  const TernaryKernel *k = t_kernel_choose(&error);
  return k ? k->name : NULL;
}

/* Every kernel this CPU runs, best first, comma-separated. */
EXPORT const char *nativelm_ops_kernels(void) {
  static char names[128];
  size_t used = 0;
  const TernaryKernel *const *list = t_kernels_available();
  for (int i = 0; list[i] && used < sizeof names; i++)
    used += (size_t)snprintf(names + used, sizeof names - used, "%s%s", i ? "," : "", list[i]->name);
  return names;
}

/* Whether this ORT's session thread pool is used (KernelContext_ParallelFor); 0 before registration. */
EXPORT int nativelm_ops_threaded(void) { return g_ort.parallel; }

/* ORT's build description read through the declared slot table (a check of the slot numbering:
 * a wrong count would not answer "ORT Build Info ..."); NULL before registration. */
EXPORT const char *nativelm_ops_ort_build_info(void) {
  return g_ort.api ? ORT_CALL(g_ort.api, GetBuildInfoString)() : NULL;
}

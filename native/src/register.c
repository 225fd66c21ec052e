/* The library's entry points: RegisterCustomOps (ORT calls it) and what the Python loader asks. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ort_glue.h"

#define EXPORT __attribute__((visibility("default")))

void op_matmul_define(OrtCustomOp *op);
void op_moe_define(OrtCustomOp *op);

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

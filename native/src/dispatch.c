/* Run-time kernel choice: the best kernel the CPU supports, or the one NATIVELM_OPS_KERNEL names. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ternary.h"

#if defined(__aarch64__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

const TernaryKernel *const *t_kernels_available(void) {
  static const TernaryKernel *list[6];
  static int ready = 0;
  if (!ready) {
    int n = 0;
#if defined(__x86_64__)
    __builtin_cpu_init();
    int avxvnni = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("avxvnni");
    if (avxvnni && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vnni"))
      list[n++] = &t_kernel_avx512vnni;
    if (avxvnni) list[n++] = &t_kernel_avxvnni;
    if (__builtin_cpu_supports("avx2")) list[n++] = &t_kernel_avx2;
#endif
#if defined(__aarch64__)
    if (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) list[n++] = &t_kernel_neon_dot;
    list[n++] = &t_kernel_neon;
#endif
    list[n++] = &t_kernel_portable;
    list[n] = NULL;
    ready = 1;
  }
  return list;
}

const TernaryKernel *t_kernel_choose(const char **error) {
  static char message[256];
  const TernaryKernel *const *list = t_kernels_available();
  const char *want = getenv("NATIVELM_OPS_KERNEL");
  if (!want || !*want) return list[0];
  int used = snprintf(message, sizeof message, "NATIVELM_OPS_KERNEL=%.40s: not a kernel this CPU runs (choose from:", want);
  for (int i = 0; list[i]; i++) {
    if (strcmp(list[i]->name, want) == 0) return list[i];
    used += snprintf(message + used, sizeof message - (size_t)used, " %.20s", list[i]->name);
  }
  snprintf(message + used, sizeof message - (size_t)used, ")");
  *error = message;
  return NULL;
}

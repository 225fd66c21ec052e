/* The bandwidth roofline for bench/ternary_kernels.py: T threads (pinned to cores 0..T-1) each read
 * their slice of a buffer far larger than the last-level cache with wide loads, R times.
 * Prints one line per repetition: "<GB/s>". Usage: read_bandwidth MiB threads reps */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef uint64_t v4u __attribute__((vector_size(32)));

typedef struct Slice {
  const v4u *data;
  size_t n;
  int cpu;
  pthread_barrier_t *start;
  uint64_t sink;
} Slice;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void *reader(void *arg) {
  Slice *s = arg;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(s->cpu, &set);
  pthread_setaffinity_np(pthread_self(), sizeof set, &set);
  pthread_barrier_wait(s->start);
  v4u a = {0}, b = {0}, c = {0}, d = {0};
  for (size_t i = 0; i + 4 <= s->n; i += 4) { /* four independent chains keep the loads in flight */
    a += s->data[i];
    b += s->data[i + 1];
    c += s->data[i + 2];
    d += s->data[i + 3];
  }
  v4u t = a + b + c + d;
  s->sink = t[0] + t[1] + t[2] + t[3];
  return NULL;
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: read_bandwidth MiB threads reps\n");
    return 2;
  }
  size_t bytes = (size_t)atol(argv[1]) << 20;
  int threads = atoi(argv[2]), reps = atoi(argv[3]);
  if (!bytes || threads < 1 || threads > 256 || reps < 1) {
    fprintf(stderr, "read_bandwidth: MiB, threads (1-256) and reps must be positive\n");
    return 2;
  }
  v4u *buf = NULL;
  if (posix_memalign((void **)&buf, 64, bytes)) return 1;
  memset(buf, 1, bytes);
  size_t per = bytes / sizeof(v4u) / (size_t)threads;
  for (int r = 0; r < reps; r++) {
    pthread_barrier_t start;
    pthread_barrier_init(&start, NULL, (unsigned)threads + 1);
    pthread_t tid[256];
    Slice s[256];
    for (int i = 0; i < threads; i++) {
      s[i] = (Slice){buf + per * (size_t)i, per, i, &start, 0};
      pthread_create(&tid[i], NULL, reader, &s[i]);
    }
    pthread_barrier_wait(&start);
    double t0 = now();
    for (int i = 0; i < threads; i++) pthread_join(tid[i], NULL);
    double dt = now() - t0;
    pthread_barrier_destroy(&start);
    printf("%.3f\n", (double)(per * (size_t)threads * sizeof(v4u)) / dt / 1e9);
  }
  free(buf);
  return 0;
}

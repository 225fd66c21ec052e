/* TernaryMoE (domain nativelm): router top-k over softmax(logits) and ReGLU experts
 * y[m] = sum_k w_k * down_e(relu(gate_e(x)) * up_e(x)) with packed ternary expert weights. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ort_glue.h"

typedef struct MoEKernel {
  int64_t top_k, act_bits;
  float act_eps;
  const TernaryKernel *k;
} MoEKernel;

/* Activation rows of the assignments (token, expert) grouped by expert, ready for the kernels. */
typedef struct Rows {
  size_t K, L; /* features, blocked length */
  int quant;
  void *x;     /* [A][L] int8 or float */
  int32_t *xsum;
  float *sx;
} Rows;

typedef struct Task { size_t e, n0, cn; } Task;

typedef struct MoEJob {
  const MoEKernel *op;
  const size_t *start;         /* [E + 1]: assignments of expert e are start[e] .. start[e+1]-1 */
  const Task *tasks;
  const Rows *in;
  const uint8_t *w[2];         /* one or two weight stacks [E][N][rb] applied to the same rows */
  const float *s[2];
  size_t n_w, N, rb;
  float *out[2];               /* [A][N] */
  int failed;
} MoEJob;

/* The rows of `task` (one expert, output rows n0 .. n0+cn-1) times each weight stack of `j`. */
static void apply(MoEJob *j, const Task *task) {
  size_t a0 = j->start[task->e], m = j->start[task->e + 1] - a0;
  const Rows *in = j->in;
  int32_t *acc = in->quant ? op_alloc(m * task->cn * sizeof(int32_t)) : NULL;
  if (in->quant && !acc) { j->failed = 1; return; }
  for (size_t v = 0; v < j->n_w; v++) {
    const uint8_t *w = j->w[v] + (task->e * j->N + task->n0) * j->rb;
    float sw = j->s[v][task->e], *out = j->out[v] + a0 * j->N + task->n0;
    if (in->quant) {
      j->op->k->dot_i8(w, task->cn, (int)in->K, (const int8_t *)in->x + a0 * in->L, in->xsum + a0, m, in->L, acc, task->cn);
      for (size_t r = 0; r < m; r++)
        for (size_t n = 0; n < task->cn; n++) out[r * j->N + n] = ((float)acc[r * task->cn + n] * in->sx[a0 + r]) * sw;
    } else {
      j->op->k->dot_f32(w, task->cn, (int)in->K, (const float *)in->x + a0 * in->L, m, in->L, out, j->N);
      for (size_t r = 0; r < m; r++)
        for (size_t n = 0; n < task->cn; n++) out[r * j->N + n] *= sw;
    }
  }
  free(acc);
}

static void moe_task(void *data, size_t t) {
  MoEJob *j = data;
  apply(j, &j->tasks[t]);
}

static void prepare_row(Rows *rows, size_t a, const float *x, float eps) {
  if (rows->quant)
    rows->sx[a] = t_quantize_i8(x, (int)rows->K, eps, (int8_t *)rows->x + a * rows->L, &rows->xsum[a]);
  else
    t_block_f32(x, (int)rows->K, (float *)rows->x + a * rows->L);
}

static int rows_alloc(Rows *rows, size_t A, size_t K, int quant) {
  rows->K = K;
  rows->L = t_blocked_len((int)K);
  rows->quant = quant;
  rows->x = op_alloc(A * rows->L * (quant ? 1 : sizeof(float)));
  rows->xsum = op_alloc(A * sizeof(int32_t));
  rows->sx = op_alloc(A * sizeof(float));
  return rows->x && rows->xsum && rows->sx;
}

static void rows_free(Rows *rows) {
  free(rows->x);
  free(rows->xsum);
  free(rows->sx);
}

/* Softmax over all E, the top k (ties: the lower expert first), renormalised. */
static void route(const float *logits, size_t E, size_t k, float *p, size_t *experts, float *weights) {
  float mx = logits[0], sum = 0.0f, wsum = 0.0f;
  for (size_t e = 1; e < E; e++) mx = fmaxf(mx, logits[e]);
  for (size_t e = 0; e < E; e++) sum += (p[e] = expf(logits[e] - mx));
  for (size_t e = 0; e < E; e++) p[e] = p[e] / sum;
  for (size_t i = 0; i < k; i++) {
    size_t best = E;
    for (size_t e = 0; e < E; e++) {
      int taken = 0;
      for (size_t q = 0; q < i; q++) taken |= experts[q] == e;
      if (!taken && (best == E || p[e] > p[best])) best = e;
    }
    experts[i] = best;
    wsum += (weights[i] = p[best]);
  }
  for (size_t i = 0; i < k; i++) weights[i] = weights[i] / wsum;
}

/* Few rows (decode): one task per active expert does its gate and up, ReGLU, and its down, so the
 * operator waits on the thread pool once instead of twice; every row is computed as the two-phase
 * path computes it (same kernels, same order), so the result is the same bit for bit. */
typedef struct ExpertJob {
  MoEJob *up, *down;
  const size_t *active; /* the experts with rows */
  const float *g, *u;
  Rows *hin;
  size_t W;
  float eps;
} ExpertJob;

static void relu_gate_row(const ExpertJob *j, size_t a) {
  float *h = (float *)j->g + a * j->W;
  const float *u = j->u + a * j->W;
  for (size_t n = 0; n < j->W; n++) h[n] = fmaxf(h[n], 0.0f) * u[n];
  prepare_row(j->hin, a, h, j->eps);
}

static void expert_task(void *data, size_t t) {
  ExpertJob *j = data;
  size_t e = j->active[t];
  Task gate_up = {e, 0, j->up->N}, down = {e, 0, j->down->N};
  apply(j->up, &gate_up);
  for (size_t a = j->up->start[e]; a < j->up->start[e + 1]; a++) relu_gate_row(j, a);
  apply(j->down, &down);
}

enum { FUSED_MAX_TOKENS = 8 }; /* up to this many tokens a call runs one task per expert */

static size_t make_tasks(const size_t *start, size_t E, size_t N, size_t rb, Task *tasks) {
  size_t n = 0, chunk = op_chunk_rows(N, rb);
  for (size_t e = 0; e < E; e++)
    if (start[e + 1] > start[e])
      for (size_t n0 = 0; n0 < N; n0 += chunk, n++)
        if (tasks) tasks[n] = (Task){e, n0, n0 + chunk > N ? N - n0 : chunk}; /* NULL: count only */
  return n;
}

static OrtStatus *check3(const char *name, const Tensor *w, size_t E, size_t N, size_t K, const Tensor *s, const char *what) {
  if (w->nd != 3 || (size_t)w->dims[0] != E || (size_t)w->dims[1] != N || (size_t)w->dims[2] != t_row_bytes((int)K))
    return op_error("%s: W_%s must be uint8 [E=%zu, %zu, %zu]", name, what, E, N, t_row_bytes((int)K));
  if (s->count != E) return op_error("%s: s_%s must be [E=%zu], got %zu values", name, what, E, s->count);
  return NULL;
}

static OrtStatus *moe_compute(void *kernel, OrtKernelContext *ctx) {
  const MoEKernel *op = kernel;
  const char *name = "TernaryMoE";
  Tensor t[8];
  int present;
  OrtStatus *st;
  static const int types[8] = {ORT_TENSOR_FLOAT, ORT_TENSOR_FLOAT, ORT_TENSOR_UINT8, ORT_TENSOR_FLOAT,
                               ORT_TENSOR_UINT8, ORT_TENSOR_FLOAT, ORT_TENSOR_UINT8, ORT_TENSOR_FLOAT};
  for (size_t i = 0; i < 8; i++)
    if ((st = op_input(ctx, name, i, types[i], &t[i], &present))) return st;
  /* X [..., d] and logits [..., E]: the same M rows (tokens) whatever the leading dimensions */
  if (t[0].nd < 1 || t[1].nd < 1 || t[0].dims[t[0].nd - 1] < 1 || t[1].dims[t[1].nd - 1] < 1 ||
      t[0].count / (size_t)t[0].dims[t[0].nd - 1] != t[1].count / (size_t)t[1].dims[t[1].nd - 1])
    return op_error("%s: X must be [..., d] and logits [..., E] with as many rows", name);
  size_t d = (size_t)t[0].dims[t[0].nd - 1], E = (size_t)t[1].dims[t[1].nd - 1], M = t[0].count / d;
  size_t W = t[2].nd == 3 ? (size_t)t[2].dims[1] : 0, k = (size_t)op->top_k;
  if (k > E) return op_error("%s: top_k=%zu is more than the %zu experts", name, k, E);
  if ((st = check3(name, &t[2], E, W, d, &t[3], "gate")) || (st = check3(name, &t[4], E, W, d, &t[5], "up")) ||
      (st = check3(name, &t[6], E, d, W, &t[7], "down")))
    return st;
  float *y;
  if ((st = op_output(ctx, t[0].dims, t[0].nd, &y))) return st;
  if (M == 0) return NULL;

  size_t A = M * k;
  size_t *experts = op_alloc(A * sizeof(size_t)), *start = op_alloc((E + 1) * sizeof(size_t));
  size_t *slot = op_alloc(A * sizeof(size_t)); /* slot[m*k + i]: the assignment row of (m, i) */
  size_t *experts_active = op_alloc(E * sizeof(size_t));
  float *weights = op_alloc(A * sizeof(float)), *p = op_alloc(E * sizeof(float));
  float *g = op_alloc(A * W * sizeof(float)), *u = op_alloc(A * W * sizeof(float)), *yk = op_alloc(A * d * sizeof(float));
  Task *tasks = NULL;
  Rows xin = {0}, hin = {0};
  int quant = op->act_bits == 8;
  if (!experts || !start || !slot || !experts_active || !weights || !p || !g || !u || !yk || !rows_alloc(&xin, A, d, quant) ||
      !rows_alloc(&hin, A, W, quant)) {
    st = op_error("%s: out of memory", name);
    goto done;
  }
  const float *x = t[0].data, *logits = t[1].data;
  for (size_t m = 0; m < M; m++) route(logits + m * E, E, k, p, experts + m * k, weights + m * k);
  /* group the assignments by expert (counting sort, token order kept within an expert) */
  memset(start, 0, (E + 1) * sizeof(size_t));
  for (size_t a = 0; a < A; a++) start[experts[a] + 1]++;
  for (size_t e = 0; e < E; e++) start[e + 1] += start[e];
  {
    size_t *fill = op_alloc(E * sizeof(size_t));
    if (!fill) { st = op_error("%s: out of memory", name); goto done; }
    memcpy(fill, start, E * sizeof(size_t));
    for (size_t a = 0; a < A; a++) {
      slot[a] = fill[experts[a]]++;
      prepare_row(&xin, slot[a], x + (a / k) * d, op->act_eps);
    }
    free(fill);
  }
  size_t ntask = make_tasks(start, E, W, t_row_bytes((int)d), NULL), ntask_down = make_tasks(start, E, d, t_row_bytes((int)W), NULL);
  if (!(tasks = op_alloc((ntask > ntask_down ? ntask : ntask_down) * sizeof(Task)))) {
    st = op_error("%s: out of memory", name);
    goto done;
  }
  MoEJob up = {op, start, tasks, &xin, {t[2].data, t[4].data}, {t[3].data, t[5].data}, 2, W, t_row_bytes((int)d), {g, u}, 0};
  MoEJob down = {op, start, tasks, &hin, {t[6].data, NULL}, {t[7].data, NULL}, 1, d, t_row_bytes((int)W), {yk, NULL}, 0};
  ExpertJob fused = {&up, &down, experts_active, g, u, &hin, W, op->act_eps};
  if (M <= FUSED_MAX_TOKENS) {
    size_t n_active = 0;
    for (size_t e = 0; e < E; e++)
      if (start[e + 1] > start[e]) experts_active[n_active++] = e;
    st = op_parallel(ctx, expert_task, n_active, &fused);
    if (st) goto done;
  } else {
    st = op_parallel(ctx, moe_task, make_tasks(start, E, W, up.rb, tasks), &up);
    if (st) goto done;
    for (size_t a = 0; a < A; a++) relu_gate_row(&fused, a);
    st = op_parallel(ctx, moe_task, make_tasks(start, E, d, down.rb, tasks), &down);
    if (st) goto done;
  }
  if (up.failed || down.failed) { st = op_error("%s: out of memory", name); goto done; }
  for (size_t m = 0; m < M; m++) {
    float *ym = y + m * d;
    for (size_t n = 0; n < d; n++) ym[n] = 0.0f;
    for (size_t i = 0; i < k; i++) {
      const float *src = yk + slot[m * k + i] * d;
      float wk = weights[m * k + i];
      for (size_t n = 0; n < d; n++) ym[n] = ym[n] + wk * src[n];
    }
  }
done:
  free(experts); free(start); free(slot); free(experts_active); free(weights); free(p); free(g); free(u); free(yk); free(tasks);
  rows_free(&xin);
  rows_free(&hin);
  return st;
}

static OrtStatus *moe_create(const OrtCustomOp *self, const OrtApi *api, const OrtKernelInfo *info, void **out) {
  (void)self;
  (void)api;
  MoEKernel *op = calloc(1, sizeof *op);
  OrtStatus *st = NULL;
  if (!op) return op_error("TernaryMoE: out of memory");
  if (!st) st = op_attr_int(info, "top_k", 1, 0, &op->top_k);
  if (!st) st = op_attr_int(info, "act_bits", 0, 0, &op->act_bits);
  if (!st) st = op_attr_float(info, "act_eps", 1e-5f, &op->act_eps);
  if (!st && op->top_k < 1) st = op_error("TernaryMoE: top_k must be >= 1, got %lld", (long long)op->top_k);
  return op_created("TernaryMoE", op, op->act_bits, &op->k, st, out);
}

static const char *moe_name(const OrtCustomOp *op) { (void)op; return "TernaryMoE"; }
static int moe_input_type(const OrtCustomOp *op, size_t i) { (void)op; return (i == 2 || i == 4 || i == 6) ? ORT_TENSOR_UINT8 : ORT_TENSOR_FLOAT; }
static size_t moe_input_count(const OrtCustomOp *op) { (void)op; return 8; }
static int moe_input_kind(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return ORT_IO_REQUIRED; }

void op_moe_define(OrtCustomOp *op) {
  static const OpCallbacks cb = {moe_name, moe_input_type, moe_input_count, moe_input_kind, moe_create, moe_compute};
  op_define(op, &cb);
}

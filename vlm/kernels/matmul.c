/* Products y = x @ W.T on the pool (see kernels.h): the activations of a call are prepared
 * once (x quantized to int8, or interleaved for the float tiles), then the panels of every
 * product of the job are spread over the threads. */
#include <stdlib.h>

#include "kernels.h"
#include "pool.h"

static int ceil_div(long a, long b) { return (int)((a + b - 1) / b); }

/* W4A8 keeps float activations for 8-bit weights (the LM head) unless the matrix opted in. */
static int int8_activations(int mode, const vlm_matrix *m) {
    return vlm_is_quant(m->fmt) &&
           (mode == MODE_INT8 || (mode == MODE_W4A8 && (!vlm_is_8bit(m->fmt) || m->int8_acts)));
}

/* Float activations are interleaved only for token tiles wider than 1. */
static int packs_x(const vlm_path *p, int int8) { return !int8 && p->tf > 1; }

/* Whole token tiles of the path for n tokens. */
static size_t padded(const vlm_path *p, int int8, int n) {
    const int w = int8 ? p->tq : p->tf;
    return (size_t)ceil_div(n, w) * w;
}

/* Parts of a row for vlm_act.c: runs, or halves of one for groups of 16. */
static size_t parts(const vlm_matrix *m) { return m->group ? m->cols / vlm_min(m->group, RUN) : 0; }

size_t vlm_act_bytes(const vlm_path *p, int mode, const vlm_matrix *m, int n) {
    const int int8 = int8_activations(mode, m);
    const size_t K = m->cols, NB = K / RUN, NG = m->group ? K / m->group : 0, NP = parts(m);
    if (int8) return (4 * NB + 4 * NG + 4 * NP + K) * padded(p, 1, n);
    return (4 * (packs_x(p, 0) ? K : 0) + 4 * (vlm_has_mins(m->fmt) ? NG : 0)) * padded(p, 0, n);
}

typedef struct {
    const vlm_path *p;
    const vlm_product *pr;
    const float *x; /* the caller's [n][cols] */
    int per_unit;   /* tokens per unit */
} prepare_job;

static void prepare_task(void *ctx, int u) {
    const prepare_job *j = ctx;
    const vlm_product *pr = j->pr;
    const vlm_matrix *m = pr->m;
    const size_t K = m->cols, NB = K / RUN, NG = m->group ? K / m->group : 0, NP = parts(m);
    const int w = pr->int8 ? j->p->tq : j->p->tf, t1 = vlm_min(pr->a.n, (u + 1) * j->per_unit);
    for (int t = u * j->per_unit; t < t1; t++) {
        const float *x = j->x + t * K;
        const size_t tile = (size_t)(t / w), lane = (size_t)(t % w);
        if (pr->int8) {
            j->p->quantize(x, (int)K, m->group, (int8_t *)pr->a.q + tile * K * w + lane * 4,
                           (float *)pr->a.d + tile * NB * w + lane, (float *)pr->a.s + tile * NG * w + lane,
                           (int32_t *)pr->a.c + tile * NP * w + lane, w);
            continue;
        }
        if (packs_x(j->p, 0)) {
            float *dst = (float *)pr->a.x + tile * K * w + lane;
            for (size_t k = 0; k < K; k++) dst[k * w] = x[k];
        }
        if (vlm_has_mins(m->fmt)) vlm_group_sums(x, (int)K, m->group, (float *)pr->a.xs + tile * NG * w + lane, w);
    }
}

/* Activations are prepared on the pool only when there are this many values or more. */
#define PARALLEL_PREPARE 65536

/* Whether products of m and `like` on the same x can share activations. */
static int same_activations(const vlm_product *like, int int8, const vlm_matrix *m) {
    if (!like || like->int8 != int8 || like->m->cols != m->cols) return 0;
    if (int8) return like->m->group == m->group;
    return !vlm_has_mins(m->fmt) || (vlm_has_mins(like->m->fmt) && like->m->group == m->group);
}

void vlm_product_init(vlm_product *pr, const vlm_path *p, int mode, const vlm_matrix *m, const float *x, int n,
                      float *y, void *scratch, const vlm_product *like) {
    pr->m = m;
    pr->int8 = int8_activations(mode, m);
    if (same_activations(like, pr->int8, m)) {
        pr->a = like->a;
        pr->a.y = y;
        return;
    }
    pr->a = (vlm_act){.n = n, .cols = m->cols, .x = x, .y = y};
    if (!vlm_act_bytes(p, mode, m, n)) return;
    const size_t K = m->cols, NB = K / RUN, NG = m->group ? K / m->group : 0, NP = parts(m);
    const size_t tokens = padded(p, pr->int8, n);
    float *f = scratch;
    if (pr->int8) {
        pr->a.d = f;
        pr->a.s = f + NB * tokens;
        pr->a.c = (const int32_t *)(f + (NB + NG) * tokens);
        pr->a.q = (const int8_t *)(f + (NB + NG + NP) * tokens);
    } else {
        if (packs_x(p, 0)) pr->a.x = f;
        pr->a.xs = f + (packs_x(p, 0) ? K : 0) * tokens;
    }
    prepare_job j = {.p = p, .pr = pr, .x = x};
    const int units = (size_t)n * K >= PARALLEL_PREPARE ? vlm_min(n, vlm_pool_threads()) : 1;
    j.per_unit = ceil_div(n, units);
    vlm_pool_run(prepare_task, &j, ceil_div(n, j.per_unit));
}

/* Units of work per thread: more than one so a thread that is slowed down (the machine
 * is shared) hands its share to the others. */
#define UNITS_PER_THREAD 4

typedef struct {
    const vlm_path *p;
    const vlm_product *prs;
    int count;
    int per_unit[VLM_MAX_PRODUCTS]; /* panels per unit */
    int first[VLM_MAX_PRODUCTS + 1]; /* the first unit of each product */
} gemm_job;

static void gemm_task(void *ctx, int u) {
    const gemm_job *j = ctx;
    int i = 0;
    while (u >= j->first[i + 1]) i++;
    const vlm_product *pr = &j->prs[i];
    const int p0 = (u - j->first[i]) * j->per_unit[i], p1 = vlm_min(pr->m->panels, p0 + j->per_unit[i]);
    (pr->int8 ? j->p->gemm_int8 : j->p->gemm_float)(pr->m, &pr->a, p0, p1);
}

/* Products in batches of VLM_MAX_PRODUCTS, each batch one job; a product's panels are cut in
 * units as if it ran alone. */
void vlm_products_run(const vlm_path *p, const vlm_product *prs, int count) {
    const int threads = vlm_pool_threads();
    for (int b = 0; b < count; b += VLM_MAX_PRODUCTS) {
        gemm_job j = {.p = p, .prs = prs + b, .count = vlm_min(VLM_MAX_PRODUCTS, count - b)};
        for (int i = 0; i < j.count; i++) {
            const int panels = j.prs[i].m->panels;
            j.per_unit[i] = panels ? ceil_div(panels, (long)threads * UNITS_PER_THREAD) : 1; /* 0 rows: no unit */
            j.first[i + 1] = j.first[i] + ceil_div(panels, j.per_unit[i]);
        }
        vlm_pool_run(gemm_task, &j, j.first[j.count]);
    }
}

void vlm_products_of(const vlm_path *p, int mode, const vlm_matrix *const *ms, int count, const float *x, int n,
                     float *const *ys, void *scratch) {
    vlm_product prs[VLM_MAX_PRODUCTS];
    unsigned char *s = scratch;
    for (int i = 0; i < count; i++) {
        vlm_product_init(&prs[i], p, mode, ms[i], x, n, ys[i], s, i ? &prs[0] : NULL);
        s += vlm_act_bytes(p, mode, ms[i], n);
    }
    vlm_products_run(p, prs, count);
}

int vlm_linears(const vlm_path *p, int mode, const vlm_matrix *const *ms, int count, const float *x, int n,
                float *const *ys) {
    size_t bytes = 0;
    for (int i = 0; i < count; i++) bytes += vlm_act_bytes(p, mode, ms[i], n);
    void *scratch = bytes ? malloc(bytes) : NULL;
    if (bytes && !scratch) return -1;
    vlm_products_of(p, mode, ms, count, x, n, ys, scratch);
    free(scratch);
    return 0;
}

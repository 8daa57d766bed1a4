/* Attention and the row ops on the thread pool; the kernels are the path's (attention_impl.h).
 *
 * Each query's sums run in one order however the work is cut, so 1 and N threads give the
 * same bits.
 */
#include <math.h>
#include <stdlib.h>

#include "kernels.h"
#include "pool.h"

/* Rows kernel: query rows per call, and keys per unit when a head's keys are split (a long
 * cache in decode: each unit then returns a partial softmax state, combined below). */
#define ROWS VLM_ATTN_ROWS
#define KEY_CHUNK 256
/* Block kernel: the fewest units per thread for which a unit takes several heads. */
#define UNITS_PER_THREAD 4
/* Row ops: values per unit of work, and the fewest values worth the pool. */
#define OP_UNIT 16384

static int ceil_div(long a, long b) { return (int)((a + b - 1) / b); }

typedef struct {
    const vlm_attn *a;
    const vlm_ops *ops;
    int blocks;         /* block kernel: query blocks per head */
    int sets, per_set;  /* block kernel: sets of query heads per kv head, heads per set */
    int rows, groups;   /* rows kernel: rows per kv head (g * n), groups of ROWS of them */
    int kmax, chunks;   /* keys any query sees, chunks of KEY_CHUNK of them */
    float *state;       /* split keys: [h_kv][groups][chunks][ROWS][d + 2] */
} attn_job;

static void block_task(void *ctx, int u) {
    const attn_job *j = ctx;
    const vlm_attn *a = j->a;
    const int sets = a->h_kv * j->sets, g = a->h / a->h_kv;
    const int b = j->blocks - 1 - u / sets; /* the longest causal blocks first */
    const int hk = u % sets / j->sets, h0 = u % sets % j->sets * j->per_set, i0 = b * j->ops->block;
    j->ops->block_fn(a, hk * g + h0, vlm_min(j->per_set, g - h0), i0, vlm_min(a->n, i0 + j->ops->block));
}

/* The output row r of kv head hk from its states in `chunks` consecutive chunks
 * (stride `stride` floats): o = sum_c acc_c e^(m_c - M) / sum_c l_c e^(m_c - M). */
static void finish_row(const attn_job *j, int hk, int r, const float *st, int chunks, size_t stride) {
    const vlm_attn *a = j->a;
    const int g = a->h / a->h_kv;
    float *o = a->o + (hk * g + r / a->n) * a->oh + (r % a->n) * a->on;
    float mx = -INFINITY, l = 0.0f;
    for (int c = 0; c < chunks; c++) mx = fmaxf(mx, st[c * stride]);
    for (int c = 0; c < a->d; c++) o[c] = 0.0f;
    for (int c = 0; c < chunks; c++) {
        const float *s = st + c * stride;
        if (s[1] == 0.0f) continue; /* the row sees no key of this chunk */
        const float w = chunks == 1 ? 1.0f : expf(s[0] - mx);
        l += s[1] * w;
        for (int e = 0; e < a->d; e++) o[e] += s[2 + e] * w;
    }
    for (int e = 0; e < a->d; e++) o[e] /= l;
}

static void rows_task(void *ctx, int u) {
    const attn_job *j = ctx;
    const vlm_attn *a = j->a;
    const int hk = u / (j->groups * j->chunks), gr = u / j->chunks % j->groups, c = u % j->chunks;
    const int r0 = gr * ROWS, r1 = vlm_min(j->rows, r0 + ROWS), j0 = c * KEY_CHUNK;
    const size_t stride = (size_t)a->d + 2;
    if (j->chunks > 1) {
        j->ops->rows_fn(a, hk, r0, r1, j0, vlm_min(j->kmax, j0 + KEY_CHUNK), j->state + (size_t)u * ROWS * stride);
        return;
    }
    float st[ROWS * (VLM_MAX_HEAD_DIM + 2)];
    j->ops->rows_fn(a, hk, r0, r1, 0, j->kmax, st);
    for (int r = r0; r < r1; r++) finish_row(j, hk, r, st + (r - r0) * stride, 1, stride);
}

int vlm_attention(const vlm_path *p, const vlm_attn *a) {
    attn_job j = {.a = a, .ops = p->ops};
    if (a->n <= 0) return 0;
    /* Every call of more than one query takes the block kernel, however few: a query's sums
     * then run in one order whichever chunk of a prompt holds it (a prefix reused from the
     * cache leaves chunks of any size), so its result does not depend on the others. */
    if (a->n >= 2) {
        /* The query heads of a kv head share each key block (an fp16 one is widened once for
         * them all) when that leaves enough units for the threads; how heads are grouped does
         * not change any head's sums. */
        const int g = a->h / a->h_kv;
        j.blocks = ceil_div(a->n, j.ops->block);
        const int most = a->h_kv * j.blocks >= UNITS_PER_THREAD * vlm_pool_threads() ? VLM_BLOCK_HEADS : 1;
        j.per_set = ceil_div(g, ceil_div(g, most)); /* sets of equal size, at most `most` heads */
        j.sets = ceil_div(g, j.per_set);
        vlm_pool_run(block_task, &j, a->h_kv * j.sets * j.blocks);
        return 0;
    }
    j.rows = a->h / a->h_kv * a->n;
    j.groups = ceil_div(j.rows, ROWS);
    j.kmax = a->causal ? vlm_min(a->t, a->offset + a->n) : a->t;
    j.chunks = ceil_div(j.kmax, KEY_CHUNK);
    const int units = a->h_kv * j.groups * j.chunks;
    const size_t stride = (size_t)a->d + 2;
    if (j.chunks > 1) {
        j.state = malloc(sizeof(float) * units * ROWS * stride);
        if (!j.state) return -1;
    }
    vlm_pool_run(rows_task, &j, units);
    if (j.chunks > 1) {
        for (int hk = 0; hk < a->h_kv; hk++)
            for (int r = 0; r < j.rows; r++) {
                const size_t first = ((size_t)(hk * j.groups + r / ROWS) * j.chunks * ROWS + r % ROWS) * stride;
                finish_row(&j, hk, r, j.state + first, j.chunks, ROWS * stride);
            }
        free(j.state);
    }
    return 0;
}

/* ---- row ops ------------------------------------------------------------------------------ */

typedef struct {
    const vlm_ops *ops;
    const float *x, *w;
    float *y;
    float eps;
    int rows, n, per_unit; /* rows of n values, rows per unit */
} rms_job;

static void rms_task(void *ctx, int u) {
    const rms_job *j = ctx;
    const int r1 = vlm_min(j->rows, (u + 1) * j->per_unit);
    for (int r = u * j->per_unit; r < r1; r++)
        j->ops->rms_norm(j->x + (size_t)r * j->n, j->w, j->eps, j->n, j->y + (size_t)r * j->n);
}

void vlm_rms_norm_rows(const vlm_path *p, const float *x, const float *w, float eps, int rows, int n, float *y) {
    rms_job j = {.ops = p->ops, .x = x, .w = w, .y = y, .eps = eps, .rows = rows, .n = n};
    j.per_unit = vlm_min(rows, ceil_div(OP_UNIT, n > 0 ? n : 1));
    if (rows > 0) vlm_pool_run(rms_task, &j, ceil_div(rows, j.per_unit));
}

typedef struct {
    const vlm_ops *ops;
    const float *g, *u;
    float *y;
    size_t count; /* values, OP_UNIT per unit */
} swiglu_job;

static void swiglu_task(void *ctx, int u) {
    const swiglu_job *j = ctx;
    const size_t c0 = (size_t)u * OP_UNIT, c1 = c0 + OP_UNIT < j->count ? c0 + OP_UNIT : j->count;
    j->ops->swiglu(j->g + c0, j->u + c0, (int)(c1 - c0), j->y + c0);
}

void vlm_swiglu_rows(const vlm_path *p, const float *g, const float *u, size_t count, float *y) {
    swiglu_job j = {.ops = p->ops, .g = g, .u = u, .y = y, .count = count};
    vlm_pool_run(swiglu_task, &j, ceil_div((long)count, OP_UNIT));
}

typedef struct {
    const vlm_ops *ops;
    const float *x, *cos, *sin;
    float *y;
    ptrdiff_t xh, xn, yh, yn;
    int h, n, d, per_unit; /* heads, rows, head dim; rows per unit */
} rotary_job;

/* Unit u: rows [u * per_unit, ...) of every head. */
static void rotary_task(void *ctx, int u) {
    const rotary_job *j = ctx;
    const int i1 = vlm_min(j->n, (u + 1) * j->per_unit);
    for (int i = u * j->per_unit; i < i1; i++)
        for (int h = 0; h < j->h; h++)
            j->ops->rotary(j->x + h * j->xh + i * j->xn, j->cos + (size_t)i * j->d, j->sin + (size_t)i * j->d, j->d,
                           j->y + h * j->yh + i * j->yn);
}

void vlm_rotary_heads(const vlm_path *p, const float *x, ptrdiff_t xh, ptrdiff_t xn, const float *cos,
                      const float *sin, int h, int n, int d, float *y, ptrdiff_t yh, ptrdiff_t yn) {
    rotary_job j = {.ops = p->ops, .x = x, .cos = cos, .sin = sin, .y = y, .xh = xh, .xn = xn, .yh = yh, .yn = yn,
                    .h = h, .n = n, .d = d};
    j.per_unit = vlm_min(n, ceil_div(OP_UNIT, (long)h * d > 0 ? (long)h * d : 1));
    if (n > 0) vlm_pool_run(rotary_task, &j, ceil_div(n, j.per_unit));
}

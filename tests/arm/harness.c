/* The AArch64 kernels against the portable C, run under emulation by tests/test_arm_kernels.py
 * (cross-compiled with the kernel sources, run with qemu-aarch64 on several CPU models).
 *
 * Every Arm path the CPU has ("neon", "dotprod", "i8mm") is compared with the portable path
 * on the shapes, groups and token counts of tests/test_kernels.py, through vlm_linears (so the
 * activations are prepared and interleaved as in the package):
 * - exact data: integer activations whose runs reach +-127 (so the int8 scale is 1 and q = x),
 *   power-of-two scales, mins and 16-bit weights on a 1/4 grid. Every product and partial sum
 *   is then exact in float32 whatever the order, so the paths must agree bit for bit: any
 *   slip in the layouts, lanes, tails or min terms shows as a wrong value.
 * - random data (gaussian, one outlier feature): the integer dot products are exact and the
 *   int8 activations identical (checked below), only the float sums are ordered differently,
 *   so |y - y_portable| <= 1e-5 * sum over k of M[r][k] |x[k]|, with M the magnitude of what
 *   the kernels add (|d q| + |m|, as in tests/test_kernels.py) and x the activations the
 *   kernel multiplies (the dequantized int8 ones in int8 mode).
 * - the int8 quantization of activations: q, d and s bit for bit (every path rounds alike).
 * - to_half (fp16 KV-cache stores): bit for bit with vlm_float_to_half on random bit patterns,
 *   subnormals, ties, overflow, infinities and NaNs.
 * - attention (float32 and fp16 caches; decode, prefill, GQA, bidirectional, odd head dims):
 *   |o - o_portable| <= 2e-5 * max|v| (each is within 1e-5 * max|v| of the float64 result,
 *   tests/test_attention.py); the fp16 cache's values are widened exactly on both sides.
 * - rms_norm, swiglu, rotary on odd lengths: within 2e-6 of the largest |value| (1e-6 relative
 *   for swiglu, whose e^x differs in the last bits between the two exp implementations).
 *
 * Prints "paths: <names>" (the Arm paths this CPU model runs) and one line per failure;
 * exits 1 on any failure.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "pool.h"

static int failures, checks;

#define FAIL(...)                                   \
    do {                                            \
        if (failures++ < 20) printf("FAIL " __VA_ARGS__); \
    } while (0)

/* ---- deterministic random numbers ------------------------------------------------------ */
static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint32_t rnd(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}
static int rnd_int(int lo, int hi) { return lo + (int)(rnd() % (uint32_t)(hi - lo + 1)); }
static float uniform(void) { return (float)((rnd() + 0.5) / 4294967296.0); }
static float gauss(void) { return sqrtf(-2.0f * logf(uniform())) * cosf(6.2831853f * uniform()); }
static uint16_t bf16_of(float x) {
    uint32_t b;
    memcpy(&b, &x, 4);
    return (uint16_t)(b >> 16); /* the grids used are exact in bf16 */
}

/* ---- weights ----------------------------------------------------------------------------- */
typedef struct {
    vlm_matrix m;
    double *mag; /* [rows][cols]: the magnitude M of what the kernels add */
} weight;

/* A quantized weight in GGUF's block order (as vlm.quant hands it to pack_quant). */
static weight make_quant(int fmt, int rows, int cols, int group, int exact) {
    const int nb = cols / RUN, ng = cols / group, bytes = vlm_is_8bit(fmt) ? 32 : 16;
    unsigned char *q = malloc((size_t)rows * nb * bytes);
    uint16_t *sc = malloc(sizeof(uint16_t) * rows * ng), *mn = malloc(sizeof(uint16_t) * rows * ng);
    int8_t *val = malloc((size_t)rows * cols); /* the integer each scale multiplies */
    for (int r = 0; r < rows; r++) {
        for (int g = 0; g < ng; g++) {
            const float d = exact ? ldexpf(1.0f, rnd_int(-2, 1)) * (rnd() & 1 ? 1 : -1) : gauss() * 0.01f;
            const float mv = exact ? 0.25f * rnd_int(-16, 16) : gauss() * 0.05f;
            sc[r * ng + g] = vlm_float_to_half(d);
            mn[r * ng + g] = vlm_float_to_half(mv);
        }
        for (int b = 0; b < nb; b++) {
            unsigned char *blk = q + ((size_t)r * nb + b) * bytes;
            for (int i = 0; i < RUN; i++) {
                int v;
                if (vlm_is_8bit(fmt)) {
                    v = fmt == FMT_Q8A ? rnd_int(0, 31) : rnd_int(-128, 127);
                    ((int8_t *)blk)[i] = (int8_t)v;
                } else {
                    v = rnd_int(0, 15);
                    if (i < 16)
                        blk[i] = (unsigned char)v;
                    else
                        blk[i - 16] |= (unsigned char)(v << 4);
                    if (fmt == FMT_Q4S) v -= 8;
                    if (fmt == FMT_IQ4) v = vlm_iq4nl_values[v];
                }
                val[(size_t)r * cols + b * RUN + i] = (int8_t)v;
            }
        }
    }
    weight w = {{0}, malloc(sizeof(double) * rows * cols)};
    const vlm_strided qs = {q, (ptrdiff_t)nb * bytes, bytes}, ss = {(const unsigned char *)sc, ng * 2, 2};
    const vlm_strided ms = {(const unsigned char *)mn, ng * 2, 2};
    const vlm_strided no_mins = {NULL, 0, 0};
    const int rc = vlm_is_8bit(fmt) ? vlm_pack_q8(&w.m, qs, ss, fmt == FMT_Q8A ? ms : no_mins, rows, cols, group, 0)
                                    : vlm_pack_q4(&w.m, qs, ss, ms, rows, cols, group, fmt, 0);
    if (rc) abort();
    for (int r = 0; r < rows; r++)
        for (int k = 0; k < cols; k++) {
            const int g = k / group;
            const double d = fabs(vlm_half_to_float(sc[r * ng + g])), v = abs(val[(size_t)r * cols + k]);
            w.mag[(size_t)r * cols + k] = d * v + (vlm_has_mins(fmt) ? fabs(vlm_half_to_float(mn[r * ng + g])) : 0.0);
        }
    free(q);
    free(sc);
    free(mn);
    free(val);
    return w;
}

static weight make_half(int fmt, int rows, int cols, int exact) {
    uint16_t *data = malloc(sizeof(uint16_t) * rows * cols);
    weight w = {{0}, malloc(sizeof(double) * rows * cols)};
    for (size_t i = 0; i < (size_t)rows * cols; i++) {
        const float v = exact ? 0.25f * rnd_int(-255, 255) : gauss();
        data[i] = fmt == FMT_F16 ? vlm_float_to_half(v) : bf16_of(v);
        w.mag[i] = fabs(fmt == FMT_F16 ? vlm_half_to_float(data[i]) : vlm_bf16_to_float(data[i]));
    }
    if (vlm_pack_half(&w.m, data, fmt, rows, cols, 0)) abort();
    free(data);
    return w;
}

static void free_weight(weight *w) {
    free(w->m.data);
    free(w->mag);
}

/* n tokens of activations: gaussian with an outlier feature, or integers whose every run
 * reaches +-127 (int8 scale exactly 1). */
static float *make_x(int n, int cols, int exact) {
    float *x = malloc(sizeof(float) * ((size_t)n * cols + 1));
    for (int t = 0; t < n; t++)
        for (int k = 0; k < cols; k++) {
            float v = exact ? (float)rnd_int(-127, 127) : gauss();
            if (exact && k % RUN == (t + k / RUN) % RUN) v = rnd() & 1 ? 127.0f : -127.0f;
            if (!exact && k == 5) v *= 20.0f;
            x[(size_t)t * cols + k] = v;
        }
    return x;
}

/* ---- products ---------------------------------------------------------------------------- */
static const char *const fmt_names[FMT_COUNT] = {"q4_asym", "q4_sym", "iq4_nl", "q8", "q8_asym", "f16", "bf16"};

/* y of path p against y of the portable path for one weight, one mode, n tokens. */
/* y = x @ m.T through the library's entry point, one matrix. */
static int linear(const vlm_path *p, int mode, const vlm_matrix *m, const float *x, int n, float *y) {
    return vlm_linears(p, mode, &m, 1, x, n, &y);
}

static void check_linear(const vlm_path *p, const weight *w, int mode, int n, int exact, const char *what) {
    const vlm_matrix *m = &w->m;
    const int K = m->cols, R = m->rows, int8 = vlm_is_quant(m->fmt) && mode != MODE_FLOAT;
    float *x = make_x(n, K, exact);
    float *ref = malloc(sizeof(float) * ((size_t)n * R + 1)), *y = malloc(sizeof(float) * ((size_t)n * R + 1));
    if (linear(&vlm_path_portable, mode, m, x, n, ref) || linear(p, mode, m, x, n, y)) abort();
    /* the activations the kernels multiply: x, or its int8 rounding */
    float *xa = malloc(sizeof(float) * ((size_t)n * K + 1));
    memcpy(xa, x, sizeof(float) * (size_t)n * K);
    if (int8) {
        int8_t *q = malloc((size_t)K);
        float *d = malloc(sizeof(float) * K), *s = malloc(sizeof(float) * K);
        int32_t *c = malloc(sizeof(int32_t) * K);
        for (int t = 0; t < n; t++) {
            vlm_quantize_row_portable(x + (size_t)t * K, K, m->group, q, d, s, c, 1);
            for (int k = 0; k < K; k++) xa[(size_t)t * K + k] = (float)q[k] * d[k / RUN];
        }
        free(q);
        free(d);
        free(s);
        free(c);
    }
    int bad = 0;
    for (int t = 0; t < n && !bad; t++) {
        for (int r = 0; r < R; r++) {
            const float a = y[(size_t)t * R + r], b = ref[(size_t)t * R + r];
            if (a == b) continue;
            double bound = 0.0;
            if (!exact) {
                for (int k = 0; k < K; k++) bound += w->mag[(size_t)r * K + k] * fabs(xa[(size_t)t * K + k]);
                bound *= 1e-5;
            }
            if (!(fabs((double)a - b) <= bound)) {
                FAIL("%s %s: %s %dx%d g%d n=%d %s token %d row %d: %.9g vs portable %.9g (bound %.3g)\n", p->name,
                     what, fmt_names[m->fmt], R, K, m->group, n, exact ? "exact" : "random", t, r, a, b, bound);
                bad = 1;
                break;
            }
        }
    }
    checks++;
    free(x);
    free(xa);
    free(ref);
    free(y);
}

/* tests/test_kernels.py's shapes, and one wider than a k slice (K_SLICE_INT8, K_SLICE_FLOAT) */
static const int SHAPES[][2] = {{37, 256}, {16, 128}, {64, 384}, {1, 128}, {16, 2176}};
static const int GROUPS[] = {16, 32, 64, 128}; /* 16: 8-bit only */
static const int NS[] = {1, 3, 17, 64, 300};
#define COUNT(a) (int)(sizeof(a) / sizeof *(a))

static void check_products(const vlm_path *p) {
    for (int fmt = FMT_Q4A; fmt <= FMT_Q8A; fmt++)
        for (int gi = 0; gi < COUNT(GROUPS); gi++)
            for (int s = 0; s < COUNT(SHAPES); s++)
                for (int exact = 0; exact < 2 && (GROUPS[gi] >= RUN || vlm_is_8bit(fmt)); exact++) {
                    weight w = make_quant(fmt, SHAPES[s][0], SHAPES[s][1], GROUPS[gi], exact);
                    for (int ni = 0; ni < COUNT(NS); ni++) {
                        /* emulation is slow: 300 tokens on exact data of the largest shape and
                         * group, the wide shape (sliced for n > 4) with 1 and 17 tokens */
                        if ((NS[ni] == 300 && (s != 2 || GROUPS[gi] != 128 || !exact)) ||
                            (s == 4 && NS[ni] != 1 && NS[ni] != 17))
                            continue;
                        check_linear(p, &w, MODE_INT8, NS[ni], exact, "int8");
                        check_linear(p, &w, MODE_FLOAT, NS[ni], exact, "float");
                    }
                    free_weight(&w);
                }
    static const int HALF_SHAPES[][2] = {{37, 100}, {16, 128}, {5, 3}, {64, 1030}};
    for (int fmt = FMT_F16; fmt <= FMT_BF16; fmt++)
        for (int s = 0; s < COUNT(HALF_SHAPES); s++)
            for (int exact = 0; exact < 2; exact++) {
                weight w = make_half(fmt, HALF_SHAPES[s][0], HALF_SHAPES[s][1], exact);
                for (int ni = 0; ni < COUNT(NS); ni++)
                    if (NS[ni] < 300 || s == 3) check_linear(p, &w, MODE_FLOAT, NS[ni], exact, "float");
                free_weight(&w);
            }
}

/* Up to VLM_SOLO_TOKENS tokens, each token's y equals its own one-token product bit for bit:
 * what gives every sequence of a batched decode step the bits of its own step. */
static void check_rows_alone(const vlm_path *p) {
    for (int fmt = FMT_Q4A; fmt < FMT_COUNT; fmt++)
        for (int mode = MODE_W4A8; mode < MODE_COUNT; mode++) {
            if (!vlm_is_quant(fmt) && mode != MODE_FLOAT) continue;
            weight w = vlm_is_quant(fmt) ? make_quant(fmt, 40, 256, 64, 0) : make_half(fmt, 40, 250, 0);
            const int K = w.m.cols, R = w.m.rows;
            for (int n = 2; n <= VLM_SOLO_TOKENS; n++) {
                float *x = make_x(n, K, 0), *y = malloc(sizeof(float) * n * R), *one = malloc(sizeof(float) * R);
                if (linear(p, mode, &w.m, x, n, y)) abort();
                for (int t = 0; t < n; t++) {
                    if (linear(p, mode, &w.m, x + (size_t)t * K, 1, one)) abort();
                    if (memcmp(one, y + (size_t)t * R, sizeof(float) * R)) {
                        FAIL("%s: %s mode %d, token %d of %d differs from its own product\n", p->name, fmt_names[fmt],
                             mode, t, n);
                        break;
                    }
                }
                checks++;
                free(x);
                free(y);
                free(one);
            }
            free_weight(&w);
        }
}

/* ---- activation quantization and fp16 stores -------------------------------------------- */
static void check_quantize(const vlm_path *p) {
    const int cols = 384, w = 4; /* interleaved as a token tile of 4 */
    float *x = make_x(1, cols, 0);
    for (int k = 0; k < 32; k++) x[k] = 0.0f;                       /* an all-zero run */
    for (int k = 32; k < 64; k++) x[k] = (float)(k - 48) + 0.5f;   /* ties at amax = 127 */
    x[40] = 127.0f;
    for (int k = 64; k < 96; k++) x[k] = 3e38f * (k % 2 ? 1 : -1) / (float)(k - 63);
    for (int k = 96; k < 128; k++) x[k] = 1e-40f * (float)(k - 110); /* subnormals, */
    x[100] = 1e-30f; /* in a run whose 127 / max|x| is finite (else the portable C is undefined) */
    for (int gi = 0; gi < COUNT(GROUPS); gi++) {
        int8_t q[2][cols * w];
        float d[2][cols / RUN * w], s[2][cols / 16 * w]; /* s: per group, groups of 16 at least */
        int32_t c[2][cols / 16 * w];                      /* c: per part, halves of a run at least */
        memset(q, 0, sizeof q);
        memset(d, 0, sizeof d);
        memset(s, 0, sizeof s);
        memset(c, 0, sizeof c);
        vlm_quantize_row_portable(x, cols, GROUPS[gi], q[0], d[0], s[0], c[0], w);
        p->quantize(x, cols, GROUPS[gi], q[1], d[1], s[1], c[1], w);
        if (memcmp(q[0], q[1], sizeof q[0]) || memcmp(d[0], d[1], sizeof d[0]) || memcmp(s[0], s[1], sizeof s[0]) ||
            memcmp(c[0], c[1], sizeof c[0]))
            FAIL("%s quantize g%d: q, d, s or c differ from the portable rounding\n", p->name, GROUPS[gi]);
        checks++;
    }
    free(x);
}

static void check_to_half(const vlm_path *p) {
    enum { N = 200003 }; /* odd: the tail goes through the scalar rounding */
    float *x = malloc(sizeof(float) * N);
    uint16_t *h = malloc(sizeof(uint16_t) * N);
    for (int i = 0; i < N; i++) {
        uint32_t b = rnd();
        b = (b & 0x80000000u) | ((0x33000000u + (b % 0x14800000u)) & 0x7fffffffu); /* zero .. past 65520 */
        if (i % 7 == 0) b = (uint32_t)(0x38000000u + (uint32_t)(i % 4096) * 0x1000u); /* ties: low 13 bits 0x1000 */
        if (i % 11 == 0) b |= 0x1000u;
        if (i < 6) b = (uint32_t[]){0x7f800000u, 0xff800000u, 0x7fc00001u, 0xffa12345u, 0x477ff000u, 0x477fefffu}[i];
        memcpy(&x[i], &b, 4);
    }
    p->ops->to_half(x, N, h);
    int bad = 0;
    for (int i = 0; i < N && !bad; i++) {
        if (h[i] == vlm_float_to_half(x[i])) continue;
        uint32_t b;
        memcpy(&b, &x[i], 4);
        FAIL("%s to_half(0x%08x) = 0x%04x, vlm_float_to_half 0x%04x\n", p->name, b, h[i], vlm_float_to_half(x[i]));
        bad = 1;
    }
    checks++;
    free(x);
    free(h);
}

/* ---- attention and row ops --------------------------------------------------------------- */
static void check_attention(const vlm_path *p) {
    /* (h, h_kv, n, t, d, causal offset or -1), after tests/test_attention.py (smaller t) */
    static const int CASES[][6] = {
        {9, 3, 1, 130, 64, 129}, {12, 2, 1, 1100, 128, 1099}, {4, 4, 1, 1, 80, 0},   {4, 2, 1, 50, 64, 20},
        {9, 3, 7, 40, 64, 33},   {6, 1, 7, 7, 72, -1},        {12, 2, 40, 40, 64, 0}, {9, 3, 37, 100, 80, 63},
        {4, 4, 33, 33, 128, -1}, {2, 2, 20, 600, 36, -1},
    };
    for (int c = 0; c < COUNT(CASES); c++) {
        const int h = CASES[c][0], hkv = CASES[c][1], n = CASES[c][2], t = CASES[c][3], d = CASES[c][4];
        const size_t nq = (size_t)h * n * d, nk = (size_t)hkv * t * d;
        float *q = malloc(sizeof(float) * nq), *k = malloc(sizeof(float) * nk), *v = malloc(sizeof(float) * nk);
        float *o[2] = {malloc(sizeof(float) * nq), malloc(sizeof(float) * nq)};
        uint16_t *kh = malloc(sizeof(uint16_t) * nk), *vh = malloc(sizeof(uint16_t) * nk);
        for (size_t i = 0; i < nq; i++) q[i] = gauss();
        float vmax = 0.0f;
        for (size_t i = 0; i < nk; i++) {
            k[i] = gauss();
            v[i] = gauss();
            kh[i] = vlm_float_to_half(k[i]);
            vh[i] = vlm_float_to_half(v[i]);
            vmax = fmaxf(vmax, fabsf(v[i]));
        }
        for (int half = 0; half < 2; half++) {
            for (int i = 0; i < 2; i++) {
                const vlm_attn a = {.h = h, .h_kv = hkv, .n = n, .t = t, .d = d, .causal = CASES[c][5] >= 0,
                                    .offset = CASES[c][5] >= 0 ? CASES[c][5] : 0, .scale = vlm_attn_scale(d),
                                    .q = q, .k = half ? (const void *)kh : k, .v = half ? (const void *)vh : v,
                                    .kv_half = half, .o = o[i], .qh = (ptrdiff_t)n * d, .qn = d,
                                    .kh = (ptrdiff_t)t * d, .kt = d, .vh = (ptrdiff_t)t * d, .vt = d,
                                    .oh = (ptrdiff_t)n * d, .on = d};
                if (vlm_attention(i ? p : &vlm_path_portable, &a)) abort();
            }
            double err = 0.0;
            for (size_t i = 0; i < nq; i++) {
                const double e = fabs((double)o[1][i] - o[0][i]);
                if (e > err || e != e) err = e;
            }
            if (!(err <= 2e-5 * vmax))
                FAIL("%s attention h%d/%d n%d t%d d%d offset %d%s: error %.3g (bound %.3g)\n", p->name, h, hkv, n, t, d,
                     CASES[c][5], half ? " fp16 cache" : "", err, 2e-5 * vmax);
            checks++;
        }
        free(q), free(k), free(v), free(o[0]), free(o[1]), free(kh), free(vh);
    }
}

/* max |a - b| <= tol * max |b| */
static void compare_rows(const vlm_path *p, const char *what, int n, const float *a, const float *b, double tol) {
    double err = 0.0, top = 0.0;
    for (int i = 0; i < n; i++) { /* not fmax: GCC 12 for AArch64 fails to vectorize that pair */
        const double e = fabs((double)a[i] - b[i]), v = fabs((double)b[i]);
        if (e > err || e != e) err = e;
        if (v > top) top = v;
    }
    if (!(err <= tol * top)) FAIL("%s %s n=%d: error %.3g (max |value| %.3g)\n", p->name, what, n, err, top);
    checks++;
}

static void check_row_ops(const vlm_path *p) {
    static const int LENGTHS[] = {1, 3, 5, 17, 64, 576, 1003};
    for (int li = 0; li < COUNT(LENGTHS); li++) {
        const int n = LENGTHS[li], rows = 3;
        float *x = malloc(sizeof(float) * rows * n * 2), *w = malloc(sizeof(float) * n * 2);
        float *y[2] = {malloc(sizeof(float) * rows * n * 2), malloc(sizeof(float) * rows * n * 2)};
        for (int i = 0; i < rows * n * 2; i++) x[i] = gauss() * 3.0f;
        for (int i = 0; i < n * 2; i++) w[i] = gauss();
        for (int i = 0; i < 2; i++) vlm_rms_norm_rows(i ? p : &vlm_path_portable, x, w, 1e-6f, rows, n, y[i]);
        compare_rows(p, "rms_norm", rows * n, y[1], y[0], 2e-6);
        for (int i = 0; i < 2; i++) vlm_swiglu_rows(i ? p : &vlm_path_portable, x, x + rows * n, (size_t)rows * n, y[i]);
        compare_rows(p, "swiglu", rows * n, y[1], y[0], 1e-6);
        { /* rotary of one head: x [rows][d = 2n], cos / sin [rows][d] */
            const int d = 2 * n;
            float *cs = malloc(sizeof(float) * rows * d * 2);
            for (int i = 0; i < rows * d * 2; i++) cs[i] = cosf((float)i * 0.37f);
            for (int i = 0; i < 2; i++)
                vlm_rotary_heads(i ? p : &vlm_path_portable, x, (ptrdiff_t)rows * d, d, cs, cs + rows * d, 1, rows, d,
                                 y[i], (ptrdiff_t)rows * d, d);
            compare_rows(p, "rotary", rows * d, y[1], y[0], 2e-6);
            free(cs);
        }
        free(x), free(w), free(y[0]), free(y[1]);
    }
}

/* "count PATH FMT MODE N": one product of a 256 x 1024 group-32 matrix with N tokens on PATH,
 * for scripts/arm_instruction_counts.py to count the instructions the path executes. */
static int count_run(char **argv) {
    const vlm_path *p = vlm_arm_path(argv[2]);
    int fmt = 0;
    while (fmt < FMT_COUNT && strcmp(fmt_names[fmt], argv[3])) fmt++;
    if (!p || !vlm_is_quant(fmt)) return 2;
    weight w = make_quant(fmt, 256, 1024, 32, 0);
    const int n = atoi(argv[5]);
    float *x = make_x(n, 1024, 0), *y = malloc(sizeof(float) * 256 * (size_t)n);
    const int rc = linear(p, strcmp(argv[4], "int8") ? MODE_FLOAT : MODE_INT8, &w.m, x, n, y);
    printf("%s %s %s n=%d: done\n", p->name, argv[3], argv[4], n);
    return rc ? 1 : 0;
}

int main(int argc, char **argv) {
    if (argc == 6 && !strcmp(argv[1], "count")) return count_run(argv);
    vlm_pool_set_threads(1);
    static const char *const names[] = {"i8mm", "dotprod", "neon"};
    const vlm_path *paths[3];
    int count = 0;
    printf("paths:");
    for (int i = 0; i < 3; i++)
        if ((paths[count] = vlm_arm_path(names[i]))) {
            if (strcmp(paths[count]->name, names[i])) FAIL("vlm_arm_path(%s) gave %s\n", names[i], paths[count]->name);
            printf(" %s", names[i]);
            count++;
        }
    printf("\n");
    if (vlm_arm_path("avx2") || vlm_arm_path("portable")) FAIL("vlm_arm_path knows a name it should not\n");
    /* argument "quick": the products only on the best path (the other paths get their own
     * CPU model), everything else on all */
    for (int i = 0; i < count; i++) {
        check_quantize(paths[i]);
        check_to_half(paths[i]);
        if (i == 0 || argc < 2) check_products(paths[i]);
        check_rows_alone(paths[i]);
    }
    if (count) { /* the ops are one table for every Arm path */
        check_attention(paths[0]);
        check_row_ops(paths[0]);
    }
    printf("%d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}

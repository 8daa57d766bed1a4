/* Portable C kernels: the reference for the SIMD paths and the path on CPUs without them.
 *
 * They decode a group of the packed panel into a small [k][16] array and then loop over
 * the 16 rows innermost, a shape compilers vectorize for whatever baseline they target.
 */
#include <math.h>
#include <string.h>

#include "kernels.h"

#define MAX_GROUP 128

const int8_t vlm_iq4nl_values[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

float vlm_half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    const uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000 | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else {
        /* subnormal half: exactly man * 2^-24, representable as a float */
        float f = (float)man * (1.0f / 16777216.0f);
        memcpy(&bits, &f, 4);
        bits |= sign;
    }
    float out;
    memcpy(&out, &bits, 4);
    return out;
}

uint16_t vlm_float_to_half(float x) {
    uint32_t f;
    memcpy(&f, &x, 4);
    const uint32_t sign = (f >> 16) & 0x8000, a = f & 0x7fffffff;
    if (a >= 0x7f800000) return (uint16_t)(sign | 0x7c00 | (a > 0x7f800000 ? 0x200 | (a >> 13 & 0x3ff) : 0));
    if (a >= 0x477ff000) return (uint16_t)(sign | 0x7c00); /* rounds to >= 65520: overflow */
    if (a < 0x38800000) { /* below the smallest normal half: a subnormal (or zero) */
        if (a < 0x33000000) return (uint16_t)sign; /* at most half the smallest subnormal (ties to even: 0) */
        const uint32_t e = a >> 23, m = (a & 0x7fffff) | 0x800000;
        const int shift = 126 - (int)e; /* value = m * 2^(e - 150); half subnormal unit 2^-24 */
        uint32_t q = m >> shift;
        const uint32_t rest = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
        if (rest > halfway || (rest == halfway && (q & 1))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t h = ((a - 0x38000000) >> 13); /* rebias the exponent, keep 10 mantissa bits */
    const uint32_t rest = a & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++; /* a carry into the exponent is right */
    return (uint16_t)(sign | h);
}

float vlm_bf16_to_float(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float out;
    memcpy(&out, &bits, 4);
    return out;
}

/* x ~ d * q per run of 32: d = max|x| / 127 and q = round-half-even(x * (127 / max|x|)).
 * Every path reproduces these exact float operations, so they agree on q bit for bit. */
void vlm_quantize_row_portable(const float *x, int cols, int group, int8_t *q, float *d, float *s, int32_t *c,
                               int w) {
    for (int b = 0; b < cols / RUN; b++) {
        const float *xb = x + b * RUN;
        float amax = 0.0f;
        for (int i = 0; i < RUN; i++) amax = fmaxf(amax, fabsf(xb[i]));
        const float db = amax / 127.0f;
        const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        int sum[2] = {0, 0}; /* of each half */
        for (int i = 0; i < RUN; i++) {
            const int v = (int)nearbyintf(xb[i] * id);
            q[(size_t)(b * RUN + i) / 4 * 4 * w + i % 4] = (int8_t)v;
            sum[i / 16] += v;
        }
        d[(size_t)b * w] = db;
        vlm_group_sum(s, c, b, group, w, db, sum[0], sum[1]);
    }
}

void vlm_group_sums(const float *x, int cols, int group, float *xs, int w) {
    for (int g = 0; g < cols / group; g++) {
        float sum = 0.0f;
        for (int i = 0; i < group; i++) sum += x[g * group + i];
        xs[(size_t)g * w] = sum;
    }
}

static void load_scales(const uint16_t *src, float *dst) {
    for (int r = 0; r < PANEL; r++) dst[r] = vlm_half_to_float(src[r]);
}

/* Decode group g of a panel (the inverse of the layout in kernels.h) to the integers the
 * scales multiply: q (asymmetric, whose min term is added separately), q - 8 (symmetric
 * 4-bit), the codebook's value or the signed 8-bit value; and its scales d (and mins mn, asymmetric formats)
 * as floats. */
static void decode_group(const vlm_matrix *m, const unsigned char *panel, int g, int8_t w[][PANEL], float *d,
                         float *mn) {
    load_scales((const uint16_t *)(panel + m->scales_off) + g * PANEL, d);
    if (vlm_has_mins(m->fmt)) load_scales((const uint16_t *)(panel + m->mins_off) + g * PANEL, mn);
    if (vlm_is_8bit(m->fmt)) { /* any group, 16 included: value k is byte k % 4 of chunk k / 4 of its run */
        for (int k = 0; k < m->group; k++) {
            const int v = g * m->group + k;
            const unsigned char *chunk = panel + (size_t)(v / RUN) * 512 + (v % RUN / 4) * 64 + v % 4;
            for (int r = 0; r < PANEL; r++) w[k][r] = (int8_t)(chunk[r * 4] - 128);
        }
        return;
    }
    const int runs = m->group / RUN, offset = m->fmt == FMT_Q4S ? 8 : 0;
    for (int rr = 0; rr < runs; rr++) {
        int8_t(*out)[PANEL] = w + rr * RUN;
        const unsigned char *run = panel + (size_t)(g * runs + rr) * 256;
        for (int c = 0; c < 4; c++) {
            for (int r = 0; r < PANEL; r++) {
                for (int i = 0; i < 4; i++) {
                    const int byte = run[c * 64 + r * 4 + i];
                    if (m->fmt == FMT_IQ4) {
                        out[8 * c + i][r] = vlm_iq4nl_values[byte & 0x0f];
                        out[8 * c + 4 + i][r] = vlm_iq4nl_values[byte >> 4];
                    } else {
                        out[8 * c + i][r] = (int8_t)((byte & 0x0f) - offset);
                        out[8 * c + 4 + i][r] = (int8_t)((byte >> 4) - offset);
                    }
                }
            }
        }
    }
}

static void clear_panel(const vlm_matrix *m, const vlm_act *a, int p, int nr) {
    for (int t = 0; t < a->n; t++) memset(a->y + (size_t)t * m->rows + p * PANEL, 0, nr * sizeof(float));
}

static void gemm_int8(const vlm_matrix *m, const vlm_act *a, int p0, int p1) {
    const int K = m->cols, G = m->group, NG = K / G, NB = K / RUN, part = vlm_min(G, RUN);
    int8_t w[MAX_GROUP][PANEL];
    float d[PANEL], mn[PANEL];
    for (int p = p0; p < p1; p++) {
        const unsigned char *panel = m->data + (size_t)p * m->panel_bytes;
        const int nr = vlm_min(PANEL, m->rows - p * PANEL);
        clear_panel(m, a, p, nr);
        for (int g = 0; g < NG; g++) {
            decode_group(m, panel, g, w, d, mn);
            for (int t = 0; t < a->n; t++) {
                const int8_t *xq = a->q + (size_t)t * K + g * G;
                const float *xd = a->d + (size_t)t * NB;
                float acc[PANEL] = {0};
                for (int k0 = 0; k0 < G; k0 += part) { /* whole runs, or the group's half of one */
                    int32_t isum[PANEL] = {0};
                    for (int k = k0; k < k0 + part; k++)
                        for (int r = 0; r < PANEL; r++) isum[r] += w[k][r] * xq[k];
                    for (int r = 0; r < PANEL; r++) acc[r] += (float)isum[r] * xd[(g * G + k0) / RUN];
                }
                float *y = a->y + (size_t)t * m->rows + p * PANEL;
                const float xs = a->s[(size_t)t * NG + g];
                for (int r = 0; r < nr; r++) y[r] += d[r] * acc[r] + (vlm_has_mins(m->fmt) ? mn[r] * xs : 0.0f);
            }
        }
    }
}

static void gemm_float_quant(const vlm_matrix *m, const vlm_act *a, int p0, int p1) {
    const int K = m->cols, G = m->group, NG = K / G;
    int8_t w[MAX_GROUP][PANEL];
    float wf[MAX_GROUP][PANEL], d[PANEL], mn[PANEL];
    for (int p = p0; p < p1; p++) {
        const unsigned char *panel = m->data + (size_t)p * m->panel_bytes;
        const int nr = vlm_min(PANEL, m->rows - p * PANEL);
        clear_panel(m, a, p, nr);
        for (int g = 0; g < NG; g++) {
            decode_group(m, panel, g, w, d, mn);
            for (int k = 0; k < G; k++)
                for (int r = 0; r < PANEL; r++) wf[k][r] = (float)w[k][r];
            for (int t = 0; t < a->n; t++) {
                const float *x = a->x + (size_t)t * K + g * G;
                float acc[PANEL] = {0};
                for (int k = 0; k < G; k++)
                    for (int r = 0; r < PANEL; r++) acc[r] += wf[k][r] * x[k];
                float *y = a->y + (size_t)t * m->rows + p * PANEL;
                const float xs = vlm_has_mins(m->fmt) ? a->xs[(size_t)t * NG + g] : 0.0f;
                for (int r = 0; r < nr; r++) y[r] += d[r] * acc[r] + (vlm_has_mins(m->fmt) ? mn[r] * xs : 0.0f);
            }
        }
    }
}

/* 16-bit float weights, decoded CHUNK columns at a time so the chunk stays in L1 across tokens. */
#define CHUNK 64

static void gemm_half(const vlm_matrix *m, const vlm_act *a, int p0, int p1) {
    const int K = m->cols;
    float wf[CHUNK][PANEL];
    for (int p = p0; p < p1; p++) {
        const unsigned char *panel = m->data + (size_t)p * m->panel_bytes;
        const int nr = vlm_min(PANEL, m->rows - p * PANEL);
        clear_panel(m, a, p, nr);
        for (int k0 = 0; k0 < K; k0 += CHUNK) {
            const int kn = vlm_min(CHUNK, K - k0);
            for (int k = 0; k < kn; k++) {
                for (int r = 0; r < PANEL; r++) {
                    const uint16_t h = ((const uint16_t *)panel)[(size_t)(k0 + k) * PANEL + r];
                    wf[k][r] = m->fmt == FMT_F16 ? vlm_half_to_float(h) : vlm_bf16_to_float(h);
                }
            }
            for (int t = 0; t < a->n; t++) {
                const float *x = a->x + (size_t)t * K + k0;
                float acc[PANEL] = {0};
                for (int k = 0; k < kn; k++)
                    for (int r = 0; r < PANEL; r++) acc[r] += wf[k][r] * x[k];
                float *y = a->y + (size_t)t * m->rows + p * PANEL;
                for (int r = 0; r < nr; r++) y[r] += acc[r];
            }
        }
    }
}

static void gemm_float(const vlm_matrix *m, const vlm_act *a, int p0, int p1) {
    if (vlm_is_quant(m->fmt))
        gemm_float_quant(m, a, p0, p1);
    else
        gemm_half(m, a, p0, p1);
}

/* Token tiles of 1: the activations are plain row-major arrays. */
const vlm_path vlm_path_portable = {"portable", 1, 1, gemm_int8, gemm_float, vlm_quantize_row_portable,
                                     &vlm_ops_portable};

/* Attention kernels and row ops, written once over a small SIMD layer and compiled once per
 * path: attention_avx512.c, attention_avx2.c and attention_portable.c define the layer, then include this file.
 *
 * The layer: a float vector type vf of VW lanes; OPS_TARGET (the function attribute of the
 * path) and VINL (an always-inlined helper of it); the tile sizes NV, RK, DD (below); and
 *   v_zero v_set1 v_load v_loadn v_store v_storen   (the n variants touch lanes [0, n) only)
 *   v_add v_sub v_mul v_div v_fma(a, b, c) = a * b + c, v_max
 *   v_keep_le(s, a, b): s where a <= b, else -inf;  v_iota: lanes 0, 1, ..., VW - 1
 *   v_first, v_hmax, v_hsum: lane 0, max and sum of the lanes
 *   v_exp: e^x, exactly 0 below -87.3 (so e^-inf = 0), saturating above 88
 *   v_sum_lanes(p[VW]): the vector whose lane j is the sum of the lanes of p[j]
 *   v_load_half(p, e): the first e of VW fp16 values as a vector (the rest 0)
 *   v_store_half(p, x): x rounded to fp16 (nearest even, as vlm_float_to_half) at p
 *
 * Two attention kernels, online softmax (flash-attention style: a running max m, sum l and
 * unnormalized output acc per query, rescaled by e^(m_old - m_new) as blocks of keys come),
 * so memory stays flat however long the sequence:
 *
 * - block: many queries. The queries of a block sit in lanes (NV vectors, VW * NV queries of
 *   one head), so scores are computed as outer products, broadcasting one k value against a
 *   vector of q values, and max, exp and sums over keys are lane-wise: no horizontal
 *   reduction anywhere. q is transposed once per block; k and v are read where they lie.
 * - rows: a few queries (decode). The keys sit in lanes: VW dot products at a time, folded
 *   to one vector by v_sum_lanes; p @ v broadcasts each probability against v's rows. The
 *   query rows of a kv head (its g heads) share each block of keys, copied once to a fixed
 *   stride, and the block's values. It covers a range of keys, so a long cache is split
 *   over threads and the partial states are combined afterwards (attention.c).
 */

#include <math.h>
#include <stddef.h>
#include <string.h>

/* Keys per block of the block kernel: the block's scores, KB x NV vectors, stay in L1. */
#define KB 64
/* How far ahead of its block the rows kernel prefetches keys and values. */
#define PREFETCH_KEYS 64

static inline int ops_min(int a, int b) { return a < b ? a : b; }

/* The first e lanes (e = VW: a plain load or store). */
VINL vf load_e(const float *p, int e) { return e == VW ? v_load(p) : v_loadn(p, e); }
VINL void store_e(float *p, vf x, int e) {
    if (e == VW)
        v_store(p, x);
    else
        v_storen(p, x, e);
}

/* ---- the KV cache: float32 rows read in place, fp16 rows widened first ------------------- */

/* n fp16 values to float32. */
VINL void widen_half(const uint16_t *src, float *dst, int n) {
    for (int c = 0; c < n; c += VW) {
        const int e = ops_min(VW, n - c);
        store_e(dst + c, v_load_half(src + c, e), e);
    }
}

/* n float32 values to fp16 (the ops table's to_half: k and v entering a cache). */
OPS_TARGET static void to_half(const float *x, int n, uint16_t *y) {
    int c = 0;
    for (; c + VW <= n; c += VW) v_store_half(y + c, v_load(x + c));
    for (; c < n; c++) y[c] = vlm_float_to_half(x[c]);
}

/* Row j of head hk of a cache (k or v; head and row strides in elements). */
static inline const void *kv_row(const vlm_attn *a, const void *base, ptrdiff_t head, ptrdiff_t row, int hk, int j) {
    return (const char *)base + ((size_t)hk * head + (size_t)j * row) * (a->kv_half ? 2 : 4);
}

/* Rows [j0, j0 + n) of head hk as float32: the rows in place (*stride = row) for a float32
 * cache; for fp16, widened into buf at *stride = d. */
VINL const float *kv_rows(const vlm_attn *a, const void *base, ptrdiff_t head, ptrdiff_t row, int hk, int j0, int n,
                          float *buf, ptrdiff_t *stride) {
    if (!a->kv_half) {
        *stride = row;
        return kv_row(a, base, head, row, hk, j0);
    }
    for (int j = 0; j < n; j++) {
        const uint16_t *src = kv_row(a, base, head, row, hk, j0 + j);
        widen_half(src, buf + (size_t)j * a->d, a->d);
    }
    *stride = a->d;
    return buf;
}

/* ---- block kernel ------------------------------------------------------------------------ */

/* st[r][v] = sum over c of k[r][c] * qt[c][v] for R keys (rows kt apart): R x NV accumulators
 * in registers; each broadcast k value feeds NV multiply-adds. */
VINL void score_tile(const float *k, ptrdiff_t kt, int d, const vf *qt, vf *st, const int R) {
    vf acc[RK][NV];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) acc[r][v] = v_zero();
    for (int c = 0; c < d; c++) {
        vf q[NV];
        for (int v = 0; v < NV; v++) q[v] = qt[c * NV + v];
        for (int r = 0; r < R; r++) {
            const vf kb = v_set1(k[r * kt + c]);
            for (int v = 0; v < NV; v++) acc[r][v] = v_fma(kb, q[v], acc[r][v]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) st[r * NV + v] = acc[r][v];
}

/* ot[c][v] += sum over the nk keys j of v[j][c] * pt[j][v], for C dims from c0. */
VINL void value_tile(const float *vv, ptrdiff_t vt, int nk, const vf *pt, vf *ot, int c0, const int C) {
    vf acc[DD][NV];
    for (int c = 0; c < C; c++)
        for (int v = 0; v < NV; v++) acc[c][v] = ot[(c0 + c) * NV + v];
    for (int j = 0; j < nk; j++) {
        vf p[NV];
        for (int v = 0; v < NV; v++) p[v] = pt[j * NV + v];
        for (int c = 0; c < C; c++) {
            const vf vb = v_set1(vv[j * vt + c0 + c]);
            for (int v = 0; v < NV; v++) acc[c][v] = v_fma(vb, p[v], acc[c][v]);
        }
    }
    for (int c = 0; c < C; c++)
        for (int v = 0; v < NV; v++) ot[(c0 + c) * NV + v] = acc[c][v];
}

OPS_TARGET static void attn_block(const vlm_attn *a, int h0, int nh, int i0, int i1) {
    const int d = a->d, hk = h0 / (a->h / a->h_kv);
    float kbuf[a->kv_half ? KB * d : 1], vbuf[a->kv_half ? KB * d : 1]; /* a key block of an fp16 cache */
    vf qt[nh][d * NV], ot[nh][d * NV]; /* per head: q (scaled) and the output accumulator, transposed: [c][v] */
    vf st[KB * NV];                    /* one key block's scores, then probabilities: [j][v] */
    vf m[nh][NV], l[nh][NV], lim[NV];
    for (int e = 0; e < nh; e++) {
        float *qf = (float *)qt[e];
        for (int v = 0; v < NV; v++) {
            for (int w = 0; w < VW; w++) {
                const int i = i0 + v * VW + w;
                const float *q = a->q + (h0 + e) * a->qh + i * a->qn;
                for (int c = 0; c < d; c++) qf[(c * NV + v) * VW + w] = i < i1 ? q[c] * a->scale : 0.0f;
            }
            m[e][v] = v_set1(-INFINITY);
            l[e][v] = v_zero();
        }
        for (int c = 0; c < d * NV; c++) ot[e][c] = v_zero();
    }
    for (int v = 0; v < NV; v++) /* the last key each lane sees */
        lim[v] = v_add(v_set1((float)(a->offset + i0 + v * VW)), v_iota());
    /* keys the block's last query sees; padding lanes (i >= i1) compute finite garbage */
    const int kend = a->causal ? ops_min(a->t, a->offset + i1) : a->t;
    for (int j0 = 0; j0 < kend; j0 += KB) {
        const int nk = ops_min(KB, kend - j0);
        ptrdiff_t kt, vt;
        /* an fp16 block is widened once for the heads that share it */
        const float *kb = kv_rows(a, a->k, a->kh, a->kt, hk, j0, nk, kbuf, &kt);
        const float *vb = kv_rows(a, a->v, a->vh, a->vt, hk, j0, nk, vbuf, &vt);
        for (int e = 0; e < nh; e++) {
            int j = 0;
            for (; j + RK <= nk; j += RK) score_tile(kb + j * kt, kt, d, qt[e], st + j * NV, RK);
            for (; j < nk; j++) score_tile(kb + j * kt, kt, d, qt[e], st + j * NV, 1);
            if (a->causal && j0 + nk - 1 > a->offset + i0) /* some key is past some query */
                for (j = 0; j < nk; j++)
                    for (int v = 0; v < NV; v++)
                        st[j * NV + v] = v_keep_le(st[j * NV + v], v_set1((float)(j0 + j)), lim[v]);
            vf alpha[NV];
            for (int v = 0; v < NV; v++) {
                vf mb = st[v];
                for (j = 1; j < nk; j++) mb = v_max(mb, st[j * NV + v]);
                mb = v_max(m[e][v], mb); /* finite: every query sees key 0 */
                alpha[v] = v_exp(v_sub(m[e][v], mb));
                m[e][v] = mb;
                vf sum = v_zero();
                for (j = 0; j < nk; j++) {
                    const vf p = v_exp(v_sub(st[j * NV + v], mb));
                    st[j * NV + v] = p;
                    sum = v_add(sum, p);
                }
                l[e][v] = v_fma(l[e][v], alpha[v], sum);
            }
            if (j0 > 0)
                for (int c = 0; c < d; c++)
                    for (int v = 0; v < NV; v++) ot[e][c * NV + v] = v_mul(ot[e][c * NV + v], alpha[v]);
            int c = 0;
            for (; c + DD <= d; c += DD) value_tile(vb, vt, nk, st, ot[e], c, DD);
            for (; c < d; c++) value_tile(vb, vt, nk, st, ot[e], c, 1);
        }
    }
    for (int e = 0; e < nh; e++)
        for (int v = 0; v < NV; v++) {
            const int e1 = ops_min(VW, i1 - i0 - v * VW);
            for (int c = 0; c < d; c++) {
                float lane[VW];
                v_store(lane, v_div(ot[e][c * NV + v], l[e][v]));
                for (int w = 0; w < e1; w++) a->o[(h0 + e) * a->oh + (i0 + v * VW + w) * a->on + c] = lane[w];
            }
        }
}

/* ---- rows kernel ------------------------------------------------------------------------- */

/* The first e values at element i of the values: float32, or fp16 widened on the way in. */
VINL vf load_v(const void *vv, ptrdiff_t i, int e, const int half) {
    return half ? v_load_half((const uint16_t *)vv + i, e) : load_e((const float *)vv + i, e);
}

/* acc[0 .. C * VW) (the last vector holding e values) = acc * alpha + sum over the nk keys j
 * of p[j] * v[j][c0 ...]: C accumulators in registers, so C independent chains. */
VINL void value_rows(float *acc, const void *vv, ptrdiff_t vt, int c0, int nk, const float *p, vf alpha, const int C,
                     int e, const int half) {
    vf s[4];
    for (int c = 0; c < C; c++) s[c] = v_mul(load_e(acc + c * VW, c == C - 1 ? e : VW), alpha);
    for (int j = 0; j < nk; j++) {
        const vf pj = v_set1(p[j]);
        for (int c = 0; c < C; c++) s[c] = v_fma(pj, load_v(vv, j * vt + c0 + c * VW, c == C - 1 ? e : VW, half), s[c]);
    }
    for (int c = 0; c < C; c++) store_e(acc + c * VW, s[c], c == C - 1 ? e : VW);
}

/* acc[0 .. d) = acc * alpha + p @ v over a block's nk keys, four vectors at a time. */
VINL void values(float *acc, const void *vv, ptrdiff_t vt, int d, int nk, const float *p, vf alpha, const int half) {
    const int full = d / VW, tail = d % VW;
    int c = 0;
    for (; c + 4 <= full; c += 4) value_rows(acc + c * VW, vv, vt, c * VW, nk, p, alpha, 4, VW, half);
    for (; c < full; c++) value_rows(acc + c * VW, vv, vt, c * VW, nk, p, alpha, 1, VW, half);
    if (tail) value_rows(acc + c * VW, vv, vt, c * VW, nk, p, alpha, 1, tail, half);
}

static inline void prefetch_rows(const vlm_attn *a, int hk, int j0, int j1) {
    const int bytes = a->d * (a->kv_half ? 2 : 4);
    for (int j = j0; j < j1; j++)
        for (int c = 0; c < bytes; c += 64) {
            __builtin_prefetch((const char *)kv_row(a, a->k, a->kh, a->kt, hk, j) + c, 0, 3);
            __builtin_prefetch((const char *)kv_row(a, a->v, a->vh, a->vt, hk, j) + c, 0, 3);
        }
}

OPS_TARGET static void attn_rows(const vlm_attn *a, int hk, int r0, int r1, int j0, int j1, float *state) {
    const int d = a->d, g = a->h / a->h_kv, full = d / VW, tail = d % VW, R = r1 - r0;
    /* one block of keys at a fixed row stride: the dot products address it by constant offsets */
    float kb[VW * VLM_MAX_HEAD_DIM] __attribute__((aligned(64)));
    float q[VLM_ATTN_ROWS][VLM_MAX_HEAD_DIM], m[VLM_ATTN_ROWS], l[VLM_ATTN_ROWS];
    int jend[VLM_ATTN_ROWS], jmax = j0;
    for (int r = 0; r < R; r++) {
        const int h = hk * g + (r0 + r) / a->n, i = (r0 + r) % a->n;
        const float *qr = a->q + h * a->qh + i * a->qn;
        float *acc = state + (size_t)r * (d + 2) + 2;
        for (int c = 0; c < d; c++) {
            q[r][c] = qr[c] * a->scale;
            acc[c] = 0.0f;
        }
        m[r] = -INFINITY;
        l[r] = 0.0f;
        jend[r] = ops_min(j1, a->causal ? a->offset + i + 1 : a->t);
        jmax = jend[r] > jmax ? jend[r] : jmax;
    }
    /* decode streams the cache from DRAM: request keys and values PREFETCH_KEYS ahead of the
     * block, the first ones at once */
    prefetch_rows(a, hk, j0, ops_min(j0 + PREFETCH_KEYS, jmax));
    for (int jb = j0; jb < jmax; jb += VW) {
        const int nk = ops_min(VW, jmax - jb);
        prefetch_rows(a, hk, jb + PREFETCH_KEYS, ops_min(jb + PREFETCH_KEYS + VW, jmax));
        for (int j = 0; j < VW; j++) {
            float *dst = kb + j * VLM_MAX_HEAD_DIM;
            const void *src = kv_row(a, a->k, a->kh, a->kt, hk, jb + j);
            if (j >= nk)
                memset(dst, 0, sizeof(float) * d); /* finite: masked below */
            else if (a->kv_half)
                widen_half(src, dst, d);
            else
                memcpy(dst, src, sizeof(float) * d);
        }
        const void *vb = kv_row(a, a->v, a->vh, a->vt, hk, jb);
        for (int r = 0; r < R; r++) {
            const int rk = ops_min(nk, jend[r] - jb); /* keys of the block this row sees */
            if (rk <= 0) continue;
            vf dots[VW];
            for (int j = 0; j < VW; j++) dots[j] = v_zero();
            for (int c = 0; c < full; c++) {
                const vf qc = v_load(q[r] + c * VW);
                for (int j = 0; j < VW; j++) dots[j] = v_fma(qc, v_load(kb + j * VLM_MAX_HEAD_DIM + c * VW), dots[j]);
            }
            if (tail) {
                const vf qc = v_loadn(q[r] + full * VW, tail);
                for (int j = 0; j < VW; j++)
                    dots[j] = v_fma(qc, v_loadn(kb + j * VLM_MAX_HEAD_DIM + full * VW, tail), dots[j]);
            }
            vf s = v_sum_lanes(dots);
            if (rk < VW) s = v_keep_le(s, v_iota(), v_set1((float)(rk - 1)));
            const float mb = fmaxf(m[r], v_hmax(s));
            const vf alpha = v_set1(v_first(v_exp(v_set1(m[r] - mb))));
            const vf p = v_exp(v_sub(s, v_set1(mb)));
            l[r] = l[r] * v_first(alpha) + v_hsum(p);
            m[r] = mb;
            float pf[VW];
            v_store(pf, p);
            float *acc = state + (size_t)r * (d + 2) + 2;
            if (a->kv_half)
                values(acc, vb, a->vt, d, rk, pf, alpha, 1);
            else
                values(acc, vb, a->vt, d, rk, pf, alpha, 0);
        }
    }
    for (int r = 0; r < R; r++) {
        state[(size_t)r * (d + 2)] = m[r];
        state[(size_t)r * (d + 2) + 1] = l[r];
    }
}

/* ---- row ops ----------------------------------------------------------------------------- */

OPS_TARGET static void rms_norm(const float *x, const float *w, float eps, int n, float *y) {
    vf ss = v_zero();
    for (int c = 0; c < n; c += VW) {
        const vf xv = v_loadn(x + c, ops_min(VW, n - c));
        ss = v_fma(xv, xv, ss);
    }
    const vf r = v_set1(1.0f / sqrtf(v_hsum(ss) / (float)n + eps));
    for (int c = 0; c < n; c += VW) {
        const int e = ops_min(VW, n - c);
        v_storen(y + c, v_mul(v_mul(v_loadn(x + c, e), r), v_loadn(w + c, e)), e);
    }
}

OPS_TARGET static void swiglu(const float *g, const float *u, int n, float *y) {
    const vf one = v_set1(1.0f), zero = v_zero();
    for (int c = 0; c < n; c += VW) {
        const int e = ops_min(VW, n - c);
        const vf gv = v_loadn(g + c, e);
        const vf silu = v_div(gv, v_add(one, v_exp(v_sub(zero, gv))));
        v_storen(y + c, v_mul(silu, v_loadn(u + c, e)), e);
    }
}

OPS_TARGET static void rotary(const float *x, const float *cos, const float *sin, int d, float *y) {
    const int half = d / 2;
    for (int c = 0; c < half; c += VW) {
        const int e = ops_min(VW, half - c);
        const vf x1 = v_loadn(x + c, e), x2 = v_loadn(x + half + c, e);
        const vf y1 = v_sub(v_mul(x1, v_loadn(cos + c, e)), v_mul(x2, v_loadn(sin + c, e)));
        const vf y2 = v_add(v_mul(x2, v_loadn(cos + half + c, e)), v_mul(x1, v_loadn(sin + half + c, e)));
        v_storen(y + c, y1, e);
        v_storen(y + half + c, y2, e);
    }
}

const vlm_ops OPS_NAME = {VW * NV, attn_block, attn_rows, rms_norm, swiglu, rotary, to_half};

/* AVX-512 kernels (F, BW, VL, DQ, VNNI), compiled for that target per function so the rest
 * of the extension keeps the baseline ISA; chosen at run time only where the CPU has them.
 *
 * Each tile computes one 16-row panel for T tokens (a compile-time constant, T <= TQ or
 * TF): the panel's packed weights are decoded once per tile and reused by T tokens, and
 * the T accumulators stay in registers. One lane is one row (see kernels.h).
 */
#include "kernels.h"

#ifdef VLM_X86
#include <immintrin.h>
#include <string.h>

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#define INLINE static inline __attribute__((always_inline)) TARGET

/* Token tiles. An int8 tile keeps 2 vectors per token (int and float sums), a float tile 1
 * or 2, out of 32 registers. */
#define TQ 8
#define TF 8

/* Independent accumulator chains per token: with few tokens one chain would serialize on
 * the add latency, so small tiles spread their sums over up to 4 chains. */
#define CHAINS(T) ((T) >= 4 ? 1 : 4 / (T))

INLINE __m512i bcast4(const int32_t *p) {
    int32_t v;
    memcpy(&v, p, 4); /* the words were written as bytes */
    return _mm512_set1_epi32(v);
}

INLINE __m512 load_half16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }

/* vlm_iq4nl_values ^ flip (0x80: + 128, unsigned) in every 128-bit lane, for vpshufb. */
INLINE __m512i iq4_table(__m128i flip) {
    return _mm512_broadcast_i32x4(_mm_xor_si128(_mm_loadu_si128((const __m128i *)vlm_iq4nl_values), flip));
}

/* The rows of panel p that exist (the last panel may be partial). */
INLINE __mmask16 row_mask(const vlm_matrix *m, int p) {
    const int nr = vlm_min(PANEL, m->rows - p * PANEL);
    return (__mmask16)((1u << nr) - 1);
}

/* y of token t for the span's panel, or 0 on its first k slice. */
INLINE __m512 start_rows(const vlm_matrix *m, const vlm_act *a, vlm_span sp, int t) {
    if (sp.k0 == 0) return _mm512_setzero_ps();
    return _mm512_maskz_loadu_ps(row_mask(m, sp.p), a->y + (size_t)(sp.t0 + t) * m->rows + sp.p * PANEL);
}

INLINE void store_rows(const vlm_matrix *m, const vlm_act *a, vlm_span sp, int t, __m512 v) {
    _mm512_mask_storeu_ps(a->y + (size_t)(sp.t0 + t) * m->rows + sp.p * PANEL, row_mask(m, sp.p), v);
}

/* --- int8 activations ------------------------------------------------------------------
 * y = sum over groups of d * sum over runs (dx * isum) + m * s, isum = vpdpbusd of the
 * unsigned weights with the int8 activations. The unsigned forms are fixed up exactly:
 * iq4_nl (its codebook value + 128, looked up by vpshufb) and the 8-bit formats (w + 128)
 * start each isum at -128 * sum(qx) (vlm_act.c); q4_sym (q) takes the min term m = -8d, as
 * s = dx * sum(qx); the asymmetric formats add their own m. */
INLINE void tile_int8_g(const vlm_matrix *m, const vlm_act *a, vlm_span sp, const int T, const int C, const int fmt,
                        const int G) {
    const int K = m->cols, NG = K / G, R = PARTS(G), NB = K / RUN;
    const unsigned char *panel = m->data + (size_t)sp.p * m->panel_bytes;
    const __m512i *qs = (const __m512i *)panel + (size_t)sp.k0 / RUN * (vlm_is_8bit(fmt) ? 8 : 4);
    const uint16_t *sc = (const uint16_t *)(panel + m->scales_off);
    const uint16_t *mn = (const uint16_t *)(panel + m->mins_off);
    const __m512i nib = _mm512_set1_epi8(0x0f), lut = iq4_table(_mm_set1_epi8((char)0x80));
    /* this tile's activations (interleaved, see vlm_act): word j of token t is xq[j * TQ + t] */
    const int32_t *xq = (const int32_t *)a->q + (size_t)(sp.t0 / TQ) * (K / 4) * TQ;
    const float *xd = a->d + (size_t)(sp.t0 / TQ) * NB * TQ, *xs = a->s + (size_t)(sp.t0 / TQ) * NG * TQ;
    const int PART = vlm_min(G, RUN), offset128 = fmt == FMT_IQ4 || vlm_is_8bit(fmt);
    const int32_t *xc = a->c + (size_t)(sp.t0 / TQ) * (K / PART) * TQ;
    __m512 acc[TQ];
    for (int t = 0; t < T; t++) acc[t] = start_rows(m, a, sp, t);
    for (int g = sp.k0 / G; g < sp.k1 / G; g++) {
        vlm_prefetch(sc + g * PANEL, sp.pf);
        if (vlm_has_mins(fmt)) vlm_prefetch(mn + g * PANEL, sp.pf);
        const __m512 d = load_half16(sc + g * PANEL);
        for (int r = 0; r < R; r++) {
            const int b = g * G / RUN + r;                                /* the run */
            const int32_t *xb = xq + (size_t)(g * G / 4 + r * 8) * TQ; /* its words from the group's first */
            const int32_t *xcp = xc + (size_t)((g * G + r * RUN) / PART) * TQ; /* the part's offset fix */
            __m512i isum[CHAINS(1)][TQ];
            for (int j = 0; j < C; j++)
                for (int t = 0; t < T; t++)
                    isum[j][t] = j == 0 && offset128 ? bcast4(xcp + t) : _mm512_setzero_si512();
            if (vlm_is_8bit(fmt)) {
                for (int j = 0; j < 8; j++) {
                    if (4 * j == G) break; /* a group of 16 is half a run */
                    vlm_prefetch(qs, sp.pf);
                    const __m512i v = _mm512_load_si512(qs++);
                    for (int t = 0; t < T; t++)
                        isum[j % C][t] = _mm512_dpbusd_epi32(isum[j % C][t], v, bcast4(xb + j * TQ + t));
                }
            } else {
                for (int c = 0; c < 4; c++) {
                    vlm_prefetch(qs, sp.pf);
                    const __m512i v = _mm512_load_si512(qs++);
                    __m512i lo = _mm512_and_si512(v, nib), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
                    if (fmt == FMT_IQ4) {
                        lo = _mm512_shuffle_epi8(lut, lo);
                        hi = _mm512_shuffle_epi8(lut, hi);
                    }
                    for (int t = 0; t < T; t++) {
                        __m512i s = _mm512_dpbusd_epi32(isum[c % C][t], lo, bcast4(xb + 2 * c * TQ + t));
                        isum[c % C][t] = _mm512_dpbusd_epi32(s, hi, bcast4(xb + (2 * c + 1) * TQ + t));
                    }
                }
            }
            for (int t = 0; t < T; t++) {
                for (int j = 1; j < C; j++) isum[0][t] = _mm512_add_epi32(isum[0][t], isum[j][t]);
                const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(xd[b * TQ + t]));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[0][t]), scale, acc[t]);
            }
        }
        if (vlm_has_mins(fmt) || fmt == FMT_Q4S) {
            const __m512 mv = fmt == FMT_Q4S ? _mm512_mul_ps(d, _mm512_set1_ps(-8.0f)) : load_half16(mn + g * PANEL);
            for (int t = 0; t < T; t++) acc[t] = _mm512_fmadd_ps(mv, _mm512_set1_ps(xs[g * TQ + t]), acc[t]);
        }
    }
    for (int t = 0; t < T; t++) store_rows(m, a, sp, t, acc[t]);
}

/* Groups of 32 (every 4-bit GGUF type) as a constant: the address arithmetic folds away. */
INLINE void tile_int8(const vlm_matrix *m, const vlm_act *a, vlm_span sp, const int T, const int C, const int fmt) {
    if (m->group == RUN)
        tile_int8_g(m, a, sp, T, C, fmt, RUN);
    else
        tile_int8_g(m, a, sp, T, C, fmt, m->group);
}

/* --- float activations, quantized weights ------------------------------------------------
 * 4-bit: vpermps looks the nibble up in a 16-float table (only the low 4 index bits
 * count), giving q (asymmetric), q - 8 (symmetric) or the codebook value in one op without
 * masking.
 * 8-bit: flip the +128 bias off and sign-extend each byte with a shift pair. */
INLINE void tile_float_quant(const vlm_matrix *m, const vlm_act *a, vlm_span sp, const int T, const int C,
                             const int fmt) {
    const int K = m->cols, G = m->group, NG = K / G, R = PARTS(G);
    const unsigned char *panel = m->data + (size_t)sp.p * m->panel_bytes;
    const __m512i *qs = (const __m512i *)panel + (size_t)sp.k0 / RUN * (vlm_is_8bit(fmt) ? 8 : 4);
    const uint16_t *sc = (const uint16_t *)(panel + m->scales_off);
    const uint16_t *mn = (const uint16_t *)(panel + m->mins_off);
    const __m512 iq4 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)vlm_iq4nl_values)));
    const __m512 table = fmt == FMT_Q4S   ? _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7)
                         : fmt == FMT_IQ4 ? iq4
                                          : _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i bias = _mm512_set1_epi8((char)0x80);
    /* this tile's activations (interleaved, see vlm_act): value k of token t is x[k * TF + t] */
    const size_t lane = (size_t)sp.t0 % TF; /* a solo tile (gemm_float) may start mid-tile */
    const float *x = a->x + (size_t)(sp.t0 / TF) * K * TF + lane, *xs = a->xs + (size_t)(sp.t0 / TF) * NG * TF + lane;
    __m512 acc[TF];
    for (int t = 0; t < T; t++) acc[t] = start_rows(m, a, sp, t);
    for (int g = sp.k0 / G; g < sp.k1 / G; g++) {
        vlm_prefetch(sc + g * PANEL, sp.pf);
        if (vlm_has_mins(fmt)) vlm_prefetch(mn + g * PANEL, sp.pf);
        __m512 gs[CHAINS(1)][TF];
        for (int j = 0; j < C; j++)
            for (int t = 0; t < T; t++) gs[j][t] = _mm512_setzero_ps();
        for (int r = 0; r < R; r++) {
            const int k0 = g * G + r * RUN;
            if (vlm_is_8bit(fmt)) {
                for (int j = 0; j < 8; j++) {
                    if (4 * j == G) break; /* a group of 16 is half a run */
                    vlm_prefetch(qs, sp.pf);
                    const __m512i v = _mm512_xor_si512(_mm512_load_si512(qs++), bias);
                    for (int i = 0; i < 4; i++) {
                        const __m512i wi = _mm512_srai_epi32(i == 3 ? v : _mm512_slli_epi32(v, 24 - 8 * i), 24);
                        const __m512 w = _mm512_cvtepi32_ps(wi);
                        for (int t = 0; t < T; t++) {
                            const __m512 xv = _mm512_set1_ps(x[(size_t)(k0 + 4 * j + i) * TF + t]);
                            gs[j % C][t] = _mm512_fmadd_ps(w, xv, gs[j % C][t]);
                        }
                    }
                }
            } else {
                for (int c = 0; c < 4; c++) {
                    vlm_prefetch(qs, sp.pf);
                    const __m512i v = _mm512_load_si512(qs++);
                    for (int n = 0; n < 8; n++) {
                        const __m512i idx = n ? _mm512_srli_epi32(v, 4 * n) : v;
                        const __m512 w = _mm512_permutexvar_ps(idx, table);
                        const int k = k0 + 8 * c + (n & 1) * 4 + n / 2;
                        for (int t = 0; t < T; t++)
                            gs[c % C][t] = _mm512_fmadd_ps(w, _mm512_set1_ps(x[(size_t)k * TF + t]), gs[c % C][t]);
                    }
                }
            }
        }
        const __m512 d = load_half16(sc + g * PANEL);
        for (int t = 0; t < T; t++) {
            for (int j = 1; j < C; j++) gs[0][t] = _mm512_add_ps(gs[0][t], gs[j][t]);
            acc[t] = _mm512_fmadd_ps(d, gs[0][t], acc[t]);
        }
        if (vlm_has_mins(fmt)) {
            const __m512 mv = load_half16(mn + g * PANEL);
            for (int t = 0; t < T; t++) acc[t] = _mm512_fmadd_ps(mv, _mm512_set1_ps(xs[g * TF + t]), acc[t]);
        }
    }
    for (int t = 0; t < T; t++) store_rows(m, a, sp, t, acc[t]);
}

/* --- float activations, 16-bit float weights ------------------------------------------ */
INLINE __m512 load_column(const uint16_t *panel, int k, const int fmt) {
    const __m256i h = _mm256_load_si256((const __m256i *)(panel + (size_t)k * PANEL));
    if (fmt == FMT_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); /* bf16: high half of a float */
}

/* Columns per step (2 cache lines), at least the most chains a tile uses. */
#define HALF_STEP 4

INLINE void tile_half(const vlm_matrix *m, const vlm_act *a, vlm_span sp, const int T, const int C, const int fmt) {
    const uint16_t *panel = (const uint16_t *)(m->data + (size_t)sp.p * m->panel_bytes);
    /* value k of token t: x[k * TF + t]; a solo tile (gemm_float) may start mid-tile */
    const float *x = a->x + (size_t)(sp.t0 / TF) * m->cols * TF + sp.t0 % TF;
    __m512 acc[CHAINS(1)][TF];
    for (int t = 0; t < T; t++) {
        acc[0][t] = start_rows(m, a, sp, t);
        for (int j = 1; j < C; j++) acc[j][t] = _mm512_setzero_ps();
    }
    int k = sp.k0;
    for (; k + HALF_STEP <= sp.k1; k += HALF_STEP) {
        vlm_prefetch(panel + (size_t)k * PANEL, sp.pf);
        vlm_prefetch(panel + (size_t)(k + 2) * PANEL, sp.pf);
        for (int i = 0; i < HALF_STEP; i++) {
            const __m512 w = load_column(panel, k + i, fmt);
            for (int t = 0; t < T; t++)
                acc[i % C][t] = _mm512_fmadd_ps(w, _mm512_set1_ps(x[(size_t)(k + i) * TF + t]), acc[i % C][t]);
        }
    }
    for (; k < sp.k1; k++) { /* the last columns */
        const __m512 w = load_column(panel, k, fmt);
        for (int t = 0; t < T; t++) acc[0][t] = _mm512_fmadd_ps(w, _mm512_set1_ps(x[(size_t)k * TF + t]), acc[0][t]);
    }
    for (int t = 0; t < T; t++) {
        for (int j = 1; j < C; j++) acc[0][t] = _mm512_add_ps(acc[0][t], acc[j][t]);
        store_rows(m, a, sp, t, acc[0][t]);
    }
}

/* Instantiate a tile for every (format, T, C): the switch turns them into constants so each
 * instance is fully unrolled with its accumulators in registers. T = 8 = TQ = TF; C is
 * CHAINS(T), or CHAINS(1) at every width of a solo tile (see gemm_float). */
#define CASE_T(tile, fmt, T, C)    \
    case T:                        \
        tile(m, a, sp, T, C, fmt); \
        break;
#define SWITCH_T(tile, fmt, n)                                                                                  \
    switch (n) {                                                                                                \
        CASE_T(tile, fmt, 1, CHAINS(1)) CASE_T(tile, fmt, 2, CHAINS(2)) CASE_T(tile, fmt, 3, CHAINS(3))         \
        CASE_T(tile, fmt, 4, CHAINS(4)) CASE_T(tile, fmt, 5, CHAINS(5)) CASE_T(tile, fmt, 6, CHAINS(6))         \
        CASE_T(tile, fmt, 7, CHAINS(7)) default : tile(m, a, sp, 8, CHAINS(8), fmt);                           \
    }
#define SOLO_WIDTH 4 /* tokens of a solo tile: their CHAINS(1) accumulators fit the 32 registers; divides TF */
#define SWITCH_SOLO(tile, fmt, n)                                                                               \
    switch (n) {                                                                                                \
        CASE_T(tile, fmt, 1, CHAINS(1)) CASE_T(tile, fmt, 2, CHAINS(1)) CASE_T(tile, fmt, 3, CHAINS(1))         \
        default : tile(m, a, sp, 4, CHAINS(1), fmt);                                                           \
    }
#define FLOAT_TILES(SWITCH)                                         \
    switch (m->fmt) {                                               \
    case FMT_Q4A: SWITCH(tile_float_quant, FMT_Q4A, n) break;       \
    case FMT_Q4S: SWITCH(tile_float_quant, FMT_Q4S, n) break;       \
    case FMT_IQ4: SWITCH(tile_float_quant, FMT_IQ4, n) break;       \
    case FMT_Q8: SWITCH(tile_float_quant, FMT_Q8, n) break;         \
    case FMT_Q8A: SWITCH(tile_float_quant, FMT_Q8A, n) break;       \
    case FMT_F16: SWITCH(tile_half, FMT_F16, n) break;              \
    default: SWITCH(tile_half, FMT_BF16, n) break;                  \
    }

/* Columns per k slice (a multiple of every group size): the slice of a panel plus the
 * tile's activations for it stay within L1. A single token tile takes all columns. */
#define K_SLICE_INT8 1024
#define K_SLICE_FLOAT 512

TARGET static void gemm_int8(const vlm_matrix *m, const vlm_act *a, int p0, int p1) {
    const int ahead = vlm_prefetch_start(m, p0, p1);
    const int slice = a->n <= TQ ? m->cols : K_SLICE_INT8;
    for (int p = p0; p < p1; p++) {
        for (int k0 = 0; k0 < m->cols; k0 += slice) {
            for (int t0 = 0; t0 < a->n; t0 += TQ) {
                const int n = vlm_min(TQ, a->n - t0);
                const vlm_span sp = {p, t0, k0, vlm_min(m->cols, k0 + slice), vlm_prefetch_offset(m, p, p1, ahead, t0)};
                switch (m->fmt) {
                case FMT_Q4A: SWITCH_T(tile_int8, FMT_Q4A, n) break;
                case FMT_Q4S: SWITCH_T(tile_int8, FMT_Q4S, n) break;
                case FMT_IQ4: SWITCH_T(tile_int8, FMT_IQ4, n) break;
                case FMT_Q8: SWITCH_T(tile_int8, FMT_Q8, n) break;
                default: SWITCH_T(tile_int8, FMT_Q8A, n) break;
                }
            }
        }
    }
}

TARGET static void gemm_float(const vlm_matrix *m, const vlm_act *a, int p0, int p1) {
    const int ahead = vlm_prefetch_start(m, p0, p1);
    /* Few tokens are tiled with the chains of one token (see VLM_SOLO_TOKENS). */
    const int solo = a->n <= VLM_SOLO_TOKENS, width = solo ? SOLO_WIDTH : TF, slice = solo ? m->cols : K_SLICE_FLOAT;
    for (int p = p0; p < p1; p++) {
        for (int k0 = 0; k0 < m->cols; k0 += slice) {
            for (int t0 = 0; t0 < a->n; t0 += width) {
                const int n = vlm_min(width, a->n - t0);
                const vlm_span sp = {p, t0, k0, vlm_min(m->cols, k0 + slice), vlm_prefetch_offset(m, p, p1, ahead, t0)};
                if (solo)
                    FLOAT_TILES(SWITCH_SOLO)
                else
                    FLOAT_TILES(SWITCH_T)
            }
        }
    }
}

/* Same operations as vlm_quantize_row_portable, 32 values at a time. */
TARGET static void quantize_row(const float *x, int cols, int group, int8_t *q, float *d, float *s, int32_t *c,
                                     int w) {
    const __m512 sign = _mm512_set1_ps(-0.0f);
    for (int b = 0; b < cols / RUN; b++) {
        const __m512 x0 = _mm512_loadu_ps(x + b * RUN), x1 = _mm512_loadu_ps(x + b * RUN + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, x0), _mm512_andnot_ps(sign, x1)));
        const float db = amax / 127.0f;
        const __m512 id = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, id));
        const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, id));
        int8_t bytes[RUN];
        _mm_storeu_si128((__m128i *)bytes, _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(bytes + 16), _mm512_cvtepi32_epi8(q1));
        for (int j = 0; j < RUN / 4; j++) memcpy(q + ((size_t)b * RUN / 4 + j) * 4 * w, bytes + 4 * j, 4);
        d[(size_t)b * w] = db;
        if (group == 16)
            vlm_group_sum(s, c, b, group, w, db, _mm512_reduce_add_epi32(q0), _mm512_reduce_add_epi32(q1));
        else
            vlm_group_sum(s, c, b, group, w, db, _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)), 0);
    }
}

const vlm_path vlm_path_avx512 = {"avx512", TQ, TF, gemm_int8, gemm_float, quantize_row, &vlm_ops_avx512};

#endif

/* AVX2 + FMA + F16C kernels, compiled for that target per function and chosen at run time.
 *
 * Same panel layout and tiling as the AVX-512 kernels (matmul_avx512.c); a 256-bit vector
 * holds 8 rows, so each tile handles one half of a panel (h = 0: rows 0-7, h = 1: rows
 * 8-15, i.e. bytes 32h..32h+31 of every 64-byte chunk). Without vpdpbusd, int8 dot
 * products use pmaddubsw (u8 x s8 -> pairs summed to int16) then pmaddwd against ones.
 *
 * matmul_avxvnni.c compiles this file again with VLM_AVX_VNNI defined: the path for CPUs with
 * AVX-VNNI but no AVX-512 (Intel since Alder Lake, AMD since Zen 5), whose int8 products
 * are the VEX-encoded vpdpbusd, one instruction instead of three.
 */
#include "kernels.h"

#ifdef VLM_X86
#include <immintrin.h>
#include <string.h>

#ifdef VLM_AVX_VNNI
#define VNNI 1
#define TARGET __attribute__((target("avx2,fma,f16c,avxvnni")))
#define PATH vlm_path_avxvnni
#define PATH_NAME "avxvnni"
#else
#define VNNI 0
#define TARGET __attribute__((target("avx2,fma,f16c")))
#define PATH vlm_path_avx2
#define PATH_NAME "avx2"
#endif
#define INLINE static inline __attribute__((always_inline)) TARGET

/* Token tiles, for 16 registers: an int8 tile keeps 2 vectors per token, a float tile 1-2. */
#define TQ 4
#define TF 6

/* Independent accumulator chains per token: with few tokens one chain would serialize on
 * the add latency, so small tiles spread their sums over up to 4 chains. */
#define CHAINS(T) ((T) >= 4 ? 1 : 4 / (T))

INLINE __m256i bcast4(const int32_t *p) {
    int32_t v;
    memcpy(&v, p, 4); /* the words were written as bytes */
    return _mm256_set1_epi32(v);
}

INLINE __m256 load_half8(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

/* vlm_iq4nl_values ^ flip (0x80: + 128, unsigned) in both 128-bit lanes, for vpshufb. */
INLINE __m256i iq4_table(char flip) {
    const __m128i t = _mm_xor_si128(_mm_loadu_si128((const __m128i *)vlm_iq4nl_values), _mm_set1_epi8(flip));
    return _mm256_broadcastsi128_si256(t);
}

/* Lanes of half h of panel p that are rows of the matrix (the last panel may be partial). */
INLINE __m256i row_mask(const vlm_matrix *m, int p, int h) {
    const int nr = m->rows - p * PANEL - 8 * h;
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(nr), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

INLINE float *rows_of(const vlm_matrix *m, const vlm_act *a, vlm_span sp, int h, int t) {
    return a->y + (size_t)(sp.t0 + t) * m->rows + sp.p * PANEL + 8 * h;
}

/* y of token t for the span's half panel, or 0 on its first k slice. */
INLINE __m256 start_rows(const vlm_matrix *m, const vlm_act *a, vlm_span sp, int h, int t) {
    if (sp.k0 == 0) return _mm256_setzero_ps();
    return _mm256_maskload_ps(rows_of(m, a, sp, h, t), row_mask(m, sp.p, h));
}

INLINE void store_rows(const vlm_matrix *m, const vlm_act *a, vlm_span sp, int h, int t, __m256 v) {
    _mm256_maskstore_ps(rows_of(m, a, sp, h, t), row_mask(m, sp.p, h), v);
}

/* --- int8 activations (see matmul_avx512.c for the algebra) ------------------------------
 * 4-bit: a pmaddubsw lane is at most 2 * 15 * 127 = 3810, so the 8 of one run add up in
 * int16 (<= 30480) before one pmaddwd. 8-bit and the IQ4_NL codebook's values: u8 x s8
 * could saturate, so multiply |w| by x carrying w's sign (the sign trick, sign_dot); then no
 * min term is needed. With AVX-VNNI all take vpdpbusd on unsigned values (q, w + 128, the
 * codebook's value + 128), and 8-bit and IQ4_NL get the -128d min term as in the AVX-512
 * kernel. */
#ifndef VLM_AVX_VNNI
/* v, as a value the compiler must hold at this point. Integer adds are associative, so GCC
 * otherwise rewrites a tile's running sums into trees: all 32 products of a 4-bit run first,
 * spilled to the stack (4-bit products 1.3x slower). vpdpbusd accumulates in place and needs
 * no fence. */
INLINE __m256i fence(__m256i v) {
    __asm__("" : "+x"(v));
    return v;
}

/* isum + the sums of 4 products of signed weights w (aw = |w|) with x: exact for |x| <= 127. */
INLINE __m256i sign_dot(__m256i isum, __m256i w, __m256i aw, __m256i x) {
    const __m256i pairs = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(x, w)); /* |pair| <= 2 * 128 * 127 */
    return fence(_mm256_add_epi32(isum, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))));
}
#endif

INLINE void tile_int8_g(const vlm_matrix *m, const vlm_act *a, vlm_span sp, int h, const int T, const int C,
                        const int fmt, const int G) {
    const int K = m->cols, NG = K / G, R = PARTS(G), NB = K / RUN;
    const unsigned char *panel = m->data + (size_t)sp.p * m->panel_bytes;
    const unsigned char *qs = panel + (size_t)sp.k0 / RUN * (vlm_is_8bit(fmt) ? 512 : 256) + 32 * h;
    const uint16_t *sc = (const uint16_t *)(panel + m->scales_off) + 8 * h;
    const uint16_t *mn = (const uint16_t *)(panel + m->mins_off) + 8 * h;
    const __m256i nib = _mm256_set1_epi8(0x0f), lut = iq4_table(VNNI ? (char)0x80 : 0);
#ifndef VLM_AVX_VNNI
    const __m256i ones = _mm256_set1_epi16(1), bias = _mm256_set1_epi8((char)0x80);
#endif
    /* this tile's activations (interleaved, see vlm_act): word j of token t is xq[j * TQ + t] */
    const int32_t *xq = (const int32_t *)a->q + (size_t)(sp.t0 / TQ) * (K / 4) * TQ;
    const float *xd = a->d + (size_t)(sp.t0 / TQ) * NB * TQ, *xs = a->s + (size_t)(sp.t0 / TQ) * NG * TQ;
    __m256 acc[TQ];
    for (int t = 0; t < T; t++) acc[t] = start_rows(m, a, sp, h, t);
    for (int g = sp.k0 / G; g < sp.k1 / G; g++) {
        vlm_prefetch(sc + g * PANEL, sp.pf);
        if (vlm_has_mins(fmt)) vlm_prefetch(mn + g * PANEL, sp.pf);
        const __m256 d = load_half8(sc + g * PANEL);
        for (int r = 0; r < R; r++) {
            const int b = g * G / RUN + r, w0 = g * G / 4 + r * 8; /* the run, its first word here */
            __m256i isum[CHAINS(1)][TQ];
            for (int j = 0; j < C; j++)
                for (int t = 0; t < T; t++) isum[j][t] = _mm256_setzero_si256();
            if (vlm_is_8bit(fmt)) {
                for (int j = 0; j < 8; j++, qs += 64) {
                    if (4 * j == G) break; /* a group of 16 is half a run */
                    vlm_prefetch(qs, sp.pf);
#ifdef VLM_AVX_VNNI
                    const __m256i v = _mm256_load_si256((const __m256i *)qs);
                    for (int t = 0; t < T; t++)
                        isum[j % C][t] = _mm256_dpbusd_avx_epi32(isum[j % C][t], v, bcast4(xq + (size_t)(w0 + j) * TQ + t));
#else
                    const __m256i w = _mm256_xor_si256(_mm256_load_si256((const __m256i *)qs), bias);
                    const __m256i aw = _mm256_abs_epi8(w);
                    for (int t = 0; t < T; t++)
                        isum[j % C][t] = sign_dot(isum[j % C][t], w, aw, bcast4(xq + (size_t)(w0 + j) * TQ + t));
#endif
                }
            } else {
                /* Q4: int16 partial sums, at most 8 products per run, each <= 3810, fit */
                for (int c = 0; c < 4; c++, qs += 64) {
                    vlm_prefetch(qs, sp.pf);
                    const __m256i v = _mm256_load_si256((const __m256i *)qs);
                    __m256i lo = _mm256_and_si256(v, nib), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
                    if (fmt == FMT_IQ4) {
                        lo = _mm256_shuffle_epi8(lut, lo);
                        hi = _mm256_shuffle_epi8(lut, hi);
                    }
#ifndef VLM_AVX_VNNI
                    const __m256i alo = _mm256_abs_epi8(lo), ahi = _mm256_abs_epi8(hi); /* IQ4 only */
#endif
                    for (int t = 0; t < T; t++) {
                        const __m256i xlo = bcast4(xq + (size_t)(b * 8 + 2 * c) * TQ + t);
                        const __m256i xhi = bcast4(xq + (size_t)(b * 8 + 2 * c + 1) * TQ + t);
#ifdef VLM_AVX_VNNI
                        isum[c % C][t] = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(isum[c % C][t], lo, xlo), hi, xhi);
#else
                        if (fmt == FMT_IQ4) {
                            isum[c % C][t] = sign_dot(sign_dot(isum[c % C][t], lo, alo, xlo), hi, ahi, xhi);
                        } else {
                            const __m256i plo = _mm256_maddubs_epi16(lo, xlo), phi = _mm256_maddubs_epi16(hi, xhi);
                            isum[c % C][t] = fence(_mm256_add_epi16(isum[c % C][t], _mm256_add_epi16(plo, phi)));
                        }
#endif
                    }
                }
#ifndef VLM_AVX_VNNI
                for (int j = 0; j < C && fmt != FMT_IQ4; j++)
                    for (int t = 0; t < T; t++) isum[j][t] = _mm256_madd_epi16(isum[j][t], ones);
#endif
            }
            for (int t = 0; t < T; t++) {
                for (int j = 1; j < C; j++) isum[0][t] = _mm256_add_epi32(isum[0][t], isum[j][t]);
                const __m256 scale = _mm256_mul_ps(d, _mm256_set1_ps(xd[b * TQ + t]));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[0][t]), scale, acc[t]);
            }
        }
        if (VNNI || (fmt != FMT_Q8 && fmt != FMT_IQ4)) { /* the sign trick needs no -128d term */
            const __m256 d128 = _mm256_mul_ps(d, _mm256_set1_ps(-128.0f));
            const __m256 mv = fmt == FMT_Q4A   ? load_half8(mn + g * PANEL)
                              : fmt == FMT_Q4S ? _mm256_mul_ps(d, _mm256_set1_ps(-8.0f))
                              : fmt == FMT_Q8A ? (VNNI ? _mm256_add_ps(d128, load_half8(mn + g * PANEL)) : load_half8(mn + g * PANEL))
                                               : d128;
            for (int t = 0; t < T; t++) acc[t] = _mm256_fmadd_ps(mv, _mm256_set1_ps(xs[g * TQ + t]), acc[t]);
        }
    }
    for (int t = 0; t < T; t++) store_rows(m, a, sp, h, t, acc[t]);
}

/* Groups of 32 (every 4-bit GGUF type) as a constant: the address arithmetic folds away. */
INLINE void tile_int8(const vlm_matrix *m, const vlm_act *a, vlm_span sp, int h, const int T, const int C,
                      const int fmt) {
    if (m->group == RUN)
        tile_int8_g(m, a, sp, h, T, C, fmt, RUN);
    else
        tile_int8_g(m, a, sp, h, T, C, fmt, m->group);
}

/* --- float activations, quantized weights ------------------------------------------------ */
INLINE void tile_float_quant(const vlm_matrix *m, const vlm_act *a, vlm_span sp, int h, const int T, const int C,
                             const int fmt) {
    const int K = m->cols, G = m->group, NG = K / G, R = PARTS(G);
    const unsigned char *panel = m->data + (size_t)sp.p * m->panel_bytes;
    const unsigned char *qs = panel + (size_t)sp.k0 / RUN * (vlm_is_8bit(fmt) ? 512 : 256) + 32 * h;
    const uint16_t *sc = (const uint16_t *)(panel + m->scales_off) + 8 * h;
    const uint16_t *mn = (const uint16_t *)(panel + m->mins_off) + 8 * h;
    const __m256i nib = _mm256_set1_epi32(0x0f), eight = _mm256_set1_epi32(8);
    const __m256i bias = _mm256_set1_epi8((char)0x80);
    /* IQ4_NL: the codebook as floats, entries 0-7 and 8-15 (vpermps takes 8) */
    const __m128i *codebook = (const __m128i *)vlm_iq4nl_values;
    const __m256 iq4_lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(codebook)));
    const __m256 iq4_hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(_mm_loadu_si128(codebook), 8)));
    /* this tile's activations (interleaved, see vlm_act): value k of token t is x[k * TF + t] */
    const size_t lane = (size_t)sp.t0 % TF; /* a solo tile (gemm_float) may start mid-tile */
    const float *x = a->x + (size_t)(sp.t0 / TF) * K * TF + lane, *xs = a->xs + (size_t)(sp.t0 / TF) * NG * TF + lane;
    __m256 acc[TF];
    for (int t = 0; t < T; t++) acc[t] = start_rows(m, a, sp, h, t);
    for (int g = sp.k0 / G; g < sp.k1 / G; g++) {
        vlm_prefetch(sc + g * PANEL, sp.pf);
        if (vlm_has_mins(fmt)) vlm_prefetch(mn + g * PANEL, sp.pf);
        __m256 gs[CHAINS(1)][TF];
        for (int j = 0; j < C; j++)
            for (int t = 0; t < T; t++) gs[j][t] = _mm256_setzero_ps();
        for (int r = 0; r < R; r++) {
            const int k0 = g * G + r * RUN;
            if (vlm_is_8bit(fmt)) {
                for (int j = 0; j < 8; j++, qs += 64) {
                    if (4 * j == G) break; /* a group of 16 is half a run */
                    vlm_prefetch(qs, sp.pf);
                    const __m256i v = _mm256_xor_si256(_mm256_load_si256((const __m256i *)qs), bias);
                    for (int i = 0; i < 4; i++) {
                        const __m256i wi = _mm256_srai_epi32(i == 3 ? v : _mm256_slli_epi32(v, 24 - 8 * i), 24);
                        const __m256 w = _mm256_cvtepi32_ps(wi);
                        for (int t = 0; t < T; t++) {
                            const __m256 xv = _mm256_broadcast_ss(x + (size_t)(k0 + 4 * j + i) * TF + t);
                            gs[j % C][t] = _mm256_fmadd_ps(w, xv, gs[j % C][t]);
                        }
                    }
                }
            } else {
                for (int c = 0; c < 4; c++, qs += 64) {
                    vlm_prefetch(qs, sp.pf);
                    const __m256i v = _mm256_load_si256((const __m256i *)qs);
                    for (int n = 0; n < 8; n++) {
                        __m256i wi = _mm256_and_si256(n ? _mm256_srli_epi32(v, 4 * n) : v, nib);
                        if (fmt == FMT_Q4S) wi = _mm256_sub_epi32(wi, eight);
                        /* IQ4: entry wi & 7 of the half that bit 3 (moved to the sign bit) picks */
                        const __m256 w = fmt == FMT_IQ4 ? _mm256_blendv_ps(_mm256_permutevar8x32_ps(iq4_lo, wi),
                                                                           _mm256_permutevar8x32_ps(iq4_hi, wi),
                                                                           _mm256_castsi256_ps(_mm256_slli_epi32(wi, 28)))
                                                        : _mm256_cvtepi32_ps(wi);
                        const int k = k0 + 8 * c + (n & 1) * 4 + n / 2;
                        for (int t = 0; t < T; t++) {
                            const __m256 xv = _mm256_broadcast_ss(x + (size_t)k * TF + t);
                            gs[c % C][t] = _mm256_fmadd_ps(w, xv, gs[c % C][t]);
                        }
                    }
                }
            }
        }
        const __m256 d = load_half8(sc + g * PANEL);
        for (int t = 0; t < T; t++) {
            for (int j = 1; j < C; j++) gs[0][t] = _mm256_add_ps(gs[0][t], gs[j][t]);
            acc[t] = _mm256_fmadd_ps(d, gs[0][t], acc[t]);
        }
        if (vlm_has_mins(fmt)) {
            const __m256 mv = load_half8(mn + g * PANEL);
            for (int t = 0; t < T; t++) acc[t] = _mm256_fmadd_ps(mv, _mm256_set1_ps(xs[g * TF + t]), acc[t]);
        }
    }
    for (int t = 0; t < T; t++) store_rows(m, a, sp, h, t, acc[t]);
}

/* --- float activations, 16-bit float weights ------------------------------------------ */
INLINE __m256 load_column(const uint16_t *panel, int k, int h, const int fmt) {
    const __m128i v = _mm_load_si128((const __m128i *)(panel + (size_t)k * PANEL + 8 * h));
    if (fmt == FMT_F16) return _mm256_cvtph_ps(v);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16)); /* bf16: high half of a float */
}

/* Columns per step (2 cache lines), at least the most chains a tile uses. */
#define HALF_STEP 4

INLINE void tile_half(const vlm_matrix *m, const vlm_act *a, vlm_span sp, int h, const int T, const int C,
                      const int fmt) {
    const uint16_t *panel = (const uint16_t *)(m->data + (size_t)sp.p * m->panel_bytes);
    /* value k of token t: x[k * TF + t]; a solo tile (gemm_float) may start mid-tile */
    const float *x = a->x + (size_t)(sp.t0 / TF) * m->cols * TF + sp.t0 % TF;
    __m256 acc[CHAINS(1)][TF];
    for (int t = 0; t < T; t++) {
        acc[0][t] = start_rows(m, a, sp, h, t);
        for (int j = 1; j < C; j++) acc[j][t] = _mm256_setzero_ps();
    }
    int k = sp.k0;
    for (; k + HALF_STEP <= sp.k1; k += HALF_STEP) {
        vlm_prefetch(panel + (size_t)k * PANEL, sp.pf);
        vlm_prefetch(panel + (size_t)(k + 2) * PANEL, sp.pf);
        for (int i = 0; i < HALF_STEP; i++) {
            const __m256 w = load_column(panel, k + i, h, fmt);
            for (int t = 0; t < T; t++)
                acc[i % C][t] = _mm256_fmadd_ps(w, _mm256_broadcast_ss(x + (size_t)(k + i) * TF + t), acc[i % C][t]);
        }
    }
    for (; k < sp.k1; k++) { /* the last columns */
        const __m256 w = load_column(panel, k, h, fmt);
        for (int t = 0; t < T; t++)
            acc[0][t] = _mm256_fmadd_ps(w, _mm256_broadcast_ss(x + (size_t)k * TF + t), acc[0][t]);
    }
    for (int t = 0; t < T; t++) {
        for (int j = 1; j < C; j++) acc[0][t] = _mm256_add_ps(acc[0][t], acc[j][t]);
        store_rows(m, a, sp, h, t, acc[0][t]);
    }
}

/* Instantiate a tile for every (format, T, C), as in matmul_avx512.c. */
#define CASE_T(tile, fmt, T, C)       \
    case T:                           \
        tile(m, a, sp, h, T, C, fmt); \
        break;
#define SWITCH_TQ(tile, fmt, n)                                                                                \
    switch (n) {                                                                                               \
        CASE_T(tile, fmt, 1, CHAINS(1)) CASE_T(tile, fmt, 2, CHAINS(2)) CASE_T(tile, fmt, 3, CHAINS(3))        \
        default : tile(m, a, sp, h, 4, CHAINS(4), fmt);                                                       \
    }
#define SWITCH_TF(tile, fmt, n)                                                                                \
    switch (n) {                                                                                               \
        CASE_T(tile, fmt, 1, CHAINS(1)) CASE_T(tile, fmt, 2, CHAINS(2)) CASE_T(tile, fmt, 3, CHAINS(3))        \
        CASE_T(tile, fmt, 4, CHAINS(4)) CASE_T(tile, fmt, 5, CHAINS(5)) default : tile(m, a, sp, h, 6, CHAINS(6), fmt); \
    }
#define SOLO_WIDTH 2 /* tokens of a solo tile: their CHAINS(1) accumulators fit the 16 registers; divides TF */
#define SWITCH_SOLO(tile, fmt, n) \
    switch (n) { CASE_T(tile, fmt, 1, CHAINS(1)) default : tile(m, a, sp, h, 2, CHAINS(1), fmt); }
#define FLOAT_TILES(SWITCH)                                   \
    switch (m->fmt) {                                         \
    case FMT_Q4A: SWITCH(tile_float_quant, FMT_Q4A, n) break; \
    case FMT_Q4S: SWITCH(tile_float_quant, FMT_Q4S, n) break; \
    case FMT_IQ4: SWITCH(tile_float_quant, FMT_IQ4, n) break; \
    case FMT_Q8: SWITCH(tile_float_quant, FMT_Q8, n) break;   \
    case FMT_Q8A: SWITCH(tile_float_quant, FMT_Q8A, n) break; \
    case FMT_F16: SWITCH(tile_half, FMT_F16, n) break;        \
    default: SWITCH(tile_half, FMT_BF16, n) break;            \
    }

#define INT8_TILE(fmt, n) SWITCH_TQ(tile_int8, fmt, n)

#include "matmul_halfpanel.h"

INLINE int hsum_epi32(__m256i v) {
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    return _mm_cvtsi128_si32(s4);
}

/* Same operations as vlm_quantize_row_portable, 32 values at a time. */
TARGET static void quantize_row(const float *x, int cols, int group, int8_t *q, float *d, float *s, int32_t *c,
                                     int w) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int b = 0; b < cols / RUN; b++) {
        __m256 v[4];
        __m256 mx = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(x + b * RUN + 8 * i);
            mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[i]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        const float db = amax / 127.0f;
        const __m256 id = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        __m256i qi[4];
        for (int i = 0; i < 4; i++) qi[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], id));
        /* packs interleave 128-bit lanes; the permute restores value order */
        const __m256i q16 = _mm256_packs_epi32(qi[0], qi[1]), q16b = _mm256_packs_epi32(qi[2], qi[3]);
        const __m256i q8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q16, q16b),
                                                       _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        int8_t bytes[RUN];
        _mm256_storeu_si256((__m256i *)bytes, q8);
        for (int j = 0; j < RUN / 4; j++) memcpy(q + ((size_t)b * RUN / 4 + j) * 4 * w, bytes + 4 * j, 4);
        const __m256i half0 = _mm256_add_epi32(qi[0], qi[1]), half1 = _mm256_add_epi32(qi[2], qi[3]);
        d[(size_t)b * w] = db;
        if (group == 16)
            vlm_group_sum(s, c, b, group, w, db, hsum_epi32(half0), hsum_epi32(half1));
        else
            vlm_group_sum(s, c, b, group, w, db, hsum_epi32(_mm256_add_epi32(half0, half1)), 0);
    }
}

const vlm_path PATH = {PATH_NAME, TQ, TF, gemm_int8, gemm_float, quantize_row, &vlm_ops_avx2};

#endif

/* AArch64 kernels: Advanced SIMD (every AArch64 CPU), the dot-product extension (SDOT,
 * Armv8.2 and later: Cortex-A76 / Raspberry Pi 5, Neoverse N1) and the 8-bit matrix multiply
 * (SMMLA, Armv8.6 I8MM: Neoverse V1/V2/N2, Cortex-X2 / A710 and later).
 *
 * This file is compiled three times, like matmul_avx2.c: as is (VLM_NEON_LEVEL 0, the path
 * "neon"), from matmul_neon_dot.c (1, "dotprod") and from matmul_neon_i8mm.c (2, "i8mm"). Each
 * copy carries its target in function attributes, so one build, made with a plain
 * aarch64-linux-gnu-gcc, runs on any AArch64 CPU; bindings.c picks the path from the
 * kernel's feature bits (vlm_arm_path below). On other architectures it is empty.
 *
 * The panels are the x86 layout of kernels.h, read as it is (no repack): a 64-byte chunk is
 * 16 rows of one 32-bit word, i.e. four 128-bit registers of 4 rows each, and a word is
 * 4 consecutive values of its row (after the nibble split), which is exactly the operand
 * of SDOT by a broadcast activation word. Like the AVX2 path, a tile covers half a panel
 * (8 rows, h = 0 or 1: bytes 32h .. 32h + 31 of every chunk) so its sums stay in registers.
 *
 * SMMLA multiplies a 2x8 int8 block by an 8x2 one into a 2x2 int32 tile. Two rows' words
 * for values 8c .. 8c + 3 (the low nibbles of chunk c) and 8c + 4 .. 8c + 7 (the high
 * nibbles) become a 2x8 block with one ZIP1 / ZIP2 of 32-bit lanes, and the interleaved
 * int8 activations (words of 4 tokens side by side, see vlm_act) become the 8x2 block of
 * two tokens the same way, so the i8mm tile also reads the shared layout directly.
 */
#include "kernels.h"

#ifndef VLM_NEON_LEVEL
#define VLM_NEON_LEVEL 0
#endif

#if defined(__aarch64__) && (VLM_NEON_LEVEL == 0 || (VLM_NEON_LEVEL == 1 && defined(VLM_ARM_DOTPROD)) || \
                             (VLM_NEON_LEVEL == 2 && defined(VLM_ARM_I8MM)))
#include <arm_neon.h>
#include <string.h>

#if VLM_NEON_LEVEL == 2
#if defined(__ARM_FEATURE_MATMUL_INT8) && defined(__ARM_FEATURE_DOTPROD)
#define TARGET /* the whole build targets such CPUs */
#else
#define TARGET __attribute__((target("arch=armv8.2-a+dotprod+i8mm")))
#endif
#define PATH vlm_path_i8mm
#define PATH_NAME "i8mm"
#elif VLM_NEON_LEVEL == 1
#if defined(__ARM_FEATURE_DOTPROD)
#define TARGET
#else
#define TARGET __attribute__((target("arch=armv8.2-a+dotprod")))
#endif
#define PATH vlm_path_dotprod
#define PATH_NAME "dotprod"
#else
#define TARGET /* Advanced SIMD is part of the AArch64 baseline */
#define PATH vlm_path_neon
#define PATH_NAME "neon"
#endif
#define INLINE static inline __attribute__((always_inline)) TARGET
/* The tiles' short loops (chunks, tokens, row quads) unrolled in full, so their sums live in
 * registers: GCC's own limits leave the larger ones rolled, with the sums in memory (the
 * instruction counts of scripts/arm_instruction_counts.py showed it). */
#define UNROLL _Pragma("GCC unroll 32")

/* Token tiles: an int8 tile keeps 2 vectors of int and 2 of float sums per token (8 rows),
 * the SMMLA tile (I8MM) 16 + 16 for 8 tokens; a float tile 2 (+ 2 group sums) per token. */
#if VLM_NEON_LEVEL >= 2
#define TQ 8
#else
#define TQ 4
#endif
#define TF 4

/* Independent accumulator chains per token, as in matmul_avx2.c. */
#define CHAINS(T) ((T) >= 4 ? 1 : 4 / (T))

/* acc[i] += the dot product of bytes 4i .. 4i + 3 of w with word `lane` of x (4 int8
 * activations of one token): SDOT by element. Without it: the word broadcast, widening
 * products and two pairwise adds (|w x| <= 128 * 127, so a pair's sum fits int16). The
 * lanes are spelled out because the instruction takes an immediate; `lane` is a constant
 * once the tile's token loop is unrolled, so the switch folds away. */
INLINE int32x4_t dot4_lane(int32x4_t acc, int8x16_t w, int32x4_t x, int lane) {
#if VLM_NEON_LEVEL >= 1
    const int8x16_t xb = vreinterpretq_s8_s32(x);
    switch (lane) {
    case 0: return vdotq_laneq_s32(acc, w, xb, 0);
    case 1: return vdotq_laneq_s32(acc, w, xb, 1);
    case 2: return vdotq_laneq_s32(acc, w, xb, 2);
    default: return vdotq_laneq_s32(acc, w, xb, 3);
    }
#else
    int32x4_t b;
    switch (lane) {
    case 0: b = vdupq_laneq_s32(x, 0); break;
    case 1: b = vdupq_laneq_s32(x, 1); break;
    case 2: b = vdupq_laneq_s32(x, 2); break;
    default: b = vdupq_laneq_s32(x, 3); break;
    }
    const int8x16_t xb = vreinterpretq_s8_s32(b);
    const int16x8_t pairs = vpaddq_s16(vmull_s8(vget_low_s8(w), vget_low_s8(xb)), vmull_high_s8(w, xb));
    return vpadalq_s16(acc, pairs);
#endif
}

/* 8 fp16 values (scales, mins) as two float vectors. */
INLINE void load_half8(const uint16_t *p, float32x4_t out[2]) {
    const float16x8_t h = vreinterpretq_f16_u16(vld1q_u16(p));
    out[0] = vcvt_f32_f16(vget_low_f16(h));
    out[1] = vcvt_high_f32_f16(h);
}

/* Rows of half h of panel p that are rows of the matrix (the last panel may be partial). */
INLINE int rows_in(const vlm_matrix *m, int p, int h) { return vlm_min(8, m->rows - p * PANEL - 8 * h); }

INLINE float *rows_of(const vlm_matrix *m, const vlm_act *a, vlm_span sp, int h, int t) {
    return a->y + (size_t)(sp.t0 + t) * m->rows + sp.p * PANEL + 8 * h;
}

/* y of token t for the span's half panel (out[2]), or 0 on its first k slice. */
INLINE void start_rows(const vlm_matrix *m, const vlm_act *a, vlm_span sp, int h, int t, float32x4_t out[2]) {
    float v[8] = {0};
    if (sp.k0) memcpy(v, rows_of(m, a, sp, h, t), sizeof(float) * (size_t)rows_in(m, sp.p, h));
    out[0] = vld1q_f32(v);
    out[1] = vld1q_f32(v + 4);
}

INLINE void store_rows(const vlm_matrix *m, const vlm_act *a, vlm_span sp, int h, int t, const float32x4_t v[2]) {
    float out[8];
    vst1q_f32(out, v[0]);
    vst1q_f32(out + 4, v[1]);
    memcpy(rows_of(m, a, sp, h, t), out, sizeof(float) * (size_t)rows_in(m, sp.p, h));
}

/* The weights of one chunk for half a panel as signed bytes: two registers of 4 rows x 4
 * values each, for the low and the high nibbles (4-bit) or for this chunk and the next
 * (8-bit, value + 128 flipped back to the signed value: chunk j holds values 4j .. 4j + 3).
 * 4-bit values stay 0 .. 15; the symmetric offset -8 is the min term (d * -8 * sum(q x))
 * as in matmul_avx512.c, so it costs nothing per weight. IQ4_NL's nibbles are looked up in
 * its codebook (TBL): signed values, no min term. */
INLINE void chunk_weights(const unsigned char *qs, int i, const int fmt, int8x16_t *lo, int8x16_t *hi) {
    if (vlm_is_8bit(fmt)) {
        const uint8x16_t bias = vdupq_n_u8(0x80);
        *lo = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(qs + 16 * i), bias));
        *hi = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(qs + 64 + 16 * i), bias));
    } else {
        const uint8x16_t v = vld1q_u8(qs + 16 * i), lo4 = vandq_u8(v, vdupq_n_u8(0x0f)), hi4 = vshrq_n_u8(v, 4);
        if (fmt == FMT_IQ4) {
            const int8x16_t codebook = vld1q_s8(vlm_iq4nl_values);
            *lo = vqtbl1q_s8(codebook, lo4);
            *hi = vqtbl1q_s8(codebook, hi4);
        } else {
            *lo = vreinterpretq_s8_u8(lo4);
            *hi = vreinterpretq_s8_u8(hi4);
        }
    }
}

/* --- int8 activations, dot products ---------------------------------------------------
 * y = sum over groups of d * sum over runs (dx * isum) + min * s, with isum the integer
 * dot products of a run (exact); min is the asymmetric formats' min, -8d for symmetric 4-bit
 * and 0 for 8-bit symmetric and IQ4_NL. A run is 4 chunk steps: 4-bit chunk c is values 8c .. 8c + 7, 8-bit
 * chunks come in pairs (the same 8 values). */
INLINE void tile_int8(const vlm_matrix *m, const vlm_act *a, vlm_span sp, int h, const int T, const int fmt) {
    const int K = m->cols, G = m->group, NG = K / G, R = PARTS(G), NB = K / RUN, C = CHAINS(T);
    const int step = vlm_is_8bit(fmt) ? 128 : 64; /* bytes per 8 values */
    const unsigned char *panel = m->data + (size_t)sp.p * m->panel_bytes;
    const unsigned char *qs = panel + (size_t)sp.k0 / RUN * (vlm_is_8bit(fmt) ? 512 : 256) + 32 * h;
    const uint16_t *sc = (const uint16_t *)(panel + m->scales_off) + 8 * h;
    const uint16_t *mn = (const uint16_t *)(panel + m->mins_off) + 8 * h;
    /* this tile's activations (interleaved, see vlm_act): word j of token t is xq[j * TQ + t] */
    const int32_t *xq = (const int32_t *)a->q + (size_t)(sp.t0 / TQ) * (K / 4) * TQ;
    const float *xd = a->d + (size_t)(sp.t0 / TQ) * NB * TQ, *xs = a->s + (size_t)(sp.t0 / TQ) * NG * TQ;
    float32x4_t acc[TQ][2];
    UNROLL
    for (int t = 0; t < T; t++) start_rows(m, a, sp, h, t, acc[t]);
    for (int g = sp.k0 / G; g < sp.k1 / G; g++) {
        vlm_prefetch(sc + g * PANEL, sp.pf);
        if (vlm_has_mins(fmt)) vlm_prefetch(mn + g * PANEL, sp.pf);
        float32x4_t d[2];
        load_half8(sc + g * PANEL, d);
        for (int r = 0; r < R; r++) {
            const int b = g * G / RUN + r, w0 = g * G / 4 + r * 8; /* the run, its first word here */
            int32x4_t isum[CHAINS(1)][TQ][2];
            UNROLL
            for (int j = 0; j < C; j++)
                UNROLL
                for (int t = 0; t < T; t++) isum[j][t][0] = isum[j][t][1] = vdupq_n_s32(0);
            UNROLL
            for (int c = 0; c < 4; c++, qs += step) {
                if (8 * c == G) break; /* a group of 16 (8-bit) is half a run */
                vlm_prefetch(qs, sp.pf);
                if (vlm_is_8bit(fmt)) vlm_prefetch(qs + 64, sp.pf);
                int8x16_t lo[2], hi[2];
                UNROLL
                for (int i = 0; i < 2; i++) chunk_weights(qs, i, fmt, &lo[i], &hi[i]);
                /* words 2c and 2c + 1 of the tile's first 4 tokens (T <= 4) */
                const int32x4_t xlo = vld1q_s32(xq + (size_t)(w0 + 2 * c) * TQ);
                const int32x4_t xhi = vld1q_s32(xq + (size_t)(w0 + 2 * c + 1) * TQ);
                UNROLL
                for (int t = 0; t < T; t++)
                    UNROLL
                    for (int i = 0; i < 2; i++)
                        isum[c % C][t][i] = dot4_lane(dot4_lane(isum[c % C][t][i], lo[i], xlo, t), hi[i], xhi, t);
            }
            UNROLL
            for (int t = 0; t < T; t++) {
                const float dx = xd[b * TQ + t];
                UNROLL
                for (int i = 0; i < 2; i++) {
                    UNROLL
                    for (int j = 1; j < C; j++) isum[0][t][i] = vaddq_s32(isum[0][t][i], isum[j][t][i]);
                    acc[t][i] = vfmaq_f32(acc[t][i], vcvtq_f32_s32(isum[0][t][i]), vmulq_n_f32(d[i], dx));
                }
            }
        }
        if (vlm_has_mins(fmt) || fmt == FMT_Q4S) {
            float32x4_t mv[2];
            if (vlm_has_mins(fmt))
                load_half8(mn + g * PANEL, mv);
            else
                UNROLL
                for (int i = 0; i < 2; i++) mv[i] = vmulq_n_f32(d[i], -8.0f);
            UNROLL
            for (int t = 0; t < T; t++)
                UNROLL
                for (int i = 0; i < 2; i++) acc[t][i] = vfmaq_n_f32(acc[t][i], mv[i], xs[g * TQ + t]);
        }
    }
    UNROLL
    for (int t = 0; t < T; t++) store_rows(m, a, sp, h, t, acc[t]);
}

#if VLM_NEON_LEVEL >= 2
/* --- int8 activations, 8-bit matrix multiply (prefill) ---------------------------------
 * All TQ = 8 tokens of a tile (activations are padded to whole tiles; a padding token's
 * lanes hold garbage that never reaches y), so the weights' decode is shared by 4 token
 * pairs. Tile [rp][tp]: rows 2rp, 2rp + 1 by tokens 2tp, 2tp + 1, lanes (r0 t0, r0 t1, r1 t0,
 * r1 t1): 16 int accumulators in registers, the 16 float ones touched once per run. Per run
 * the scale is d of the row times dx of the token: [d0 d0 d1 d1] * [x0 x1 x0 x1]. */
#define PAIRS (TQ / 2)

/* 4 floats of 4 tokens as the [x0 x1 x0 x1] and [x2 x3 x2 x3] of two token pairs. */
INLINE void token_pairs(const float *p, float32x4_t out[2]) {
    const float32x4_t v = vld1q_f32(p);
    out[0] = vcombine_f32(vget_low_f32(v), vget_low_f32(v));
    out[1] = vcombine_f32(vget_high_f32(v), vget_high_f32(v));
}

/* 4 floats of 4 rows as the [d0 d0 d1 d1] and [d2 d2 d3 d3] of two row pairs. */
INLINE void row_pairs(float32x4_t v, float32x4_t out[2]) {
    out[0] = vzip1q_f32(v, v);
    out[1] = vzip2q_f32(v, v);
}

INLINE void tile_mmla(const vlm_matrix *m, const vlm_act *a, vlm_span sp, int h, int n, const int fmt) {
    const int K = m->cols, G = m->group, NG = K / G, R = PARTS(G), NB = K / RUN;
    const int step = vlm_is_8bit(fmt) ? 128 : 64;
    const unsigned char *panel = m->data + (size_t)sp.p * m->panel_bytes;
    const unsigned char *qs = panel + (size_t)sp.k0 / RUN * (vlm_is_8bit(fmt) ? 512 : 256) + 32 * h;
    const uint16_t *sc = (const uint16_t *)(panel + m->scales_off) + 8 * h;
    const uint16_t *mn = (const uint16_t *)(panel + m->mins_off) + 8 * h;
    const int32_t *xq = (const int32_t *)a->q + (size_t)(sp.t0 / TQ) * (K / 4) * TQ;
    const float *xd = a->d + (size_t)(sp.t0 / TQ) * NB * TQ, *xs = a->s + (size_t)(sp.t0 / TQ) * NG * TQ;
    float32x4_t acc[4][PAIRS];
    UNROLL
    for (int tp = 0; tp < PAIRS; tp++) {
        float32x4_t y0[2] = {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)}, y1[2] = {y0[0], y0[1]};
        if (2 * tp < n) start_rows(m, a, sp, h, 2 * tp, y0); /* rows 0-3, 4-7 of the pair's tokens */
        if (2 * tp + 1 < n) start_rows(m, a, sp, h, 2 * tp + 1, y1);
        UNROLL
        for (int i = 0; i < 2; i++) {
            acc[2 * i][tp] = vzip1q_f32(y0[i], y1[i]);
            acc[2 * i + 1][tp] = vzip2q_f32(y0[i], y1[i]);
        }
    }
    for (int g = sp.k0 / G; g < sp.k1 / G; g++) {
        vlm_prefetch(sc + g * PANEL, sp.pf);
        if (vlm_has_mins(fmt)) vlm_prefetch(mn + g * PANEL, sp.pf);
        float32x4_t d[2], d2[4];
        load_half8(sc + g * PANEL, d);
        UNROLL
        for (int i = 0; i < 2; i++) row_pairs(d[i], d2 + 2 * i);
        for (int r = 0; r < R; r++) {
            const int b = g * G / RUN + r, w0 = g * G / 4 + r * 8; /* the run, its first word here */
            int32x4_t isum[4][PAIRS];
            UNROLL
            for (int rp = 0; rp < 4; rp++)
                UNROLL
                for (int tp = 0; tp < PAIRS; tp++) isum[rp][tp] = vdupq_n_s32(0);
            UNROLL
            for (int c = 0; c < 4; c++, qs += step) {
                if (8 * c == G) break; /* a group of 16 (8-bit) is half a run */
                vlm_prefetch(qs, sp.pf);
                if (vlm_is_8bit(fmt)) vlm_prefetch(qs + 64, sp.pf);
                int8x16_t w[4]; /* row pairs: 2 rows x values 8c .. 8c + 7 */
                UNROLL
                for (int i = 0; i < 2; i++) {
                    int8x16_t lo, hi;
                    chunk_weights(qs, i, fmt, &lo, &hi);
                    const int32x4_t l = vreinterpretq_s32_s8(lo), u = vreinterpretq_s32_s8(hi);
                    w[2 * i] = vreinterpretq_s8_s32(vzip1q_s32(l, u));
                    w[2 * i + 1] = vreinterpretq_s8_s32(vzip2q_s32(l, u));
                }
                const int32_t *xw = xq + (size_t)(w0 + 2 * c) * TQ; /* words 2c, 2c + 1 of the tokens */
                UNROLL
                for (int q = 0; q < TQ / 4; q++) {
                    const int32x4_t xl = vld1q_s32(xw + 4 * q), xh = vld1q_s32(xw + TQ + 4 * q);
                    const int8x16_t x[2] = {vreinterpretq_s8_s32(vzip1q_s32(xl, xh)),
                                            vreinterpretq_s8_s32(vzip2q_s32(xl, xh))};
                    UNROLL
                    for (int rp = 0; rp < 4; rp++)
                        UNROLL
                        for (int j = 0; j < 2; j++) isum[rp][2 * q + j] = vmmlaq_s32(isum[rp][2 * q + j], w[rp], x[j]);
                }
            }
            float32x4_t dx2[PAIRS];
            UNROLL
            for (int q = 0; q < TQ / 4; q++) token_pairs(xd + (size_t)b * TQ + 4 * q, dx2 + 2 * q);
            UNROLL
            for (int rp = 0; rp < 4; rp++)
                UNROLL
                for (int tp = 0; tp < PAIRS; tp++)
                    acc[rp][tp] = vfmaq_f32(acc[rp][tp], vcvtq_f32_s32(isum[rp][tp]), vmulq_f32(d2[rp], dx2[tp]));
        }
        if (vlm_has_mins(fmt) || fmt == FMT_Q4S) {
            float32x4_t mv[2], m2[4], s2[PAIRS];
            if (vlm_has_mins(fmt))
                load_half8(mn + g * PANEL, mv);
            else
                UNROLL
                for (int i = 0; i < 2; i++) mv[i] = vmulq_n_f32(d[i], -8.0f);
            UNROLL
            for (int i = 0; i < 2; i++) row_pairs(mv[i], m2 + 2 * i);
            UNROLL
            for (int q = 0; q < TQ / 4; q++) token_pairs(xs + (size_t)g * TQ + 4 * q, s2 + 2 * q);
            UNROLL
            for (int rp = 0; rp < 4; rp++)
                UNROLL
                for (int tp = 0; tp < PAIRS; tp++) acc[rp][tp] = vfmaq_f32(acc[rp][tp], m2[rp], s2[tp]);
        }
    }
    for (int tp = 0; tp < PAIRS && 2 * tp < n; tp++) {
        float32x4_t y0[2], y1[2];
        UNROLL
        for (int i = 0; i < 2; i++) {
            y0[i] = vuzp1q_f32(acc[2 * i][tp], acc[2 * i + 1][tp]);
            y1[i] = vuzp2q_f32(acc[2 * i][tp], acc[2 * i + 1][tp]);
        }
        store_rows(m, a, sp, h, 2 * tp, y0);
        if (2 * tp + 1 < n) store_rows(m, a, sp, h, 2 * tp + 1, y1);
    }
}
#endif

/* --- float activations, quantized weights ----------------------------------------------
 * A value is shifted to the top of its lane and back: 4-bit q at bit 4n is (v << (28 - 4n))
 * >> 28, symmetric q - 8 the same with an arithmetic shift after flipping bit 3 of every
 * nibble (q ^ 8 read as a signed nibble is q - 8); 8-bit byte i, bias flipped, likewise.
 * IQ4_NL: the nibbles looked up in the codebook as in chunk_weights, then read as bytes. */
INLINE float32x4_t field(uint32x4_t v, const int shift, const int bits, const int sign) {
    const uint32x4_t top = vshlq_u32(v, vdupq_n_s32(32 - bits - shift));
    if (sign) return vcvtq_f32_s32(vshlq_s32(vreinterpretq_s32_u32(top), vdupq_n_s32(bits - 32)));
    return vcvtq_f32_u32(vshlq_u32(top, vdupq_n_s32(bits - 32)));
}

INLINE void tile_float_quant(const vlm_matrix *m, const vlm_act *a, vlm_span sp, int h, const int T, const int C,
                             const int fmt) {
    const int K = m->cols, G = m->group, NG = K / G, R = PARTS(G);
    const unsigned char *panel = m->data + (size_t)sp.p * m->panel_bytes;
    const unsigned char *qs = panel + (size_t)sp.k0 / RUN * (vlm_is_8bit(fmt) ? 512 : 256) + 32 * h;
    const uint16_t *sc = (const uint16_t *)(panel + m->scales_off) + 8 * h;
    const uint16_t *mn = (const uint16_t *)(panel + m->mins_off) + 8 * h;
    const uint32x4_t flip = vdupq_n_u32(vlm_is_8bit(fmt) ? 0x80808080u : 0x88888888u);
    /* this tile's activations (interleaved, see vlm_act): value k of token t is x[k * TF + t] */
    const size_t lane = (size_t)sp.t0 % TF; /* a solo tile (gemm_float) may start mid-tile */
    const float *x = a->x + (size_t)(sp.t0 / TF) * K * TF + lane, *xs = a->xs + (size_t)(sp.t0 / TF) * NG * TF + lane;
    float32x4_t acc[TF][2];
    UNROLL
    for (int t = 0; t < T; t++) start_rows(m, a, sp, h, t, acc[t]);
    for (int g = sp.k0 / G; g < sp.k1 / G; g++) {
        vlm_prefetch(sc + g * PANEL, sp.pf);
        if (vlm_has_mins(fmt)) vlm_prefetch(mn + g * PANEL, sp.pf);
        float32x4_t gs[CHAINS(1)][TF][2];
        UNROLL
        for (int j = 0; j < C; j++)
            UNROLL
            for (int t = 0; t < T; t++) gs[j][t][0] = gs[j][t][1] = vdupq_n_f32(0.0f);
        for (int r = 0; r < R; r++) {
            const int k0 = g * G + r * RUN;
            if (vlm_is_8bit(fmt)) {
                UNROLL
                for (int j = 0; j < 8; j++, qs += 64) {
                    if (4 * j == G) break; /* a group of 16 is half a run */
                    vlm_prefetch(qs, sp.pf);
                    uint32x4_t v[2];
                    UNROLL
                    for (int i = 0; i < 2; i++) v[i] = veorq_u32(vld1q_u32((const uint32_t *)(qs + 16 * i)), flip);
                    UNROLL
                    for (int e = 0; e < 4; e++) {
                        const float32x4_t w[2] = {field(v[0], 8 * e, 8, 1), field(v[1], 8 * e, 8, 1)};
                        UNROLL
                        for (int t = 0; t < T; t++) {
                            const float xv = x[(size_t)(k0 + 4 * j + e) * TF + t];
                            UNROLL
                            for (int i = 0; i < 2; i++) gs[j % C][t][i] = vfmaq_n_f32(gs[j % C][t][i], w[i], xv);
                        }
                    }
                }
            } else {
                UNROLL
                for (int c = 0; c < 4; c++, qs += 64) {
                    vlm_prefetch(qs, sp.pf);
                    uint32x4_t v[2], lo[2], hi[2]; /* IQ4: the values of the low and the high nibbles */
                    UNROLL
                    for (int i = 0; i < 2; i++) {
                        v[i] = vld1q_u32((const uint32_t *)(qs + 16 * i));
                        if (fmt == FMT_Q4S) v[i] = veorq_u32(v[i], flip);
                        if (fmt == FMT_IQ4) {
                            int8x16_t l, u;
                            chunk_weights(qs, i, fmt, &l, &u);
                            lo[i] = vreinterpretq_u32_s8(l);
                            hi[i] = vreinterpretq_u32_s8(u);
                        }
                    }
                    UNROLL
                    for (int e = 0; e < 8; e++) {
                        const int sign = fmt == FMT_Q4S;
                        float32x4_t w[2];
                        UNROLL
                        for (int i = 0; i < 2; i++)
                            w[i] = fmt == FMT_IQ4 ? field(e & 1 ? hi[i] : lo[i], 8 * (e / 2), 8, 1)
                                                  : field(v[i], 4 * e, 4, sign);
                        const int k = k0 + 8 * c + (e & 1) * 4 + e / 2;
                        UNROLL
                        for (int t = 0; t < T; t++)
                            UNROLL
                            for (int i = 0; i < 2; i++)
                                gs[c % C][t][i] = vfmaq_n_f32(gs[c % C][t][i], w[i], x[(size_t)k * TF + t]);
                    }
                }
            }
        }
        float32x4_t d[2], mv[2];
        load_half8(sc + g * PANEL, d);
        if (vlm_has_mins(fmt)) load_half8(mn + g * PANEL, mv);
        UNROLL
        for (int t = 0; t < T; t++) {
            UNROLL
            for (int i = 0; i < 2; i++) {
                UNROLL
                for (int j = 1; j < C; j++) gs[0][t][i] = vaddq_f32(gs[0][t][i], gs[j][t][i]);
                acc[t][i] = vfmaq_f32(acc[t][i], d[i], gs[0][t][i]);
                if (vlm_has_mins(fmt)) acc[t][i] = vfmaq_n_f32(acc[t][i], mv[i], xs[g * TF + t]);
            }
        }
    }
    UNROLL
    for (int t = 0; t < T; t++) store_rows(m, a, sp, h, t, acc[t]);
}

/* --- float activations, 16-bit float weights ------------------------------------------ */
INLINE void load_column(const uint16_t *panel, int k, int h, const int fmt, float32x4_t w[2]) {
    const uint16x8_t v = vld1q_u16(panel + (size_t)k * PANEL + 8 * h);
    if (fmt == FMT_F16) {
        w[0] = vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(v)));
        w[1] = vcvt_high_f32_f16(vreinterpretq_f16_u16(v));
    } else { /* bf16: the high half of a float */
        w[0] = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(v), 16));
        w[1] = vreinterpretq_f32_u32(vshll_high_n_u16(v, 16));
    }
}

/* Columns per step (2 cache lines), at least the most chains a tile uses. */
#define HALF_STEP 4

INLINE void tile_half(const vlm_matrix *m, const vlm_act *a, vlm_span sp, int h, const int T, const int C,
                      const int fmt) {
    const uint16_t *panel = (const uint16_t *)(m->data + (size_t)sp.p * m->panel_bytes);
    /* value k of token t: x[k * TF + t]; a solo tile (gemm_float) may start mid-tile */
    const float *x = a->x + (size_t)(sp.t0 / TF) * m->cols * TF + sp.t0 % TF;
    float32x4_t acc[CHAINS(1)][TF][2];
    UNROLL
    for (int t = 0; t < T; t++) {
        start_rows(m, a, sp, h, t, acc[0][t]);
        UNROLL
        for (int j = 1; j < C; j++) acc[j][t][0] = acc[j][t][1] = vdupq_n_f32(0.0f);
    }
    int k = sp.k0;
    for (; k + HALF_STEP <= sp.k1; k += HALF_STEP) {
        vlm_prefetch(panel + (size_t)k * PANEL, sp.pf);
        vlm_prefetch(panel + (size_t)(k + 2) * PANEL, sp.pf);
        UNROLL
        for (int s = 0; s < HALF_STEP; s++) {
            float32x4_t w[2];
            load_column(panel, k + s, h, fmt, w);
            UNROLL
            for (int t = 0; t < T; t++)
                UNROLL
                for (int i = 0; i < 2; i++)
                    acc[s % C][t][i] = vfmaq_n_f32(acc[s % C][t][i], w[i], x[(size_t)(k + s) * TF + t]);
        }
    }
    for (; k < sp.k1; k++) { /* the last columns */
        float32x4_t w[2];
        load_column(panel, k, h, fmt, w);
        UNROLL
        for (int t = 0; t < T; t++)
            UNROLL
            for (int i = 0; i < 2; i++) acc[0][t][i] = vfmaq_n_f32(acc[0][t][i], w[i], x[(size_t)k * TF + t]);
    }
    UNROLL
    for (int t = 0; t < T; t++) {
        UNROLL
        for (int j = 1; j < C; j++)
            UNROLL
            for (int i = 0; i < 2; i++) acc[0][t][i] = vaddq_f32(acc[0][t][i], acc[j][t][i]);
        store_rows(m, a, sp, h, t, acc[0][t]);
    }
}

/* Instantiate a tile for every (format, T), as in matmul_avx2.c (T <= 4). */
#define CASE_T(tile, fmt, T)       \
    case T:                        \
        tile(m, a, sp, h, T, fmt); \
        break;
#define SWITCH_T(tile, fmt, n) \
    switch (n) { CASE_T(tile, fmt, 1) CASE_T(tile, fmt, 2) CASE_T(tile, fmt, 3) default : tile(m, a, sp, h, 4, fmt); }
/* Float tiles take their chain count too: CHAINS(T), or CHAINS(1) at every width of a solo
 * tile (see VLM_SOLO_TOKENS and gemm_float). */
#define CASE_TC(tile, fmt, T, C)      \
    case T:                           \
        tile(m, a, sp, h, T, C, fmt); \
        break;
#define SWITCH_TF(tile, fmt, n)                                                                         \
    switch (n) {                                                                                        \
        CASE_TC(tile, fmt, 1, CHAINS(1)) CASE_TC(tile, fmt, 2, CHAINS(2)) CASE_TC(tile, fmt, 3, CHAINS(3)) \
        default : tile(m, a, sp, h, 4, CHAINS(4), fmt);                                                 \
    }
#define SOLO_WIDTH 2 /* tokens of a solo tile: their CHAINS(1) accumulators fit the 32 registers; divides TF */
#define SWITCH_SOLO(tile, fmt, n) \
    switch (n) { CASE_TC(tile, fmt, 1, CHAINS(1)) default : tile(m, a, sp, h, 2, CHAINS(1), fmt); }
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

/* An int8 tile of n tokens: SMMLA for two or more where the CPU has it, else dot products. */
#if VLM_NEON_LEVEL >= 2
#define INT8_TILE(fmt, n)                   \
    if (n > 1)                              \
        tile_mmla(m, a, sp, h, n, fmt);     \
    else                                    \
        tile_int8(m, a, sp, h, 1, fmt);
#else
#define INT8_TILE(fmt, n) SWITCH_T(tile_int8, fmt, n)
#endif

#include "matmul_halfpanel.h"

/* Same operations as vlm_quantize_row_portable, 32 values at a time: FCVTNS rounds to
 * nearest even, as nearbyintf does in the default rounding mode. */
TARGET static void quantize_row(const float *x, int cols, int group, int8_t *q, float *d, float *s, int32_t *c,
                                     int w) {
    for (int b = 0; b < cols / RUN; b++) {
        float32x4_t v[8];
        float32x4_t mx = vdupq_n_f32(0.0f);
        for (int i = 0; i < 8; i++) {
            v[i] = vld1q_f32(x + b * RUN + 4 * i);
            mx = vmaxq_f32(mx, vabsq_f32(v[i]));
        }
        const float amax = vmaxvq_f32(mx);
        const float db = amax / 127.0f;
        const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32x4_t sum[2] = {vdupq_n_s32(0), vdupq_n_s32(0)}; /* of each half */
        int8_t bytes[RUN];
        for (int i = 0; i < 8; i += 2) {
            const int32x4_t q0 = vcvtnq_s32_f32(vmulq_n_f32(v[i], id)), q1 = vcvtnq_s32_f32(vmulq_n_f32(v[i + 1], id));
            sum[i / 4] = vaddq_s32(sum[i / 4], vaddq_s32(q0, q1));
            vst1_s8(bytes + 4 * i, vqmovn_s16(vcombine_s16(vqmovn_s32(q0), vqmovn_s32(q1))));
        }
        for (int j = 0; j < RUN / 4; j++) memcpy(q + ((size_t)b * RUN / 4 + j) * 4 * w, bytes + 4 * j, 4);
        d[(size_t)b * w] = db;
        vlm_group_sum(s, c, b, group, w, db, vaddvq_s32(sum[0]), vaddvq_s32(sum[1]));
    }
}

const vlm_path PATH = {PATH_NAME, TQ, TF, gemm_int8, gemm_float, quantize_row, &vlm_ops_neon};

#if VLM_NEON_LEVEL == 0
#if defined(__linux__)
#include <sys/auxv.h>
#endif
/* Feature bits of the Linux auxiliary vector (asm/hwcap.h), spelled out for old headers. */
#define ARM_HWCAP_ASIMD (1ul << 1)
#define ARM_HWCAP_ASIMDDP (1ul << 20)
#define ARM_HWCAP2_I8MM (1ul << 13)

const vlm_path *vlm_arm_path(const char *name) {
#if defined(__linux__)
    const unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
#else /* elsewhere only the baseline is assumed */
    const unsigned long hw = ARM_HWCAP_ASIMD, hw2 = 0;
#endif
    const int asimd = (hw & ARM_HWCAP_ASIMD) != 0, dot = asimd && (hw & ARM_HWCAP_ASIMDDP);
    if (!strcmp(name, "neon") && asimd) return &vlm_path_neon;
#ifdef VLM_ARM_DOTPROD
    if (!strcmp(name, "dotprod") && dot) return &vlm_path_dotprod;
#endif
#ifdef VLM_ARM_I8MM
    if (!strcmp(name, "i8mm") && dot && (hw2 & ARM_HWCAP2_I8MM)) return &vlm_path_i8mm;
#endif
    (void)hw2;
    return NULL;
}
#endif

#endif

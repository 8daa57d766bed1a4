/* The GEMM drivers of the paths whose tiles cover half a panel (8 rows): AVX2 (and AVX-VNNI)
 * and NEON. Each walks its share of panels, the two 8-row halves of a panel, k slices and token
 * tiles, and calls the tiles of the including file, which defines first: TARGET, TQ and TF (the
 * int8 and float tile widths), SOLO_WIDTH, INT8_TILE(fmt, n), SWITCH_TF, SWITCH_SOLO and
 * FLOAT_TILES. */
/* Columns per k slice, as in matmul_avx512.c. */
#define K_SLICE_INT8 1024
#define K_SLICE_FLOAT 512

TARGET static void gemm_int8(const vlm_matrix *m, const vlm_act *a, int p0, int p1) {
    const int ahead = vlm_prefetch_start(m, p0, p1);
    const int slice = a->n <= TQ ? m->cols : K_SLICE_INT8;
    for (int p = p0; p < p1; p++) {
        for (int h = 0; h < 2 && p * PANEL + 8 * h < m->rows; h++) {
            for (int k0 = 0; k0 < m->cols; k0 += slice) {
                for (int t0 = 0; t0 < a->n; t0 += TQ) {
                    const int n = vlm_min(TQ, a->n - t0);
                    /* the h = 0 pass streams the panel in; h = 1 finds it in cache */
                    const size_t pf = h ? 0 : vlm_prefetch_offset(m, p, p1, ahead, t0);
                    const vlm_span sp = {p, t0, k0, vlm_min(m->cols, k0 + slice), pf};
                    switch (m->fmt) {
                    case FMT_Q4A: INT8_TILE(FMT_Q4A, n) break;
                    case FMT_Q4S: INT8_TILE(FMT_Q4S, n) break;
                    case FMT_IQ4: INT8_TILE(FMT_IQ4, n) break;
                    case FMT_Q8: INT8_TILE(FMT_Q8, n) break;
                    default: INT8_TILE(FMT_Q8A, n) break;
                    }
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
        for (int h = 0; h < 2 && p * PANEL + 8 * h < m->rows; h++) {
            for (int k0 = 0; k0 < m->cols; k0 += slice) {
                for (int t0 = 0; t0 < a->n; t0 += width) {
                    const int n = vlm_min(width, a->n - t0);
                    const size_t pf = h ? 0 : vlm_prefetch_offset(m, p, p1, ahead, t0);
                    const vlm_span sp = {p, t0, k0, vlm_min(m->cols, k0 + slice), pf};
                    if (solo)
                        FLOAT_TILES(SWITCH_SOLO)
                    else
                        FLOAT_TILES(SWITCH_TF)
                }
            }
        }
    }
}

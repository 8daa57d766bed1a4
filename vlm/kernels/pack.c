/* Repacking from the Python-side formats (vlm/quant.py) into the panel layout of kernels.h.
 * Runs once per weight at load, so it is plain C. */
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#define ALIGN 64

static size_t round_up(size_t v) { return (v + ALIGN - 1) & ~(size_t)(ALIGN - 1); }

static int alloc_panels(vlm_matrix *m) {
    void *p = NULL;
    const size_t total = (size_t)m->panels * m->panel_bytes;
    if (posix_memalign(&p, ALIGN, total ? total : ALIGN)) return -1;
    memset(p, 0, total); /* rows past the end of the matrix stay zero */
    m->data = p;
    return 0;
}

static void copy_scales(unsigned char *dst, const uint16_t *src, int rows, int row0, int ng) {
    uint16_t *out = (uint16_t *)dst;
    for (int r = 0; r < PANEL && row0 + r < rows; r++)
        for (int g = 0; g < ng; g++) out[g * PANEL + r] = src[(size_t)(row0 + r) * ng + g];
}

/* qw: uint8 [rows][cols / 2] in GGUF nibble order (byte j of a 32-value run holds value j
 * low and value j + 16 high). */
int vlm_pack_q4(vlm_matrix *m, const uint8_t *qw, const uint16_t *scales, const uint16_t *mins, int rows,
                int cols, int group, int symmetric) {
    const int ng = cols / group, nb = cols / RUN;
    m->fmt = symmetric ? FMT_Q4S : FMT_Q4A;
    m->rows = rows;
    m->cols = cols;
    m->group = group;
    m->panels = (rows + PANEL - 1) / PANEL;
    m->scales_off = (size_t)nb * 256;
    m->mins_off = m->scales_off + round_up((size_t)ng * PANEL * 2);
    m->panel_bytes = symmetric ? m->mins_off : m->mins_off + round_up((size_t)ng * PANEL * 2);
    if (alloc_panels(m)) return -1;
    for (int p = 0; p < m->panels; p++) {
        unsigned char *panel = m->data + (size_t)p * m->panel_bytes;
        for (int r = 0; r < PANEL && p * PANEL + r < rows; r++) {
            const uint8_t *src = qw + (size_t)(p * PANEL + r) * (cols / 2);
            for (int b = 0; b < nb; b++) {
                const uint8_t *in = src + b * 16;
                unsigned char *run = panel + (size_t)b * 256;
                for (int c = 0; c < 4; c++) {
                    for (int i = 0; i < 4; i++) {
                        const int v0 = 8 * c + i, v1 = 8 * c + 4 + i; /* both < 32 */
                        const int lo = v0 < 16 ? in[v0] & 0x0f : in[v0 - 16] >> 4;
                        const int hi = v1 < 16 ? in[v1] & 0x0f : in[v1 - 16] >> 4;
                        run[c * 64 + r * 4 + i] = (unsigned char)(lo | hi << 4);
                    }
                }
            }
        }
        copy_scales(panel + m->scales_off, scales, rows, p * PANEL, ng);
        if (!symmetric) copy_scales(panel + m->mins_off, mins, rows, p * PANEL, ng);
    }
    return 0;
}

/* qw: int8 [rows][cols]; stored as value + 128 so it is vpdpbusd's unsigned operand. */
int vlm_pack_q8(vlm_matrix *m, const int8_t *qw, const uint16_t *scales, int rows, int cols, int group) {
    const int ng = cols / group, nb = cols / RUN;
    m->fmt = FMT_Q8;
    m->rows = rows;
    m->cols = cols;
    m->group = group;
    m->panels = (rows + PANEL - 1) / PANEL;
    m->scales_off = (size_t)nb * 512;
    m->mins_off = m->scales_off;
    m->panel_bytes = m->scales_off + round_up((size_t)ng * PANEL * 2);
    if (alloc_panels(m)) return -1;
    for (int p = 0; p < m->panels; p++) {
        unsigned char *panel = m->data + (size_t)p * m->panel_bytes;
        for (int r = 0; r < PANEL && p * PANEL + r < rows; r++) {
            const int8_t *src = qw + (size_t)(p * PANEL + r) * cols;
            for (int k = 0; k < cols; k++)
                panel[(size_t)(k / RUN) * 512 + (k % RUN / 4) * 64 + r * 4 + k % 4] =
                    (unsigned char)(src[k] + 128);
        }
        copy_scales(panel + m->scales_off, scales, rows, p * PANEL, ng);
    }
    return 0;
}

/* data: [rows][cols] of 16-bit floats (FMT_F16, FMT_BF16). */
int vlm_pack_half(vlm_matrix *m, const uint16_t *data, int fmt, int rows, int cols) {
    m->fmt = fmt;
    m->rows = rows;
    m->cols = cols;
    m->group = 0;
    m->panels = (rows + PANEL - 1) / PANEL;
    m->scales_off = m->mins_off = 0;
    m->panel_bytes = round_up((size_t)cols * PANEL * 2);
    if (alloc_panels(m)) return -1;
    for (int p = 0; p < m->panels; p++) {
        uint16_t *panel = (uint16_t *)(m->data + (size_t)p * m->panel_bytes);
        for (int r = 0; r < PANEL && p * PANEL + r < rows; r++) {
            const uint16_t *src = data + (size_t)(p * PANEL + r) * cols;
            for (int k = 0; k < cols; k++) panel[(size_t)k * PANEL + r] = src[k];
        }
    }
    return 0;
}

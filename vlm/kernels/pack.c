/* Repacking from the Python-side formats (vlm/quant.py) into the panel layout of kernels.h,
 * and reading rows back out of it. Runs once per weight at load (and once per looked-up
 * embedding row), so it is plain C. */
#include <stdlib.h>
#include <string.h>
#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#include <unistd.h>
#define CAN_DROP_PAGES 1
#endif

#include "kernels.h"

#define ALIGN 64
#define DROP_EVERY 64 /* panels repacked between two page drops */

/* The sources of one repack and how many of their rows were dropped. */
typedef struct {
    vlm_strided src[3];
    int dropped;
} sources;

/* The resident pages wholly inside [begin, begin + n) of a read-only file map are dropped:
 * they were read once, to repack, and would otherwise stay resident beside the packed copy
 * until the load ends; for a tied 150k-token embedding that is a second copy of 230 MB.
 * They are clean file pages, so a later read faults them back in. */
static void drop_pages(const void *begin, size_t n) {
#ifdef CAN_DROP_PAGES
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    const uintptr_t lo = ((uintptr_t)begin + page - 1) & ~(page - 1), hi = ((uintptr_t)begin + n) & ~(page - 1);
    if (hi > lo) madvise((void *)lo, hi - lo, MADV_DONTNEED);
#else
    (void)begin;
    (void)n;
#endif
}

/* Called after panel p: every DROP_EVERY panels, drop the source rows repacked since the last drop. */
static void consumed(sources *s, int drop, int p, int rows) {
    if (!drop || (p + 1) % DROP_EVERY) return;
    const int done = vlm_min((p + 1) * PANEL, rows);
    for (int i = 0; i < 3; i++)
        if (s->src[i].base)
            drop_pages(s->src[i].base + (size_t)s->dropped * s->src[i].row,
                       (size_t)(done - s->dropped) * s->src[i].row);
    s->dropped = done;
}

static size_t round_up(size_t v) { return (v + ALIGN - 1) & ~(size_t)(ALIGN - 1); }

static int alloc_panels(vlm_matrix *m) {
    void *p = NULL;
    const size_t total = (size_t)m->panels * m->panel_bytes;
    if (posix_memalign(&p, ALIGN, total ? total : ALIGN)) return -1;
    memset(p, 0, total); /* rows past the end of the matrix stay zero */
    m->data = p;
    return 0;
}

static void copy_scales(unsigned char *dst, vlm_strided src, int rows, int row0, int ng) {
    uint16_t *out = (uint16_t *)dst;
    for (int r = 0; r < PANEL && row0 + r < rows; r++)
        for (int g = 0; g < ng; g++)
            memcpy(out + g * PANEL + r, src.base + (row0 + r) * src.row + g * src.step, 2); /* maybe unaligned */
}

int vlm_pack_q4(vlm_matrix *m, vlm_strided quants, vlm_strided scales, vlm_strided mins, int rows, int cols,
                int group, int fmt, int drop_source) {
    const int ng = cols / group, nb = cols / RUN, symmetric = fmt != FMT_Q4A;
    sources src = {{quants, scales, symmetric ? (vlm_strided){NULL, 0, 0} : mins}, 0};
    m->fmt = fmt;
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
            for (int b = 0; b < nb; b++) {
                /* byte j of a run holds value j low and value j + 16 high */
                const unsigned char *in = quants.base + (p * PANEL + r) * quants.row + b * quants.step;
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
        consumed(&src, drop_source, p, rows);
    }
    return 0;
}

/* 8-bit values are stored as value + 128 so they are vpdpbusd's unsigned operand. */
int vlm_pack_q8(vlm_matrix *m, vlm_strided quants, vlm_strided scales, vlm_strided mins, int rows, int cols,
                int group, int drop_source) {
    const int ng = cols / group, nb = cols / RUN;
    sources src = {{quants, scales, mins}, 0};
    m->fmt = mins.base ? FMT_Q8A : FMT_Q8;
    m->rows = rows;
    m->cols = cols;
    m->group = group;
    m->panels = (rows + PANEL - 1) / PANEL;
    m->scales_off = (size_t)nb * 512;
    m->mins_off = m->scales_off + round_up((size_t)ng * PANEL * 2);
    m->panel_bytes = mins.base ? m->mins_off + round_up((size_t)ng * PANEL * 2) : m->mins_off;
    if (alloc_panels(m)) return -1;
    for (int p = 0; p < m->panels; p++) {
        unsigned char *panel = m->data + (size_t)p * m->panel_bytes;
        for (int r = 0; r < PANEL && p * PANEL + r < rows; r++) {
            for (int b = 0; b < nb; b++) {
                const int8_t *in = (const int8_t *)(quants.base + (p * PANEL + r) * quants.row + b * quants.step);
                for (int k = 0; k < RUN; k++)
                    panel[(size_t)b * 512 + (k / 4) * 64 + r * 4 + k % 4] = (unsigned char)(in[k] + 128);
            }
        }
        copy_scales(panel + m->scales_off, scales, rows, p * PANEL, ng);
        if (mins.base) copy_scales(panel + m->mins_off, mins, rows, p * PANEL, ng);
        consumed(&src, drop_source, p, rows);
    }
    return 0;
}

/* data: [rows][cols] of 16-bit floats (FMT_F16, FMT_BF16). */
int vlm_pack_half(vlm_matrix *m, const uint16_t *data, int fmt, int rows, int cols, int drop_source) {
    sources src = {{{(const unsigned char *)data, (ptrdiff_t)cols * 2, 2}}, 0};
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
        consumed(&src, drop_source, p, rows);
    }
    return 0;
}

/* GCC contracts a * b + c across statements by default; the reference rounds the product
 * and the sum separately, so this function must not. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
void vlm_unpack_row(const vlm_matrix *m, int row, float *out) {
    const unsigned char *panel = m->data + (size_t)(row / PANEL) * m->panel_bytes;
    const int r = row % PANEL;
    if (!vlm_is_quant(m->fmt)) {
        const uint16_t *v = (const uint16_t *)panel;
        for (int k = 0; k < m->cols; k++)
            out[k] = m->fmt == FMT_F16 ? vlm_half_to_float(v[(size_t)k * PANEL + r])
                                       : vlm_bf16_to_float(v[(size_t)k * PANEL + r]);
        return;
    }
    const uint16_t *scales = (const uint16_t *)(panel + m->scales_off);
    const uint16_t *mins = (const uint16_t *)(panel + m->mins_off);
    for (int k = 0; k < m->cols; k++) {
        const int g = k / m->group, v = k % RUN;
        const float d = vlm_half_to_float(scales[g * PANEL + r]);
        if (vlm_is_8bit(m->fmt)) {
            const unsigned char *run = panel + (size_t)(k / RUN) * 512;
            const float w = (float)((int)run[(v / 4) * 64 + r * 4 + v % 4] - 128) * d;
            out[k] = m->fmt == FMT_Q8A ? w + vlm_half_to_float(mins[g * PANEL + r]) : w;
            continue;
        }
        /* value v of a run: chunk v / 8, byte v % 4, high nibble for the second 4 of each 8 */
        const unsigned char byte = panel[(size_t)(k / RUN) * 256 + (v / 8) * 64 + r * 4 + v % 4];
        const int q4 = v % 8 < 4 ? byte & 0x0f : byte >> 4;
        const float q = (float)q4;
        if (m->fmt == FMT_IQ4) {
            out[k] = (float)vlm_iq4nl_values[q4] * d;
        } else if (m->fmt == FMT_Q4S) {
            out[k] = (q - 8.0f) * d;
        } else {
            const float w = q * d;
            out[k] = w + vlm_half_to_float(mins[g * PANEL + r]);
        }
    }
}

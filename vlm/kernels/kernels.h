/* Shared definitions of the native kernels: the packed matrix layout, the per-call
 * activation bundle and the table of kernels each instruction-set path provides.
 *
 * Packed layout. Rows are cut into panels of PANEL (16) rows; a missing tail row is zero.
 * Inside a panel, one lane of a 16 x 32-bit vector belongs to one row, so a kernel
 * broadcasts an activation value (or 4 int8 activations) and multiply-accumulates 16 rows
 * at once; no horizontal reduction is ever needed and y for 16 rows is one store.
 *
 * Quantized panel (cols K, group G, NG = K / G groups, K / 32 runs of 32 values):
 *   quants: per run, 4-bit: 4 chunks of 64 bytes. Chunk c holds one 32-bit word per
 *           row; byte i of the word carries value 8c + i in its low nibble and value
 *           8c + 4 + i in its high nibble, so `word & 0x0f0f0f0f` and
 *           `(word >> 4) & 0x0f0f0f0f` are 4 consecutive values each (the unit of
 *           vpdpbusd / pmaddubsw) and the nibble at bit 4p is value 8c + (p & 1) * 4 + p / 2.
 *           4-bit codebook (IQ4_NL): the same, the nibble an index into vlm_iq4nl_values.
 *           8-bit: 8 chunks of 64 bytes; chunk j holds values 4j .. 4j + 3 of each row,
 *           stored as q + 128 (unsigned) so vpdpbusd can take them as its unsigned operand.
 *   scales: fp16 [NG][16]; mins (asymmetric formats only): fp16 [NG][16]. Kept in fp16
 *           because decode is bound by memory traffic and F16C widens 16 of them in one op.
 * Each part starts 64-byte aligned.
 *
 * Half panel (f16, bf16): values [K][16], i.e. column k of the panel's 16 rows is one
 * vector.
 */
#ifndef VLM_KERNELS_H
#define VLM_KERNELS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#define PANEL 16
#define RUN 32 /* values per nibble-packing run and per activation-quantization block */

enum vlm_format {
    FMT_Q4A,  /* 4-bit asymmetric: w = d * q + m */
    FMT_Q4S,  /* 4-bit symmetric:  w = d * (q - 8) */
    FMT_IQ4,  /* 4-bit codebook:   w = d * vlm_iq4nl_values[q] (GGUF IQ4_NL) */
    FMT_Q8,   /* 8-bit symmetric:  w = d * q */
    FMT_Q8A,  /* 8-bit asymmetric: w = d * q + m (GGUF Q5_1 and Q5_K: q = 0..31) */
    FMT_F16,
    FMT_BF16,
    FMT_COUNT
};

typedef struct {
    int fmt;
    int rows, cols;
    int group;          /* values per scale (quantized formats), else 0 */
    int panels;         /* ceil(rows / PANEL) */
    size_t panel_bytes; /* stride between panels */
    size_t scales_off;  /* offset of the scales inside a panel (quantized formats) */
    size_t mins_off;    /* offset of the mins inside a panel (asymmetric formats) */
    int int8_acts;      /* 8-bit weights: int8 activations in W4A8 mode too (vision towers opt in) */
    unsigned char *data;
} vlm_matrix;

static inline int vlm_is_quant(int fmt) { return fmt <= FMT_Q8A; }
/* The 8-bit quants layout (else 4-bit). */
static inline int vlm_is_8bit(int fmt) { return fmt == FMT_Q8 || fmt == FMT_Q8A; }
/* A min per group: w = d * q + m. */
static inline int vlm_has_mins(int fmt) { return fmt == FMT_Q4A || fmt == FMT_Q8A; }

/* llama.cpp's kvalues_iq4nl: the int8 values of IQ4_NL's 16 indices (matmul_portable.c). */
extern const int8_t vlm_iq4nl_values[16];

/* The activations of one call, prepared once and read by every panel.
 *
 * Tokens are interleaved in tiles of the path's token tile W (tq for the int8 arrays, tf
 * for the float ones), so the T values a tile kernel needs at one position are adjacent
 * and one pointer reaches them all: entry i of token t of an array with `len` entries per
 * token is at ((t / W) * len + i) * W + t % W. The int8 values move in 32-bit words (the
 * vpdpbusd operand): value k of token t is byte k % 4 of word ((t / W) * cols / 4 + k / 4)
 * * W + t % W. With W = 1 both are the plain row-major layout. */
typedef struct {
    int n; /* tokens */
    int cols;
    const float *x; /* float activations, W = tf */
    /* int8 mode (quantized weights): x ~ d * q per run of 32; W = tq */
    const int8_t *q; /* cols per token */
    const float *d;  /* cols / 32 per token */
    const float *s;  /* cols / group per token: sum over the group's runs of d * sum(q) */
    /* cols / min(group, 32) per token: -128 * sum(q) over each part of a group (a run, or
     * the half of one a group of 16 is). The AVX-512 tile multiplies IQ4_NL and 8-bit weights
     * unsigned (w + 128) and starts each part's integer sum here: the offset cancels exactly. */
    const int32_t *c;
    /* float mode, asymmetric formats: the sum of x over each group, for the min term; W = tf */
    const float *xs; /* cols / group per token */
    float *y;        /* [n][rows], not interleaved */
} vlm_act;

typedef void (*vlm_gemm_fn)(const vlm_matrix *m, const vlm_act *a, int p0, int p1);
/* One token's activations to int8: q, d, s point at the token's first entries, and
 * consecutive words / entries of the token are w apart (the interleaving above). */
typedef void (*vlm_quant_fn)(const float *x, int cols, int group, int8_t *q, float *d, float *s, int32_t *c,
                             int w);

/* Scaled dot-product attention with grouped KV heads (attention.c drives it, attention_impl.h holds
 * the kernels): o[h][i] = softmax(scale * q[h][i] . k[hk][j]) v[hk][j] over the keys j the
 * query sees, hk = h / (h / h_kv). Causal: query i sits at position offset + i and sees keys
 * 0 .. offset + i; otherwise every key. Arrays are [heads][rows][d] with the last axis
 * contiguous and any strides (in floats) for the other two, so the KV cache and the
 * projections' outputs are read where they lie. */
#define VLM_MAX_HEAD_DIM 256
#define VLM_ATTN_ROWS 8 /* query rows of one rows_fn call, at most */
#define VLM_BLOCK_HEADS 4 /* query heads of one block_fn call, at most */

typedef struct {
    int h, h_kv, n, t, d; /* query heads, kv heads, queries, keys, head dim */
    int causal, offset;
    float scale;
    const float *q;
    const void *k, *v; /* float32, or fp16 with kv_half (a half-precision KV cache) */
    int kv_half;
    float *o;
    ptrdiff_t qh, qn, kh, kt, vh, vt, oh, on; /* strides in elements: per head, per row */
} vlm_attn;

/* The scale of the scores, 1 / sqrt(d) rounded once to float (as numpy's reference does). */
static inline float vlm_attn_scale(int d) { return (float)(1.0 / sqrt((double)d)); }

/* The kernels of attention_impl.h, compiled once per path. */
typedef struct {
    int block; /* queries per block_fn call */
    /* Queries [i0, i1) (at most `block`) of heads [h0, h0 + nh) (at most VLM_BLOCK_HEADS, one
     * kv head's) against every key they see. Writes o. */
    void (*block_fn)(const vlm_attn *a, int h0, int nh, int i0, int i1);
    /* Rows [r0, r1) (at most VLM_ATTN_ROWS; row r: head hk * g + r / n, query r % n) of kv head hk against keys
     * [j0, j1): for each row, its partial softmax state m, l, acc[d] at state + (r - r0) * (d + 2). */
    void (*rows_fn)(const vlm_attn *a, int hk, int r0, int r1, int j0, int j1, float *state);
    /* Row ops (y may be x): y = x / rms(x) * w; y = silu(g) * u; the rotary embedding of one
     * head vector (HF rotate-half layout), y = x * cos + rotate_half(x) * sin. */
    void (*rms_norm)(const float *x, const float *w, float eps, int n, float *y);
    void (*swiglu)(const float *g, const float *u, int n, float *y);
    void (*rotary)(const float *x, const float *cos, const float *sin, int d, float *y);
    /* n values to fp16, rounded to nearest even exactly as vlm_float_to_half (the KV cache). */
    void (*to_half)(const float *x, int n, uint16_t *y);
} vlm_ops;

/* One instruction-set path. gemm_* compute y for panels [p0, p1) and all n tokens. */
typedef struct {
    const char *name;
    int tq, tf;             /* token tiles of the int8 and float kernels */
    vlm_gemm_fn gemm_int8;  /* quantized weights, int8 activations */
    vlm_gemm_fn gemm_float; /* any weights, float activations */
    vlm_quant_fn quantize;  /* same rounding on every path */
    const vlm_ops *ops;
} vlm_path;

extern const vlm_path vlm_path_portable;
extern const vlm_ops vlm_ops_portable;
#if defined(__x86_64__) || defined(__i386__)
#define VLM_X86 1
extern const vlm_path vlm_path_avx2;
extern const vlm_path vlm_path_avxvnni;
extern const vlm_path vlm_path_avx512;
extern const vlm_ops vlm_ops_avx2;
extern const vlm_ops vlm_ops_avx512;
#endif
#if defined(__aarch64__)
#define VLM_ARM64 1
/* The extensions' paths need a compiler that takes their instructions in one function
 * (target attributes: GCC 8+ for the dot product, 10+ for I8MM) or a build for a CPU that
 * has them; other compilers (e.g. older Clang) build the "neon" path only. */
#if (defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 8) || defined(__ARM_FEATURE_DOTPROD)
#define VLM_ARM_DOTPROD 1
#endif
#if (defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10) || defined(__ARM_FEATURE_MATMUL_INT8)
#define VLM_ARM_I8MM 1
#endif
extern const vlm_path vlm_path_neon;
extern const vlm_path vlm_path_dotprod;
extern const vlm_path vlm_path_i8mm;
extern const vlm_ops vlm_ops_neon;
/* The AArch64 path `name` ("neon", "dotprod", "i8mm") when this CPU has its instructions
 * (the kernel's feature bits, getauxval), else NULL (matmul_neon.c). */
const vlm_path *vlm_arm_path(const char *name);
#endif

/* Which quantized weights take int8 activations (vlm.kernels.MODES, in this order). */
enum { MODE_W4A8, MODE_INT8, MODE_FLOAT, MODE_COUNT };

/* ---- products (matmul.c) ---------------------------------------------------------------
 * y = x @ W.T for n tokens. A product's activations (x quantized to int8, or interleaved for
 * the float tiles) are prepared once; products of the same x whose activations agree share
 * them, and several products run as one job on the pool. */
typedef struct {
    const vlm_matrix *m;
    vlm_act a;
    int int8;
} vlm_product;

/* Scratch bytes the activations of n tokens for m need (0: none). */
size_t vlm_act_bytes(const vlm_path *p, int mode, const vlm_matrix *m, int n);
/* Set up y = x @ m.T: take the activations of `like` (NULL: none) when they are the same,
 * else prepare them into scratch (vlm_act_bytes of it). */
void vlm_product_init(vlm_product *pr, const vlm_path *p, int mode, const vlm_matrix *m, const float *x, int n,
                      float *y, void *scratch, const vlm_product *like);
void vlm_products_run(const vlm_path *p, const vlm_product *prs, int count);
/* At most this many products of one x per call below. */
#define VLM_MAX_PRODUCTS 4
/* ys[i] = x @ ms[i].T for the count matrices (all of x's cols): the activations prepared once
 * where they can be shared (scratch: the sum of their vlm_act_bytes), one job on the pool. */
void vlm_products_of(const vlm_path *p, int mode, const vlm_matrix *const *ms, int count, const float *x, int n,
                     float *const *ys, void *scratch);
/* The same with its own scratch; -1 when out of memory. */
int vlm_linears(const vlm_path *p, int mode, const vlm_matrix *const *ms, int count, const float *x, int n,
                float *const *ys);

/* ---- attention and row ops on the pool (attention.c) ------------------------------------- */
/* -1 when out of memory. */
int vlm_attention(const vlm_path *p, const vlm_attn *a);
/* y [rows][n] = rms_norm(x [rows][n]) * w (y may be x). */
void vlm_rms_norm_rows(const vlm_path *p, const float *x, const float *w, float eps, int rows, int n, float *y);
/* y = silu(g) * u over count values (y may be g or u). */
void vlm_swiglu_rows(const vlm_path *p, const float *g, const float *u, size_t count, float *y);
/* The rotary embedding of x [h][n][d] (strides xh, xn in floats) with cos/sin [n][d] into y
 * (strides yh, yn; y may be x). */
void vlm_rotary_heads(const vlm_path *p, const float *x, ptrdiff_t xh, ptrdiff_t xn, const float *cos,
                      const float *sin, int h, int n, int d, float *y, ptrdiff_t yh, ptrdiff_t yn);

/* ---- the fused decoder step (decode.c) ------------------------------------------------- */
enum { W_Q, W_K, W_V, W_O, W_GATE, W_UP, W_DOWN, W_COUNT };

typedef struct {
    const vlm_matrix *w[W_COUNT];
    const float *bias[W_COUNT]; /* or NULL */
    const float *norm_in, *norm_post;
} vlm_layer;

typedef struct {
    int n_layers, hidden, n_heads, n_kv, head_dim, inter;
    float eps;
    const vlm_layer *layers;
    const float *norm; /* the final norm */
    /* The step's working memory, owned by the plan: allocated on its first step, grown only if a
     * wider batch, another path or activation mode needs more, freed with the plan. */
    void *scratch;
    size_t scratch_bytes;
} vlm_decoder;

/* One sequence of a step: its KV cache, [n_layers][n_kv][max_len][head_dim] float32 or
 * (kv_half) fp16 for k and v, and the slot its token takes. */
typedef struct {
    void *k, *v;
    int max_len, pos;
} vlm_kv_slot;

/* One token of each of n sequences: x [n][hidden] embedded, cos/sin [n][head_dim] of each
 * token's position, kv[r] the cache and slot of row r; writes the final-normed hidden states
 * to out [n][hidden]. -1 when out of memory. */
int vlm_decode_step(const vlm_path *p, int mode, vlm_decoder *dec, int n, const float *x, const float *cos,
                    const float *sin, const vlm_kv_slot *kv, int kv_half, float *out);

/* Repacking (pack.c); each returns 0, or -1 when out of memory. m->data is posix_memalign'ed.
 * drop_source: the source arrays are views of a read-only file map, whose resident pages may
 * be dropped as they are consumed (see pack.c); never set it for memory the process owns. */
typedef struct {
    const unsigned char *base;
    ptrdiff_t row, step; /* item (r, j) at base + r * row + j * step bytes */
} vlm_strided;
/* The quantized sources are strided so that a GGUF file's interleaved blocks are read in
 * place: quants item (r, b) is run b of row r (16 bytes of 4-bit, 32 of 8-bit values, in
 * GGUF nibble order), scales / mins item (r, g) the fp16 of group g. mins.base is NULL
 * unless the format is asymmetric (vlm_pack_q4 takes the 4-bit formats: FMT_Q4A, FMT_Q4S,
 * FMT_IQ4; vlm_pack_q8 makes FMT_Q8A when given mins, else FMT_Q8). */
int vlm_pack_q4(vlm_matrix *m, vlm_strided quants, vlm_strided scales, vlm_strided mins, int rows, int cols,
                int group, int fmt, int drop_source);
int vlm_pack_q8(vlm_matrix *m, vlm_strided quants, vlm_strided scales, vlm_strided mins, int rows, int cols,
                int group, int drop_source);
int vlm_pack_half(vlm_matrix *m, const uint16_t *data, int fmt, int rows, int cols, int drop_source);
/* Row `row` of a packed matrix widened to float32 (out [cols]), equal to the numpy
 * reference's dequantize() of that row bit for bit. */
void vlm_unpack_row(const vlm_matrix *m, int row, float *out);

/* Portable helpers every path may use. */
float vlm_half_to_float(uint16_t h);
float vlm_bf16_to_float(uint16_t h);
/* fp16 of x rounded to nearest even, as numpy's astype(float16) (subnormals, overflow to inf). */
uint16_t vlm_float_to_half(float x);
void vlm_quantize_row_portable(const float *x, int cols, int group, int8_t *q, float *d, float *s, int32_t *c,
                               int w);
void vlm_group_sums(const float *x, int cols, int group, float *xs, int w);

static inline int vlm_min(int a, int b) { return a < b ? a : b; }

/* A group's parts: its runs, or the half of one a group of 16 (8-bit only) is. */
#define PARTS(G) ((G) < RUN ? 1 : (G) / RUN)

/* The activations' group sums (vlm_act.s, vlm_act.c) from run b of a token: its d and the sums
 * of q over its two halves. A group of 16 (8-bit weights only) gets each half; a larger one
 * the run. */
static inline void vlm_group_sum(float *s, int32_t *c, int b, int group, int w, float d, int half0, int half1) {
    if (group == 16) {
        s[(size_t)2 * b * w] = d * (float)half0;
        s[(size_t)(2 * b + 1) * w] = d * (float)half1;
        c[(size_t)2 * b * w] = -128 * half0;
        c[(size_t)(2 * b + 1) * w] = -128 * half1;
        return;
    }
    c[(size_t)b * w] = -128 * (half0 + half1);
    const int runs = group / RUN;
    const float sb = d * (float)(half0 + half1);
    if (b % runs == 0)
        s[(size_t)b / runs * w] = sb;
    else
        s[(size_t)b / runs * w] += sb;
}

/* One call of a tile kernel: panel p, tokens [t0, t0 + T), columns [k0, k1) (whole
 * groups). It adds to y unless k0 == 0. pf is the prefetch offset (0: none). Large
 * matrices are cut along k so a tile's panel slice and activations stay in L1. */
typedef struct {
    int p, t0, k0, k1;
    size_t pf;
} vlm_span;

/* Float-activation products of at most this many tokens are tiled "solo": a tile's
 * accumulator chains depend on its width (CHAINS in the matmul_* files), and a solo tile gives
 * each of its tokens the chains of a lone token, so each token's sums run in the order they
 * take when it is alone. Each row of a batched decode step (up to this many sequences) thus
 * gets the bits of its own step. Int8 activations sum in integers: their rows agree at any
 * width. */
#define VLM_SOLO_TOKENS 8

/* Decode streams each matrix from DRAM once per token, in short runs. On an idle machine
 * the hardware prefetchers keep up; when other processes load the memory system they did
 * not, and software prefetch doubled the single-core rate (measured on the dev box; it is
 * neutral when idle). A tile prefetches the same position PREFETCH_BYTES (rounded up to
 * whole panels) ahead, within its unit's panels so another thread's share is not fetched
 * twice, and the first panels of a unit are requested at once. */
#define PREFETCH_BYTES 4096

/* Unconditional: with pf = 0 it touches the line about to be loaded anyway, which is
 * cheaper than a branch in the unrolled tile loops. */
static inline void vlm_prefetch(const void *p, size_t pf) { __builtin_prefetch((const char *)p + pf, 0, 3); }

/* Prefetch the start of panels [p0, p1); returns how many panels ahead tiles prefetch. */
static inline int vlm_prefetch_start(const vlm_matrix *m, int p0, int p1) {
    const int ahead = (int)((PREFETCH_BYTES + m->panel_bytes - 1) / m->panel_bytes);
    const unsigned char *start = m->data + (size_t)p0 * m->panel_bytes;
    const size_t bytes = (size_t)(vlm_min(p1, p0 + ahead) - p0) * m->panel_bytes;
    for (size_t off = 0; off < bytes; off += 64) __builtin_prefetch(start + off, 0, 3);
    return ahead;
}

/* The prefetch offset for panel p of a unit ending at p1 (0: none); only the first token
 * tile streams the panel, later tiles find it in cache. */
static inline size_t vlm_prefetch_offset(const vlm_matrix *m, int p, int p1, int ahead, int t0) {
    return t0 == 0 && p + ahead < p1 ? (size_t)ahead * m->panel_bytes : 0;
}

#endif

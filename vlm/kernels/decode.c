/* The fused decoder step: one token of each of n sequences through every layer of a Llama /
 * Qwen2 decoder in one call, the same operations as `LlamaModel.forward` on the kernel path,
 * in the same order:
 *
 *   for each layer:
 *     xn = rms_norm(x) * norm_in
 *     q, k, v = xn @ Wq.T + bq, ...      one job for all n rows; xn quantized to int8 once for all three
 *     q, k = rotary(q), rotary(k)        each row's cos/sin (its own position) come from Python
 *     k, v -> row r's KV cache at its slot pos
 *     a = attention(q, cache[: pos + 1]) each row against its own cache
 *     x = x + a @ Wo.T + bo
 *     xn = rms_norm(x) * norm_post
 *     gate, up = xn @ Wg.T + bg, ...     one job; xn quantized once for both
 *     x = x + (silu(gate) * up) @ Wd.T + bd
 *   out = rms_norm(x) * norm
 *
 * Each operation is the very function the unfused path calls, so the two agree bit for bit.
 * The n rows share every matrix product: the weights are read once per step for all of
 * them (decode is bound by reading the weights, so n sequences cost little more than one).
 * A product's rows are independent (int8 activations are quantized per row and summed in
 * integers), so with int8 activations each row's result is the one it gets alone; float
 * activations sum over chains whose count depends on the token tile (see the matmul_* files).
 */
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

static void add_bias(float *y, const float *b, int n) {
    if (b)
        for (int i = 0; i < n; i++) y[i] += b[i];
}

static void add(float *x, const float *y, int n) {
    for (int i = 0; i < n; i++) x[i] += y[i];
}

/* n values into row `row` of a cache head: float32, or fp16 rounded as numpy's cast rounds. */
static void store_kv(const vlm_path *p, void *head, int half, size_t row, const float *x, int n) {
    if (half)
        p->ops->to_half(x, n, (uint16_t *)head + row * n);
    else
        memcpy((float *)head + row * n, x, sizeof(float) * n);
}

/* ys[i] = x @ W_i.T + b_i for the layer's matrices ws[0..count) and n rows of x, sharing activations. */
static void project(const vlm_path *p, int mode, const vlm_layer *l, const int *ws, int count, const float *x, int n,
                    float *const *ys, unsigned char *scratch) {
    const vlm_matrix *ms[3];
    for (int i = 0; i < count; i++) ms[i] = l->w[ws[i]];
    vlm_products_of(p, mode, ms, count, x, n, ys, scratch);
    for (int i = 0; i < count; i++)
        for (int r = 0; r < n; r++) add_bias(ys[i] + (size_t)r * l->w[ws[i]]->rows, l->bias[ws[i]], l->w[ws[i]]->rows);
}

int vlm_decode_step(const vlm_path *p, int mode, vlm_decoder *dec, int n, const float *x_in, const float *cos,
                    const float *sin, const vlm_kv_slot *kv, int kv_half, float *out) {
    const int H = dec->hidden, D = dec->head_dim, QD = dec->n_heads * D, KD = dec->n_kv * D, FF = dec->inter;
    size_t act = 0; /* scratch for the activations of the largest job */
    for (int li = 0; li < dec->n_layers; li++) {
        const vlm_layer *l = &dec->layers[li];
        size_t s[W_COUNT];
        for (int w = 0; w < W_COUNT; w++) s[w] = vlm_act_bytes(p, mode, l->w[w], n);
        const size_t most = s[W_Q] + s[W_K] + s[W_V];
        act = most > act ? most : act;
        act = s[W_GATE] + s[W_UP] > act ? s[W_GATE] + s[W_UP] : act;
        act = s[W_O] > act ? s[W_O] : act;
        act = s[W_DOWN] > act ? s[W_DOWN] : act;
    }
    const size_t floats = (size_t)n * (3 * H + QD + 2 * KD + QD + 2 * (size_t)FF);
    const size_t need = sizeof(float) * floats + act;
    if (need > dec->scratch_bytes) { /* once per plan, unless a wider batch, path or mode needs more */
        void *grown = realloc(dec->scratch, need);
        if (!grown) return -1;
        dec->scratch = grown;
        dec->scratch_bytes = need;
    }
    float *buf = dec->scratch;
    float *x = buf, *xn = x + n * H, *y = xn + n * H, *q = y + n * H, *k = q + n * QD, *v = k + n * KD,
          *att = v + n * KD, *gate = att + n * QD, *up = gate + (size_t)n * FF;
    unsigned char *scratch = (unsigned char *)(up + (size_t)n * FF);
    const size_t bytes = kv_half ? 2 : 4;
    memcpy(x, x_in, sizeof(float) * n * H);
    for (int li = 0; li < dec->n_layers; li++) {
        const vlm_layer *l = &dec->layers[li];

        for (int r = 0; r < n; r++) p->ops->rms_norm(x + r * H, l->norm_in, dec->eps, H, xn + r * H);
        static const int qkv[] = {W_Q, W_K, W_V};
        project(p, mode, l, qkv, 3, xn, n, (float *const[]){q, k, v}, scratch);
        for (int r = 0; r < n; r++) {
            /* row r's cache: [n_layers][n_kv][max_len][D] */
            const size_t head_stride = (size_t)kv[r].max_len * D, layer_stride = dec->n_kv * head_stride;
            char *kc = (char *)kv[r].k + li * layer_stride * bytes, *vc = (char *)kv[r].v + li * layer_stride * bytes;
            const float *c = cos + r * D, *s = sin + r * D;
            float *qr = q + r * QD, *kr = k + r * KD, *vr = v + r * KD;
            for (int h = 0; h < dec->n_heads; h++) p->ops->rotary(qr + h * D, c, s, D, qr + h * D);
            for (int h = 0; h < dec->n_kv; h++) {
                p->ops->rotary(kr + h * D, c, s, D, kr + h * D);
                store_kv(p, kc + h * head_stride * bytes, kv_half, (size_t)kv[r].pos, kr + h * D, D);
                store_kv(p, vc + h * head_stride * bytes, kv_half, (size_t)kv[r].pos, vr + h * D, D);
            }
            const int pos = kv[r].pos;
            const vlm_attn a = {.h = dec->n_heads, .h_kv = dec->n_kv, .n = 1, .t = pos + 1, .d = D, .causal = 1,
                                .offset = pos, .scale = vlm_attn_scale(D), .q = qr, .k = kc, .v = vc,
                                .kv_half = kv_half, .o = att + r * QD,
                                .qh = D, .qn = QD, .kh = (ptrdiff_t)head_stride, .kt = D,
                                .vh = (ptrdiff_t)head_stride, .vt = D, .oh = D, .on = QD};
            if (vlm_attention(p, &a)) return -1;
        }
        static const int o[] = {W_O};
        project(p, mode, l, o, 1, att, n, (float *const[]){y}, scratch);
        add(x, y, n * H);

        for (int r = 0; r < n; r++) p->ops->rms_norm(x + r * H, l->norm_post, dec->eps, H, xn + r * H);
        static const int gate_up[] = {W_GATE, W_UP};
        project(p, mode, l, gate_up, 2, xn, n, (float *const[]){gate, up}, scratch);
        for (int r = 0; r < n; r++) p->ops->swiglu(gate + r * FF, up + r * FF, FF, gate + r * FF);
        static const int down[] = {W_DOWN};
        project(p, mode, l, down, 1, gate, n, (float *const[]){y}, scratch);
        add(x, y, n * H);
    }
    for (int r = 0; r < n; r++) p->ops->rms_norm(x + r * H, dec->norm, dec->eps, H, out + r * H);
    return 0;
}

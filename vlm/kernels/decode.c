/* The fused decoder step: one token through every layer of a Llama / Qwen2 decoder in one
 * call, the same operations as `LlamaModel.forward` on the kernel path, in the same order:
 *
 *   for each layer:
 *     xn = rms_norm(x) * norm_in
 *     q, k, v = xn @ Wq.T + bq, ...      one job; xn quantized to int8 once for all three
 *     q, k = rotary(q), rotary(k)        cos/sin of the position come from Python
 *     k, v -> the KV cache at slot pos
 *     a = attention(q, cache[: pos + 1])
 *     x = x + a @ Wo.T + bo
 *     xn = rms_norm(x) * norm_post
 *     gate, up = xn @ Wg.T + bg, ...     one job; xn quantized once for both
 *     x = x + (silu(gate) * up) @ Wd.T + bd
 *   out = rms_norm(x) * norm
 *
 * Each operation is the very function the unfused path calls, so the two agree bit for bit.
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

/* ys[i] = x @ W_i.T + b_i for the layer's matrices ws[0..count), sharing activations. */
static void project(const vlm_path *p, int mode, const vlm_layer *l, const int *ws, int count, const float *x,
                    float *const *ys, unsigned char *scratch) {
    vlm_product prs[3];
    for (int i = 0; i < count; i++) {
        const vlm_matrix *m = l->w[ws[i]];
        vlm_product_init(&prs[i], p, mode, m, x, 1, ys[i], scratch, i ? &prs[0] : NULL);
        scratch += vlm_act_bytes(p, mode, m, 1);
    }
    vlm_products_run(p, prs, count);
    for (int i = 0; i < count; i++) add_bias(ys[i], l->bias[ws[i]], l->w[ws[i]]->rows);
}

int vlm_decode_step(const vlm_path *p, int mode, vlm_decoder *dec, const float *x_in, const float *cos,
                    const float *sin, int pos, float *out) {
    const int H = dec->hidden, D = dec->head_dim, QD = dec->n_heads * D, KD = dec->n_kv * D, FF = dec->inter;
    size_t act = 0; /* scratch for the activations of the largest job */
    for (int li = 0; li < dec->n_layers; li++) {
        const vlm_layer *l = &dec->layers[li];
        size_t s[W_COUNT];
        for (int w = 0; w < W_COUNT; w++) s[w] = vlm_act_bytes(p, mode, l->w[w], 1);
        const size_t most = s[W_Q] + s[W_K] + s[W_V];
        act = most > act ? most : act;
        act = s[W_GATE] + s[W_UP] > act ? s[W_GATE] + s[W_UP] : act;
        act = s[W_O] > act ? s[W_O] : act;
        act = s[W_DOWN] > act ? s[W_DOWN] : act;
    }
    const size_t floats = (size_t)3 * H + QD + 2 * KD + QD + 2 * (size_t)FF;
    const size_t need = sizeof(float) * floats + act;
    if (need > dec->scratch_bytes) { /* once per plan, unless a later path or mode needs more */
        void *grown = realloc(dec->scratch, need);
        if (!grown) return -1;
        dec->scratch = grown;
        dec->scratch_bytes = need;
    }
    float *buf = dec->scratch;
    float *x = buf, *xn = x + H, *y = xn + H, *q = y + H, *k = q + QD, *v = k + KD, *att = v + KD, *gate = att + QD,
          *up = gate + FF;
    unsigned char *scratch = (unsigned char *)(up + FF);
    const size_t layer_stride = (size_t)dec->n_kv * dec->max_len * D, head_stride = (size_t)dec->max_len * D;
    const size_t bytes = dec->kv_half ? 2 : 4;
    memcpy(x, x_in, sizeof(float) * H);
    for (int li = 0; li < dec->n_layers; li++) {
        const vlm_layer *l = &dec->layers[li];
        char *kc = (char *)dec->k_cache + li * layer_stride * bytes, *vc = (char *)dec->v_cache + li * layer_stride * bytes;

        p->ops->rms_norm(x, l->norm_in, dec->eps, H, xn);
        static const int qkv[] = {W_Q, W_K, W_V};
        project(p, mode, l, qkv, 3, xn, (float *const[]){q, k, v}, scratch);
        for (int h = 0; h < dec->n_heads; h++) p->ops->rotary(q + h * D, cos, sin, D, q + h * D);
        for (int h = 0; h < dec->n_kv; h++) {
            p->ops->rotary(k + h * D, cos, sin, D, k + h * D);
            store_kv(p, kc + h * head_stride * bytes, dec->kv_half, (size_t)pos, k + h * D, D);
            store_kv(p, vc + h * head_stride * bytes, dec->kv_half, (size_t)pos, v + h * D, D);
        }
        const vlm_attn a = {.h = dec->n_heads, .h_kv = dec->n_kv, .n = 1, .t = pos + 1, .d = D, .causal = 1,
                            .offset = pos, .scale = vlm_attn_scale(D), .q = q, .k = kc, .v = vc,
                            .kv_half = dec->kv_half, .o = att,
                            .qh = D, .qn = QD, .kh = (ptrdiff_t)head_stride, .kt = D,
                            .vh = (ptrdiff_t)head_stride, .vt = D, .oh = D, .on = QD};
        if (vlm_attention(p, &a)) return -1;
        static const int o[] = {W_O};
        project(p, mode, l, o, 1, att, (float *const[]){y}, scratch);
        add(x, y, H);

        p->ops->rms_norm(x, l->norm_post, dec->eps, H, xn);
        static const int gate_up[] = {W_GATE, W_UP};
        project(p, mode, l, gate_up, 2, xn, (float *const[]){gate, up}, scratch);
        p->ops->swiglu(gate, up, FF, gate);
        static const int down[] = {W_DOWN};
        project(p, mode, l, down, 1, gate, (float *const[]){y}, scratch);
        add(x, y, H);
    }
    p->ops->rms_norm(x, dec->norm, dec->eps, H, out);
    return 0;
}

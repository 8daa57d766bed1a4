/* The SIMD layer of attention_impl.h for AVX-512 (F, DQ): 16 lanes, 32 registers. */
#include "kernels.h"

#ifdef VLM_X86
#include <immintrin.h>
#include <math.h>

#define OPS_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#define VINL static inline __attribute__((always_inline)) OPS_TARGET
#define OPS_NAME vlm_ops_avx512

/* Tiles: a block is NV vectors of queries; scores keep RK x NV accumulators, p @ v DD x NV. */
#define VW 16
#define NV 2
#define RK 8
#define DD 8

typedef __m512 vf;

VINL __mmask16 lanes(int n) { return (__mmask16)((1u << n) - 1); }
VINL vf v_zero(void) { return _mm512_setzero_ps(); }
VINL vf v_set1(float x) { return _mm512_set1_ps(x); }
VINL vf v_load(const float *p) { return _mm512_loadu_ps(p); }
VINL vf v_loadn(const float *p, int n) { return _mm512_maskz_loadu_ps(lanes(n), p); }
VINL void v_store(float *p, vf x) { _mm512_storeu_ps(p, x); }
VINL void v_storen(float *p, vf x, int n) { _mm512_mask_storeu_ps(p, lanes(n), x); }
VINL vf v_add(vf a, vf b) { return _mm512_add_ps(a, b); }
VINL vf v_sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
VINL vf v_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
VINL vf v_div(vf a, vf b) { return _mm512_div_ps(a, b); }
VINL vf v_fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
VINL vf v_max(vf a, vf b) { return _mm512_max_ps(a, b); }
VINL vf v_keep_le(vf s, vf a, vf b) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LE_OQ), v_set1(-INFINITY), s);
}
VINL vf v_iota(void) { return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
VINL float v_first(vf x) { return _mm512_cvtss_f32(x); }
VINL float v_hmax(vf x) { return _mm512_reduce_max_ps(x); }
VINL float v_hsum(vf x) { return _mm512_reduce_add_ps(x); }

/* e^x = 2^n * e^r, n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts), e^r by its
 * degree-6 Taylor-like polynomial (Cephes expf). */
VINL vf v_exp(vf x) {
    const __mmask16 ok = _mm512_cmp_ps_mask(x, v_set1(-87.33654f), _CMP_GE_OQ);
    x = _mm512_max_ps(_mm512_min_ps(x, v_set1(88.0f)), v_set1(-87.33654f));
    const vf n = _mm512_roundscale_ps(v_mul(x, v_set1(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    vf r = _mm512_fnmadd_ps(n, v_set1(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, v_set1(-2.12194440e-4f), r);
    vf p = v_set1(1.9875691500e-4f);
    p = v_fma(p, r, v_set1(1.3981999507e-3f));
    p = v_fma(p, r, v_set1(8.3334519073e-3f));
    p = v_fma(p, r, v_set1(4.1665795894e-2f));
    p = v_fma(p, r, v_set1(1.6666665459e-1f));
    p = v_fma(p, r, v_set1(5.0000001201e-1f));
    p = v_fma(p, v_mul(r, r), v_add(r, v_set1(1.0f)));
    return _mm512_maskz_scalef_ps(ok, p, n);
}

/* Lane j of the result: the sum of p[j]'s lanes. A transpose-and-add tree: pairs of vectors,
 * then quads, within 128-bit lanes, then across them. */
VINL vf v_sum_lanes(const vf p[VW]) {
    vf t[8], u[4], w[2];
    for (int i = 0; i < 8; i++)
        t[i] = v_add(_mm512_unpacklo_ps(p[2 * i], p[2 * i + 1]), _mm512_unpackhi_ps(p[2 * i], p[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        u[i] = v_add(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44), _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xee));
    for (int i = 0; i < 2; i++)
        w[i] = v_add(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                     _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xdd));
    return v_add(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xdd));
}

VINL vf v_load_half(const uint16_t *p, int e) {
    return _mm512_cvtph_ps(e == VW ? _mm256_loadu_si256((const __m256i *)p) : _mm256_maskz_loadu_epi16((__mmask16)((1u << e) - 1), p));
}

VINL void v_store_half(uint16_t *p, vf x) {
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
}

#include "attention_impl.h"

#endif

/* The SIMD layer of attention_impl.h for AVX2 + FMA (+ F16C for fp16 caches): 8 lanes, 16 registers. */
#include "kernels.h"

#ifdef VLM_X86
#include <immintrin.h>
#include <math.h>
#include <string.h>

#define OPS_TARGET __attribute__((target("avx2,fma,f16c")))
#define VINL static inline __attribute__((always_inline)) OPS_TARGET
#define OPS_NAME vlm_ops_avx2

/* Tiles: a block is NV vectors of queries; scores keep RK x NV accumulators, p @ v DD x NV. */
#define VW 8
#define NV 2
#define RK 4
#define DD 4

typedef __m256 vf;

VINL __m256i lanes(int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
VINL vf v_zero(void) { return _mm256_setzero_ps(); }
VINL vf v_set1(float x) { return _mm256_set1_ps(x); }
VINL vf v_load(const float *p) { return _mm256_loadu_ps(p); }
VINL vf v_loadn(const float *p, int n) { return _mm256_maskload_ps(p, lanes(n)); }
VINL void v_store(float *p, vf x) { _mm256_storeu_ps(p, x); }
VINL void v_storen(float *p, vf x, int n) { _mm256_maskstore_ps(p, lanes(n), x); }
VINL vf v_add(vf a, vf b) { return _mm256_add_ps(a, b); }
VINL vf v_sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
VINL vf v_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
VINL vf v_div(vf a, vf b) { return _mm256_div_ps(a, b); }
VINL vf v_fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
VINL vf v_max(vf a, vf b) { return _mm256_max_ps(a, b); }
VINL vf v_keep_le(vf s, vf a, vf b) { return _mm256_blendv_ps(v_set1(-INFINITY), s, _mm256_cmp_ps(a, b, _CMP_LE_OQ)); }
VINL vf v_iota(void) { return _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7); }
VINL float v_first(vf x) { return _mm256_cvtss_f32(x); }
VINL __m128 half_fold(vf x) { return _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1)); }
VINL float v_hsum(vf x) {
    __m128 s = half_fold(x);
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
VINL float v_hmax(vf x) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

/* e^x as in attention_avx512.c; 2^n is built in the exponent field (n >= -126 after the clamp). */
VINL vf v_exp(vf x) {
    const vf ok = _mm256_cmp_ps(x, v_set1(-87.33654f), _CMP_GE_OQ);
    x = _mm256_max_ps(_mm256_min_ps(x, v_set1(88.0f)), v_set1(-87.33654f));
    const vf n = _mm256_round_ps(v_mul(x, v_set1(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vf r = _mm256_fnmadd_ps(n, v_set1(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, v_set1(-2.12194440e-4f), r);
    vf p = v_set1(1.9875691500e-4f);
    p = v_fma(p, r, v_set1(1.3981999507e-3f));
    p = v_fma(p, r, v_set1(8.3334519073e-3f));
    p = v_fma(p, r, v_set1(4.1665795894e-2f));
    p = v_fma(p, r, v_set1(1.6666665459e-1f));
    p = v_fma(p, r, v_set1(5.0000001201e-1f));
    p = v_fma(p, v_mul(r, r), v_add(r, v_set1(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(v_mul(p, _mm256_castsi256_ps(e)), ok);
}

/* Lane j of the result: the sum of p[j]'s lanes (transpose-and-add, as in attention_avx512.c). */
VINL vf v_sum_lanes(const vf p[VW]) {
    vf t[4], u[2];
    for (int i = 0; i < 4; i++)
        t[i] = v_add(_mm256_unpacklo_ps(p[2 * i], p[2 * i + 1]), _mm256_unpackhi_ps(p[2 * i], p[2 * i + 1]));
    for (int i = 0; i < 2; i++)
        u[i] = v_add(_mm256_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44), _mm256_shuffle_ps(t[2 * i], t[2 * i + 1], 0xee));
    return v_add(_mm256_permute2f128_ps(u[0], u[1], 0x20), _mm256_permute2f128_ps(u[0], u[1], 0x31));
}

VINL vf v_load_half(const uint16_t *p, int e) {
    if (e == VW) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    uint16_t h[VW] = {0};
    memcpy(h, p, sizeof(uint16_t) * (size_t)e);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
}

VINL void v_store_half(uint16_t *p, vf x) {
    _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
}

#include "attention_impl.h"

#endif

/* The SIMD layer of attention_impl.h for AArch64 Advanced SIMD: 4 lanes, 32 registers. Every
 * instruction used (FMLA, FRINTN, FCVTL / FCVTN for fp16 caches, FADDP / FMAXV) is in the
 * AArch64 baseline, so all three Arm paths share these ops. */
#include "kernels.h"

#if defined(__aarch64__)
#include <arm_neon.h>
#include <math.h>
#include <string.h>

#define OPS_TARGET
#define VINL static inline __attribute__((always_inline))
#define OPS_NAME vlm_ops_neon

/* Tiles: a block is NV vectors of queries; scores keep RK x NV accumulators, p @ v DD x NV. */
#define VW 4
#define NV 2
#define RK 4
#define DD 4

typedef float32x4_t vf;

VINL vf v_zero(void) { return vdupq_n_f32(0.0f); }
VINL vf v_set1(float x) { return vdupq_n_f32(x); }
VINL vf v_load(const float *p) { return vld1q_f32(p); }
VINL vf v_loadn(const float *p, int n) {
    float v[VW] = {0};
    memcpy(v, p, sizeof(float) * (size_t)n);
    return vld1q_f32(v);
}
VINL void v_store(float *p, vf x) { vst1q_f32(p, x); }
VINL void v_storen(float *p, vf x, int n) {
    float v[VW];
    vst1q_f32(v, x);
    memcpy(p, v, sizeof(float) * (size_t)n);
}
VINL vf v_add(vf a, vf b) { return vaddq_f32(a, b); }
VINL vf v_sub(vf a, vf b) { return vsubq_f32(a, b); }
VINL vf v_mul(vf a, vf b) { return vmulq_f32(a, b); }
VINL vf v_div(vf a, vf b) { return vdivq_f32(a, b); }
VINL vf v_fma(vf a, vf b, vf c) { return vfmaq_f32(c, a, b); }
VINL vf v_max(vf a, vf b) { return vmaxq_f32(a, b); }
VINL vf v_keep_le(vf s, vf a, vf b) { return vbslq_f32(vcleq_f32(a, b), s, v_set1(-INFINITY)); }
VINL vf v_iota(void) { return (vf){0.0f, 1.0f, 2.0f, 3.0f}; }
VINL float v_first(vf x) { return vgetq_lane_f32(x, 0); }
VINL float v_hsum(vf x) { return vaddvq_f32(x); }
VINL float v_hmax(vf x) { return vmaxvq_f32(x); }

/* e^x as in attention_avx512.c: n = round(x / ln 2) (FRINTN), r = x - n ln 2 in two parts, a
 * degree-6 polynomial, 2^n built in the exponent field (n >= -126 after the clamp). */
VINL vf v_exp(vf x) {
    const uint32x4_t ok = vcgeq_f32(x, v_set1(-87.33654f));
    x = vmaxq_f32(vminq_f32(x, v_set1(88.0f)), v_set1(-87.33654f));
    const vf n = vrndnq_f32(v_mul(x, v_set1(1.44269504088896341f)));
    vf r = vfmsq_f32(x, n, v_set1(0.693359375f));
    r = vfmsq_f32(r, n, v_set1(-2.12194440e-4f));
    vf p = v_set1(1.9875691500e-4f);
    p = v_fma(p, r, v_set1(1.3981999507e-3f));
    p = v_fma(p, r, v_set1(8.3334519073e-3f));
    p = v_fma(p, r, v_set1(4.1665795894e-2f));
    p = v_fma(p, r, v_set1(1.6666665459e-1f));
    p = v_fma(p, r, v_set1(5.0000001201e-1f));
    p = v_fma(p, v_mul(r, r), v_add(r, v_set1(1.0f)));
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(v_mul(p, vreinterpretq_f32_s32(e))), ok));
}

/* Lane j of the result: the sum of p[j]'s lanes (two rounds of pairwise adds). */
VINL vf v_sum_lanes(const vf p[VW]) { return vpaddq_f32(vpaddq_f32(p[0], p[1]), vpaddq_f32(p[2], p[3])); }

/* fp16 <-> float32 with FCVTL / FCVTN: exact widening, and narrowing rounded to nearest
 * even with subnormals and overflow to inf, as vlm_float_to_half (FPCR's default mode). */
VINL vf v_load_half(const uint16_t *p, int e) {
    uint16_t h[VW] = {0};
    memcpy(h, p, sizeof(uint16_t) * (size_t)e);
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h)));
}

VINL void v_store_half(uint16_t *p, vf x) { vst1_u16(p, vreinterpret_u16_f16(vcvt_f16_f32(x))); }

#include "attention_impl.h"

#endif

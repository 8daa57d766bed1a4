/* The SIMD layer of attention_impl.h in portable C: GCC/Clang vector extensions of 4 floats, which
 * the compiler maps to whatever the target has (SSE2, NEON) or to scalars. */
#include <math.h>
#include <string.h>

#include "kernels.h"

#define OPS_TARGET
#define VINL static inline __attribute__((always_inline))
#define OPS_NAME vlm_ops_portable

/* Tiles: a block is NV vectors of queries; scores keep RK x NV accumulators, p @ v DD x NV. */
#define VW 4
#define NV 2
#define RK 4
#define DD 4

typedef float vf __attribute__((vector_size(16), may_alias));
typedef int32_t vi __attribute__((vector_size(16), may_alias));

VINL vf v_zero(void) { return (vf){0.0f, 0.0f, 0.0f, 0.0f}; }
VINL vf v_set1(float x) { return (vf){x, x, x, x}; }
VINL vf v_loadn(const float *p, int n) {
    vf v = v_zero();
    memcpy(&v, p, sizeof(float) * (size_t)n);
    return v;
}
VINL vf v_load(const float *p) { return v_loadn(p, VW); }
VINL void v_storen(float *p, vf x, int n) { memcpy(p, &x, sizeof(float) * (size_t)n); }
VINL void v_store(float *p, vf x) { v_storen(p, x, VW); }
VINL vf v_add(vf a, vf b) { return a + b; }
VINL vf v_sub(vf a, vf b) { return a - b; }
VINL vf v_mul(vf a, vf b) { return a * b; }
VINL vf v_div(vf a, vf b) { return a / b; }
VINL vf v_fma(vf a, vf b, vf c) { return a * b + c; }
VINL vf v_select(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }
VINL vf v_max(vf a, vf b) { return v_select(a > b, a, b); }
VINL vf v_keep_le(vf s, vf a, vf b) { return v_select(a <= b, s, v_set1(-INFINITY)); }
VINL vf v_iota(void) { return (vf){0.0f, 1.0f, 2.0f, 3.0f}; }
VINL float v_first(vf x) { return x[0]; }
VINL float v_hsum(vf x) { return (x[0] + x[1]) + (x[2] + x[3]); }
VINL float v_hmax(vf x) { return fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3])); }

/* e^x as in attention_avx512.c. Rounding to an integer: adding 1.5 * 2^23 leaves n in the low
 * mantissa bits (|n| < 2^22), so both the float n and its integer come from one add. */
VINL vf v_exp(vf x) {
    const vi ok = x >= v_set1(-87.33654f);
    x = v_max(v_select(x < v_set1(88.0f), x, v_set1(88.0f)), v_set1(-87.33654f));
    const vf magic = v_set1(12582912.0f);
    const vf big = x * v_set1(1.44269504088896341f) + magic;
    const vf n = big - magic;
    const vf r = (x - n * v_set1(0.693359375f)) - n * v_set1(-2.12194440e-4f);
    vf p = v_set1(1.9875691500e-4f);
    p = p * r + v_set1(1.3981999507e-3f);
    p = p * r + v_set1(8.3334519073e-3f);
    p = p * r + v_set1(4.1665795894e-2f);
    p = p * r + v_set1(1.6666665459e-1f);
    p = p * r + v_set1(5.0000001201e-1f);
    p = p * (r * r) + (r + v_set1(1.0f));
    const vi e = (((vi)big - (vi)magic) + 127) << 23;
    return (vf)((vi)(p * (vf)e) & ok);
}

VINL vf v_sum_lanes(const vf p[VW]) { return (vf){v_hsum(p[0]), v_hsum(p[1]), v_hsum(p[2]), v_hsum(p[3])}; }

VINL vf v_load_half(const uint16_t *p, int e) {
    float f[VW] = {0};
    for (int i = 0; i < e; i++) f[i] = vlm_half_to_float(p[i]);
    return v_loadn(f, VW);
}

VINL void v_store_half(uint16_t *p, vf x) {
    for (int i = 0; i < VW; i++) p[i] = vlm_float_to_half(x[i]);
}

#include "attention_impl.h"

/* The AVX2 kernels again, with AVX-VNNI's vpdpbusd for the int8 products (see matmul_avx2.c). */
#define VLM_AVX_VNNI
#include "matmul_avx2.c"

/* The AArch64 kernels again, with SDOT for decode and I8MM's SMMLA for prefill (see matmul_neon.c). */
#define VLM_NEON_LEVEL 2
#include "matmul_neon.c"

/* The AArch64 kernels again, with the dot-product extension's SDOT (see matmul_neon.c). */
#define VLM_NEON_LEVEL 1
#include "matmul_neon.c"

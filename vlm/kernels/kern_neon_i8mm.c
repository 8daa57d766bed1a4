/* The AArch64 kernels again, with SDOT for decode and I8MM's SMMLA for prefill (see kern_neon.c). */
#define VLM_NEON_LEVEL 2
#include "kern_neon.c"

/* The quantize / fake-quantize / dequantize loops of the MX C kernels (_mxloops.c), as called by the
 * Python module glue (_mxkernels.c): a job_t (_mxscalar.h) describes one call; the loops split its
 * blocks (or tiles) among nt OpenMP threads and run the ISA variant chosen by mxloops_select_isa. */
#ifndef MICROSCALE_MXLOOPS_H
#define MICROSCALE_MXLOOPS_H
#include "_mxscalar.h"

/* Picks the AVX-512 / AVX2 / baseline variant (MICROSCALE_KERNELS_ISA=avx2|baseline caps it); returns
 * its name. Called once, at module import. */
const char *mxloops_select_isa(void);

/* mode 0: fake-quantize J->in into J->out; mode 1: quantize to J->codes / J->scales (two-level formats:
 * microexponents unpacked, one byte per sub-block, into J->micro). */
void mxloops_quantize(const job_t *J, int mode, int nt);

/* J->codes / J->scales (/ the packed microexponent stream J->micro) into J->out of dtype J->odt. */
void mxloops_dequantize(const job_t *J, int nt);

#endif /* MICROSCALE_MXLOOPS_H */

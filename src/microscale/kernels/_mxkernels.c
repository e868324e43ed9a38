/* Python module glue of the MX C kernels (microscale.kernels._mxkernels): argument parsing, the format
 * tuple, huge-page advice for fresh outputs, and the module table. The work is done by
 *   _mxscalar.h  descriptors (fmt_t, job_t), bit helpers, shared exponent, element rounding and decode;
 *   _mxpack.h    packing of codes and microexponents into the bit streams of packing.py;
 *   _mxloops.c   the quantize / fake-quantize / dequantize loops (one family for single- and two-level
 *                formats; AVX-512 / AVX2 / baseline variants chosen here at import);
 *   _mxgemm.c    the fused packed-weight GEMV / GEMM tiles (adds its functions to this module).
 * Every pointer handed in was checked by microscale.kernels.checked_pointers (sizes, dtypes, devices).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "_mxscalar.h"
#include "_mxloops.h"

static const char *ISA = "baseline";

/* Fresh multi-megabyte outputs are page-faulted by the kernel as it writes them; 4 KiB faults (each
 * zeroing a page) cost several times the kernel itself. Transparent huge pages cut the faults 512-fold.
 * Only the 2 MiB-aligned interior of a buffer that we are about to overwrite entirely is advised. */
static void advise_hugepages(void *p, int64_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t H = (uintptr_t)1 << 21;
    if (nbytes < (int64_t)(4 * H)) return;
    uintptr_t a = ((uintptr_t)p + H - 1) & ~(H - 1), e = ((uintptr_t)p + (uintptr_t)nbytes) & ~(H - 1);
    if (e > a) (void)madvise((void *)a, e - a, MADV_HUGEPAGE);
#else
    (void)p; (void)nbytes;
#endif
}

/* ---- Python interface -------------------------------------------------------------------------- */
/* The 19 format ints of kernels._params into *f (also used by _mxconv.c, which then refuses two-level
 * formats); ValueError on a malformed tuple or an unsupported block size / width / sub-block. */
int mx_parse_fmt(PyObject *tup, fmt_t *f) {
    int32_t *dst[] = {&f->emin, &f->mbits, &f->maxmag, &f->inf_mag, &f->nmax, &f->pmaxbase, &f->enc, &f->bits, &f->emax,
                      &f->even_m, &f->flm, &f->sigm, &f->s_emin, &f->s_emax, &f->s_bias, &f->s_nan, &f->k,
                      &f->k2, &f->d2};
    const Py_ssize_t n = (Py_ssize_t)(sizeof(dst) / sizeof(dst[0]));
    if (!PyTuple_Check(tup) || PyTuple_GET_SIZE(tup) != n) {
        PyErr_Format(PyExc_ValueError, "format parameters must be a tuple of %zd ints", n);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long v = PyLong_AsLong(PyTuple_GET_ITEM(tup, i));
        if (v == -1 && PyErr_Occurred()) return -1;
        *dst[i] = (int32_t)v;
    }
    if (f->k < 1 || f->k > MAXK || f->bits < 2 || f->bits > 8 || (f->k * f->bits) % 8) {
        PyErr_SetString(PyExc_ValueError, "unsupported block size / element width");
        return -1;
    }
    if (f->k2 && (f->k2 < 1 || f->k > MAXK2 || f->k % f->k2 || f->d2 < 1 || f->d2 > 8)) {
        PyErr_SetString(PyExc_ValueError, "unsupported sub-block size / microexponent width");
        return -1;
    }
    f->beta = f->k2 ? (1 << f->d2) - 1 : 0;
    return 0;
}

/* quantize(mode, in_ptr, out_ptr, codes_ptr, scales_ptr, dtype, outer, L, inner, fmt, rnd, smode, seed, nt
 *          [, micro_tmp_ptr, micro_ptr])
 * mode 0: fake-quantize into out_ptr (same dtype as input); mode 1: packed codes + scales, and for two-level
 * formats the packed microexponents in micro_ptr (micro_tmp_ptr: scratch of one byte per sub-block). */
static PyObject *py_quantize(PyObject *self, PyObject *args) {
    int mode, dt, rnd, smode, nt;
    unsigned long long in, out, codes, scales, micro_tmp = 0, micro = 0;
    long long outer, L, inner;
    unsigned long seed;
    PyObject *ft;
    job_t J;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKKKKiLLLOiiki|KK", &mode, &in, &out, &codes, &scales, &dt, &outer, &L, &inner,
                          &ft, &rnd, &smode, &seed, &nt, &micro_tmp, &micro))
        return NULL;
    memset(&J, 0, sizeof J);
    if (mx_parse_fmt(ft, &J.f)) return NULL;
    if (dt < DT_F32 || dt > DT_F16 || rnd < 0 || rnd > 3 || smode < 0 || smode > 3 || L < 1
        || (mode == 1 && J.f.k2 && (!micro_tmp || !micro))) {
        PyErr_SetString(PyExc_ValueError, "bad kernel arguments");
        return NULL;
    }
    J.in = (const void *)(uintptr_t)in; J.out = (void *)(uintptr_t)out;
    J.micro = (uint8_t *)(uintptr_t)micro_tmp;
    J.codes = (uint8_t *)(uintptr_t)codes; J.scales = (uint8_t *)(uintptr_t)scales;
    J.outer = outer; J.L = L; J.inner = inner; J.nb = (L + J.f.k - 1) / J.f.k;
    J.f.half_mask = rnd == R_ZERO ? 0u : ~0u; J.f.even = rnd == R_EVEN;
    J.idt = J.odt = dt; J.rnd = rnd; J.smode = smode; J.seed = (uint32_t)seed;
    Py_BEGIN_ALLOW_THREADS
    if (mode == 0) advise_hugepages(J.out, outer * L * inner * (dt == DT_F32 ? 4 : 2));
    else advise_hugepages(J.codes, outer * J.nb * J.f.k * J.f.bits / 8);
    mxloops_quantize(&J, mode, nt);
    if (mode == 1 && J.f.k2)
        pack_stream(J.micro, (uint8_t *)(uintptr_t)micro, outer * inner * J.nb * (J.f.k / J.f.k2), J.f.d2, nt);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* dequantize(codes_ptr, scales_ptr, out_ptr, out_dtype, outer, L, inner, fmt, nt[, micro_ptr])
 * micro_ptr: the packed microexponents of a two-level format. */
static PyObject *py_dequantize(PyObject *self, PyObject *args) {
    int dt, nt;
    unsigned long long codes, scales, out, micro = 0;
    long long outer, L, inner;
    PyObject *ft;
    job_t J;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKiLLLOi|K", &codes, &scales, &out, &dt, &outer, &L, &inner, &ft, &nt, &micro))
        return NULL;
    memset(&J, 0, sizeof J);
    if (mx_parse_fmt(ft, &J.f)) return NULL;
    if (dt < DT_F32 || dt > DT_F64 || L < 1 || (J.f.k2 && !micro)) {
        PyErr_SetString(PyExc_ValueError, "bad kernel arguments");
        return NULL;
    }
    J.codes = (uint8_t *)(uintptr_t)codes; J.scales = (uint8_t *)(uintptr_t)scales;
    J.out = (void *)(uintptr_t)out; J.micro = (uint8_t *)(uintptr_t)micro;
    J.outer = outer; J.L = L; J.inner = inner; J.nb = (L + J.f.k - 1) / J.f.k; J.odt = dt;
    Py_BEGIN_ALLOW_THREADS
    advise_hugepages(J.out, outer * L * inner * (dt == DT_F32 ? 4 : (dt == DT_F64 ? 8 : 2)));
    mxloops_dequantize(&J, nt);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_info(PyObject *self, PyObject *noargs) {
    (void)self; (void)noargs;
#ifdef _OPENMP
    int omp = 1;
#else
    int omp = 0;
#endif
    return Py_BuildValue("{s:s,s:i,s:i,s:i,s:i}", "isa", ISA, "openmp", omp, "max_block", MAXK, "max_block_two_level",
                         MAXK2, "tile", TILE);
}

static PyMethodDef methods[] = {
    {"quantize", py_quantize, METH_VARARGS, "fake-quantize (mode 0) or quantize to packed codes (mode 1)"},
    {"dequantize", py_dequantize, METH_VARARGS, "packed codes + scales to a dense tensor"},
    {"info", py_info, METH_NOARGS, "build facts: selected ISA, OpenMP"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_mxkernels", "MX quantization kernels (C)", -1,
                                    methods, NULL, NULL, NULL, NULL};

/* _mxgemm.c (fused packed-weight GEMV / GEMM tiles) adds its functions to this module. */
int mxgemm_add_functions(PyObject *module);

PyMODINIT_FUNC PyInit__mxkernels(void) {
    ISA = mxloops_select_isa();
    PyObject *m = PyModule_Create(&moddef);
    if (m && mxgemm_add_functions(m) < 0) { Py_DECREF(m); return NULL; }
    { extern int mxconv_add_functions(PyObject *); if (m && mxconv_add_functions(m) < 0) { Py_DECREF(m); return NULL; } }  /* _mxconv.c */
    return m;
}

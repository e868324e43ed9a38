/* Fused MX grouped / depthwise convolution on CPU without im2col: the forward y = conv(q(x), wq) + b
 * (conv_forward) and the weight gradient gw = q(gy) . q(columns)^T (conv_wgrad, described above its loop).
 *
 * The recipe semantics are those of microscale.nn.modules (im2col + one batched GEMM over the groups):
 * group g's reduction vector at output position (n, ho, wo) is its window of K = C/G * kh * kw input
 * values in F.unfold's (c, i, j) order (zero where the window overlaps the zero padding), blocked along
 * K in blocks of k starting at index 0 (OCP MX v1.0 §6.3; for a 3x3 depthwise conv, K = 9 < k = 32, so
 * each window is one short block). Here each tile of output positions gathers its windows into a small
 * [K][LT] buffer (in L1), computes each window block's shared exponent and rounds its elements with the
 * very code the quantize loops use (_mxscalar.h: shared_exp_c, quant_fast / quant_elem, max_bits; NaN/Inf
 * in a block gives NaN values, as in tiles_impl of _mxkernels.c), then accumulates against the
 * once-quantized weights wq [O, K] of the group's output channels, vectorized across output positions.
 * The quantized windows are bit-identical to fake_quantize(im2col(x), axis=K); the sums differ from the
 * batched GEMM's only in fp32 summation order (in order over K here, then + bias).
 *
 * Parallel (OpenMP, dynamic chunks) over (batch, group, tile of output positions); no allocation.
 * Variants: AVX-512, AVX2 and baseline x86-64, chosen at import and capped by
 * MICROSCALE_KERNELS_ISA=avx2|baseline like the other kernels of the extension. Deterministic rounding only (even / away / zero; stochastic
 * rounding draws its noise by the flat index of the materialized columns and stays on that path);
 * fp32 x / w / y; single-level formats (no microexponents). The Python side (kernels/conv.py) checks
 * every buffer through checked_pointers before calling; the arguments are re-checked here.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "_mxscalar.h"

#define CONV_MAXK 256          /* largest per-group reduction C/G * kh * kw */
#define CONV_BUF 4096          /* floats of one tile's window buffer [K][LT] (16 KiB) */
#define CONV_MAXLT 256         /* largest tile of output positions */

typedef struct {
    const float *x, *w, *bias;     /* x [N, C, H, W], wq [O, K], bias [O] or NULL */
    float *y, *cols;               /* y [N, O, Ho, Wo]; cols [G, K, N * Ho * Wo] or NULL (quantized windows) */
    int64_t N, C, H, W, O, Ho, Wo, L, ntile;
    int G, Cg, M, K, kh, kw, sh, sw, ph, pw, dh, dw, lt;
    int smode;
    fmt_t f;
} cjob_t;

/* dst[p] for p < cnt = x value of window element (c, i, j) at output positions l0 .. l0 + cnt - 1 of
 * plane xp (zero outside the input: the zero padding). */
AINLINE void gather_row(const cjob_t *J, const float *xp, int i, int j, int64_t l0, int cnt, float *dst) {
    const int64_t Wo = J->Wo, H = J->H, W = J->W, sw = J->sw;
    const int64_t off = (int64_t)j * J->dw - J->pw;               /* wi = wo * sw + off */
    /* output columns wo in [lo, hi) read inside the row */
    int64_t lo = off >= 0 ? 0 : (-off + sw - 1) / sw;
    int64_t hi = W - 1 - off < 0 ? 0 : (W - 1 - off) / sw + 1;
    hi = hi < Wo ? hi : Wo;
    lo = lo < hi ? lo : hi;
    int64_t ho = l0 / Wo, wo0 = l0 - ho * Wo;
    int p = 0;
    while (p < cnt) {
        int seg = (int)(Wo - wo0 < cnt - p ? Wo - wo0 : cnt - p);
        int64_t hin = ho * J->sh - J->ph + (int64_t)i * J->dh;
        float *d = dst + p;
        if (hin < 0 || hin >= H) {
            for (int q = 0; q < seg; q++) d[q] = 0.0f;
        } else {
            const float *row = xp + hin * W + off;
            int64_t a = lo > wo0 ? lo : wo0, b = hi < wo0 + seg ? hi : wo0 + seg;
            if (b < a) b = a;
            int q = 0;
            for (; q < (int)(a - wo0); q++) d[q] = 0.0f;
            if (sw == 1) {
                memcpy(d + q, row + wo0 + q, (size_t)(b - a) * 4);
                q += (int)(b - a);
            } else {
                for (; q < (int)(b - wo0); q++) d[q] = row[(wo0 + q) * sw];
            }
            for (; q < seg; q++) d[q] = 0.0f;
        }
        p += seg; ho++; wo0 = 0;
    }
}

/* Items t in [t0, t1): t = ((n * G) + g) * ntile + tile. */
AINLINE void conv_fwd_impl(const cjob_t *J, int64_t t0, int64_t t1) {
    const fmt_t F = J->f, *f = &F;
    const int K = J->K, k = f->k, M = J->M, LT = J->lt, Cg = J->Cg, kh = J->kh, kw = J->kw;
    const int64_t L = J->L, ntile = J->ntile, T = J->N * J->L;
    const smode_t smc = smode_consts(J->smode, f);
    float A[CONV_BUF] __attribute__((aligned(64)));
    float acc[CONV_MAXLT] __attribute__((aligned(64)));
    uint32_t amax[CONV_MAXLT] __attribute__((aligned(64))), maxb[CONV_MAXLT] __attribute__((aligned(64)));
    int32_t X[CONV_MAXLT] __attribute__((aligned(64))), Tc[CONV_MAXLT] __attribute__((aligned(64)));
    for (int64_t t = t0; t < t1; t++) {
        const int64_t tile = t % ntile, ng = t / ntile, g = ng % J->G, n = ng / J->G;
        const int64_t l0 = tile * LT;
        const int cnt = (int)(L - l0 < LT ? L - l0 : LT);
        /* windows of this tile: A[kk * LT + p], kk = (c * kh + i) * kw + j */
        for (int c = 0; c < Cg; c++) {
            const float *xp = J->x + ((n * J->C) + g * Cg + c) * J->H * J->W;
            for (int i = 0; i < kh; i++)
                for (int j = 0; j < kw; j++)
                    gather_row(J, xp, i, j, l0, cnt, A + (size_t)((c * kh + i) * kw + j) * LT);
        }
        /* quantize block by block along K */
        uint32_t *Au = (uint32_t *)A;
        for (int kb = 0; kb < K; kb += k) {
            const int ke = kb + k < K ? kb + k : K;
#pragma omp simd
            for (int p = 0; p < cnt; p++) amax[p] = 0;
            for (int kk = kb; kk < ke; kk++) {
                const uint32_t *r = Au + (size_t)kk * LT;
#pragma omp simd
                for (int p = 0; p < cnt; p++) {
                    uint32_t ax = r[p] & 0x7FFFFFFFu;
                    amax[p] = ax > amax[p] ? ax : amax[p];
                }
            }
            int32_t tmin = 1;
#pragma omp simd reduction(min:tmin)
            for (int p = 0; p < cnt; p++) {
                uint32_t sp = amax[p] >= 0x7F800000u;
                int32_t x = shared_exp_c(sp ? 0u : amax[p], smc, f);
                X[p] = x; Tc[p] = x + f->emin + 127;
                maxb[p] = sp ? 0x7FC00000u : max_bits(x, f);
                tmin = Tc[p] < tmin ? Tc[p] : tmin;
            }
            if (tmin >= 1) {
                for (int kk = kb; kk < ke; kk++) {
                    uint32_t *r = Au + (size_t)kk * LT;
#pragma omp simd
                    for (int p = 0; p < cnt; p++) {
                        uint32_t c, v;
                        quant_fast(r[p], Tc[p], maxb[p], f, &c, &v, 1, 0);
                        r[p] = amax[p] >= 0x7F800000u ? 0x7FC00000u : v;
                    }
                }
            } else {
                for (int kk = kb; kk < ke; kk++) {
                    uint32_t *r = Au + (size_t)kk * LT;
#pragma omp simd
                    for (int p = 0; p < cnt; p++) {
                        uint32_t c, v;
                        quant_elem(r[p], X[p], 0u, R_EVEN, f, &c, &v);   /* (half_mask/even: the mode) */
                        r[p] = amax[p] >= 0x7F800000u ? 0x7FC00000u : v;
                    }
                }
            }
        }
        if (J->cols)
            for (int kk = 0; kk < K; kk++)
                memcpy(J->cols + ((size_t)g * K + kk) * T + n * L + l0, A + (size_t)kk * LT, (size_t)cnt * 4);
        /* y[n, o, l] = sum_kk wq[o, kk] * A[kk, l] (+ bias[o]) for the group's M output channels */
        for (int m = 0; m < M; m++) {
            const int64_t o = g * M + m;
            const float *wr = J->w + o * K;
#pragma omp simd
            for (int p = 0; p < cnt; p++) acc[p] = 0.0f;
            for (int kk = 0; kk < K; kk++) {
                const float wv = wr[kk], *r = A + (size_t)kk * LT;
#pragma omp simd
                for (int p = 0; p < cnt; p++) acc[p] += wv * r[p];
            }
            float *yo = J->y + (n * J->O + o) * L + l0;
            if (J->bias) {
                const float bv = J->bias[o];
#pragma omp simd
                for (int p = 0; p < cnt; p++) yo[p] = acc[p] + bv;
            } else {
                memcpy(yo, acc, (size_t)cnt * 4);
            }
        }
    }
}

/* ---- weight gradient: gw[o, kk] = sum_t gyq[o, t] * q(cols[g, kk, t]) -----------------------------------
 * The wgrad GEMM of the recipe blocks both operands along the T = N * Ho * Wo tokens: row (g, kk) of the
 * columns [G, K, T] (kk = (c, i, j)) is quantized in blocks of k consecutive tokens from t = 0 (the last
 * block ragged), exactly like row_block of _mxkernels.c (fake-quantize along the last axis). Item = one row
 * (g, kk): its tokens are gathered a tile of TT (a multiple of k) at a time, each block quantized, and the
 * tile dotted with the group's M rows of gyq (already quantized along T by the caller); sums of each tile
 * in fp32, tiles accumulated in double. J->cols (optional): the quantized rows, [G, K, T]. */
#define WG_TT 512

AINLINE void conv_wgrad_impl(const cjob_t *J, int64_t r0, int64_t r1) {
    const fmt_t F = J->f, *f = &F;
    const int K = J->K, k = f->k, M = J->M, Cg = J->Cg, kh = J->kh, kw = J->kw;
    const int64_t L = J->L, T = J->N * J->L;
    const int tt = k >= WG_TT ? k : WG_TT / k * k;
    float A[MAXK > WG_TT ? MAXK : WG_TT] __attribute__((aligned(64)));
    double accd[CONV_MAXK];
    for (int64_t r = r0; r < r1; r++) {
        const int64_t g = r / K;
        const int kk = (int)(r % K), c = kk / (kh * kw), i = (kk / kw) % kh, j = kk % kw;
        for (int m = 0; m < M; m++) accd[m] = 0.0;
        for (int64_t t0 = 0; t0 < T; t0 += tt) {
            const int cnt = (int)(T - t0 < tt ? T - t0 : tt);
            /* gather tokens t0 .. t0 + cnt - 1 = (n, l) image by image */
            for (int p = 0; p < cnt;) {
                const int64_t t = t0 + p, n = t / L, l = t - n * L;
                const int seg = (int)(L - l < cnt - p ? L - l : cnt - p);
                gather_row(J, J->x + ((n * J->C) + g * Cg + c) * J->H * J->W, i, j, l, seg, A + p);
                p += seg;
            }
            uint32_t *Au = (uint32_t *)A;
            for (int b0 = 0; b0 < cnt; b0 += k) {
                const int nb = cnt - b0 < k ? cnt - b0 : k;
                uint32_t *blk = Au + b0, m = 0;
#pragma omp simd reduction(max:m)
                for (int q = 0; q < nb; q++) { uint32_t ax = blk[q] & 0x7FFFFFFFu; m = ax > m ? ax : m; }
                if (m >= 0x7F800000u) {
                    for (int q = 0; q < nb; q++) blk[q] = 0x7FC00000u;
                    continue;
                }
                const int32_t X = shared_exp(m, J->smode, f), Tc = X + f->emin + 127;
                if (Tc >= 1) {
                    const uint32_t maxb = max_bits(X, f);
#pragma omp simd
                    for (int q = 0; q < nb; q++) { uint32_t cd, v; quant_fast(blk[q], Tc, maxb, f, &cd, &v, 1, 0); blk[q] = v; }
                } else {
#pragma omp simd
                    for (int q = 0; q < nb; q++) { uint32_t cd, v; quant_elem(blk[q], X, 0u, R_EVEN, f, &cd, &v); blk[q] = v; }
                }
            }
            if (J->cols) memcpy(J->cols + ((size_t)g * K + kk) * T + t0, A, (size_t)cnt * 4);
            for (int m = 0; m < M; m++) {
                const float *gr = J->w + ((size_t)g * M + m) * T + t0;   /* (J->w: gyq [G, M, T]) */
                float s = 0.0f;
#pragma omp simd reduction(+:s)
                for (int p = 0; p < cnt; p++) s += gr[p] * A[p];
                accd[m] += (double)s;
            }
        }
        for (int m = 0; m < M; m++) J->y[((size_t)g * M + m) * K + kk] = (float)accd[m];   /* (J->y: gw [O, K]) */
    }
}

typedef void (*conv_worker_fn)(const cjob_t *, int64_t, int64_t);

#define DEFINE_CONV_WORKERS(SFX, ATTR) \
    ATTR static void conv_fwd_##SFX(const cjob_t *J, int64_t a, int64_t b) { conv_fwd_impl(J, a, b); } \
    ATTR static void conv_wgrad_##SFX(const cjob_t *J, int64_t a, int64_t b) { conv_wgrad_impl(J, a, b); }

DEFINE_CONV_WORKERS(base, )
#if defined(__x86_64__) && defined(__GNUC__)
#define CONV_X86 1
DEFINE_CONV_WORKERS(avx2, __attribute__((target("avx2,fma,f16c,bmi2"))))
DEFINE_CONV_WORKERS(avx512, __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2"))))
#endif

static conv_worker_fn C_FWD = conv_fwd_base, C_WGRAD = conv_wgrad_base;
static const char *C_ISA = "baseline";

/* Same rule as the quantization kernels: MICROSCALE_KERNELS_ISA=avx2|baseline caps the variant. */
static void mxconv_select_isa(void) {
#ifdef CONV_X86
    const char *cap = getenv("MICROSCALE_KERNELS_ISA");
    int allow512 = !cap || !strcmp(cap, "avx512"), allow2 = allow512 || (cap && !strcmp(cap, "avx2"));
    __builtin_cpu_init();
    if (allow512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
        C_FWD = conv_fwd_avx512; C_WGRAD = conv_wgrad_avx512; C_ISA = "avx512";
    } else if (allow2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("bmi2")) {
        C_FWD = conv_fwd_avx2; C_WGRAD = conv_wgrad_avx2; C_ISA = "avx2";
    }
#endif
}

/* The format ints of kernels._params, parsed by mx_parse_fmt (_mxkernels.c); single level only. */
int mx_parse_fmt(PyObject *tup, fmt_t *f);
static int conv_parse_fmt(PyObject *tup, fmt_t *f) {
    if (mx_parse_fmt(tup, f)) return -1;
    if (f->k2 != 0) {
        PyErr_SetString(PyExc_ValueError, "conv kernel: unsupported format (single-level, k <= 1024, 2..8 bits)");
        return -1;
    }
    return 0;
}

static int64_t out_size(int64_t in, int p, int d, int k, int s) { return (in + 2 * (int64_t)p - (int64_t)d * (k - 1) - 1) / s + 1; }

/* Items are handed out in chunks of about 1/8 of a thread's share (dynamic schedule: on a shared machine a
 * descheduled thread does not hold the others back at the end, as run_rows of _mxgemm.c). */
static void run_items(conv_worker_fn fn, const cjob_t *J, int64_t items, int nt) {
#ifdef _OPENMP
    if (nt > 1 && items > 1) {
        if (nt > items) nt = (int)items;
        int64_t chunk = items / (8 * (int64_t)nt);
        chunk = chunk < 1 ? 1 : chunk;
        const int64_t nchunks = (items + chunk - 1) / chunk;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
        for (int64_t q = 0; q < nchunks; q++) {
            int64_t a = q * chunk, b = a + chunk < items ? a + chunk : items;
            fn(J, a, b);
        }
        return;
    }
#endif
    (void)nt;
    fn(J, 0, items);
}

/* Parse and check the arguments shared by both entries into J (geometry, format, options). */
static int conv_job(cjob_t *J, PyObject *args, unsigned long long *a, unsigned long long *b, unsigned long long *c,
                    unsigned long long *d, unsigned long long *e, int *nt) {
    long long N, C, H, W, O;
    int G, kh, kw, sh, sw, ph, pw, dh, dw, rnd, smode;
    PyObject *ft;
    if (!PyArg_ParseTuple(args, "KKKKKLLLLLiiiiiiiiiOiii", a, b, c, d, e, &N, &C, &H, &W, &O, &G, &kh,
                          &kw, &sh, &sw, &ph, &pw, &dh, &dw, &ft, &rnd, &smode, nt))
        return -1;
    memset(J, 0, sizeof *J);
    if (conv_parse_fmt(ft, &J->f)) return -1;
    int64_t Ho = 0, Wo = 0;
    int ok = N >= 1 && C >= 1 && H >= 1 && W >= 1 && O >= 1 && G >= 1 && C % G == 0 && O % G == 0 && kh >= 1 &&
             kw >= 1 && sh >= 1 && sw >= 1 && ph >= 0 && pw >= 0 && dh >= 1 && dw >= 1 &&
             rnd >= R_EVEN && rnd <= R_ZERO && smode >= S_FLOOR && smode <= S_RCEIL;
    if (ok) {
        Ho = out_size(H, ph, dh, kh, sh); Wo = out_size(W, pw, dw, kw, sw);
        ok = Ho >= 1 && Wo >= 1 && (C / G) * (int64_t)kh * kw <= CONV_MAXK && O / G <= CONV_MAXK;
    }
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "bad conv kernel arguments");
        return -1;
    }
    J->N = N; J->C = C; J->H = H; J->W = W; J->O = O; J->Ho = Ho; J->Wo = Wo; J->L = Ho * Wo;
    J->G = G; J->Cg = (int)(C / G); J->M = (int)(O / G); J->K = J->Cg * kh * kw;
    J->kh = kh; J->kw = kw; J->sh = sh; J->sw = sw; J->ph = ph; J->pw = pw; J->dh = dh; J->dw = dw;
    J->f.half_mask = rnd == R_ZERO ? 0u : ~0u; J->f.even = rnd == R_EVEN;
    J->smode = smode;
    return 0;
}

/* conv_forward(x, wq, bias_or_0, y, cols_or_0, N, C, H, W, O, G, kh, kw, sh, sw, ph, pw, dh, dw, fmt, rnd,
 *              smode, nthreads): y [N, O, Ho, Wo] (and the quantized windows cols [G, K, N * Ho * Wo]) */
static PyObject *py_conv_forward(PyObject *self, PyObject *args) {
    unsigned long long x, w, bias, y, cols;
    int nt;
    cjob_t J;
    (void)self;
    if (conv_job(&J, args, &x, &w, &bias, &y, &cols, &nt)) return NULL;
    if (!x || !w || !y) {
        PyErr_SetString(PyExc_ValueError, "bad conv kernel arguments (NULL buffer)");
        return NULL;
    }
    J.x = (const float *)(uintptr_t)x; J.w = (const float *)(uintptr_t)w; J.bias = (const float *)(uintptr_t)bias;
    J.y = (float *)(uintptr_t)y; J.cols = (float *)(uintptr_t)cols;
    int lt = CONV_BUF / J.K / 16 * 16;
    J.lt = lt > CONV_MAXLT ? CONV_MAXLT : lt;
    J.ntile = (J.L + J.lt - 1) / J.lt;
    const int64_t items = J.N * J.G * J.ntile;
    Py_BEGIN_ALLOW_THREADS
    run_items(C_FWD, &J, items, nt);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* conv_wgrad(x, gyq, 0, gw, cols_or_0, N, C, H, W, O, G, kh, kw, sh, sw, ph, pw, dh, dw, fmt, rnd, smode,
 *            nthreads): gw [O, K] from gyq [G, O/G, N * Ho * Wo] (quantized along its last axis by the caller)
 * and the columns quantized along the tokens in fmt (cols: those quantized rows, [G, K, N * Ho * Wo]) */
static PyObject *py_conv_wgrad(PyObject *self, PyObject *args) {
    unsigned long long x, gyq, unused, gw, cols;
    int nt;
    cjob_t J;
    (void)self;
    if (conv_job(&J, args, &x, &gyq, &unused, &gw, &cols, &nt)) return NULL;
    if (!x || !gyq || !gw || unused) {
        PyErr_SetString(PyExc_ValueError, "bad conv_wgrad kernel arguments (buffers)");
        return NULL;
    }
    J.x = (const float *)(uintptr_t)x; J.w = (const float *)(uintptr_t)gyq;
    J.y = (float *)(uintptr_t)gw; J.cols = (float *)(uintptr_t)cols;
    const int64_t items = (int64_t)J.G * J.K;
    Py_BEGIN_ALLOW_THREADS
    run_items(C_WGRAD, &J, items, nt);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_conv_info(PyObject *self, PyObject *noargs) {
    (void)self; (void)noargs;
    return Py_BuildValue("{s:s,s:i}", "isa", C_ISA, "max_reduction", CONV_MAXK);
}

static PyMethodDef conv_methods[] = {
    {"conv_forward", py_conv_forward, METH_VARARGS,
     "fused MX grouped convolution: y = conv(fake_quantize(windows), wq) + bias, no im2col"},
    {"conv_wgrad", py_conv_wgrad, METH_VARARGS,
     "fused MX grouped convolution weight gradient: gw = gyq . fake_quantize(columns along tokens)^T, no im2col"},
    {"conv_info", py_conv_info, METH_NOARGS, "build facts of the fused conv kernel: selected ISA, largest reduction"},
    {NULL, NULL, 0, NULL},
};

/* Called from PyInit__mxkernels: selects the ISA variant and adds the functions above to the module. */
int mxconv_add_functions(PyObject *module) {
    mxconv_select_isa();
    return PyModule_AddFunctions(module, conv_methods);
}

/* Fast MX quantization kernels for CPU: fake-quantize, quantize-to-packed and dequantize.
 *
 * Bit-identical to microscale/reference.py (see the Python module microscale/kernels/__init__.py for
 * the design notes). Everything is integer arithmetic on the fp32 bit pattern:
 *   - an input value |v| is decomposed as sig * 2^(e - 23) with sig a normalized 24-bit significand
 *     (subnormals are normalized through an exact int->float conversion, zero gets e = -276);
 *   - the shared exponent X comes from the block amax, found as an integer max of |bits|;
 *   - an element is rounded at shift = 23 - mbits + max(emin - (e - X), 0) bits; the magnitude code is
 *     ((max(e - X - emin, 0)) << mbits) + rounded, monotone in value, so saturation is a clamp;
 *   - dequantized values N * 2^P are built bit by bit (exact: every MX value is an fp32 value), then
 *     rounded to bf16/fp16 with round-to-nearest-even when the output has that dtype.
 *   - two-level BDR formats (MX9/MX6/MX4, any k1/d1/k2/d2; docs/bdr.md) round each element exactly as
 *     above with the exponent X - s_j of its sub-block, s_j = clamp(X + emax - floor(log2 amax_j), 0,
 *     2^d2 - 1) from the sub-block amax bits; their microexponents are packed at d2 bits.
 * No floating-point arithmetic is done on data (only exact int->float conversions), so the results do
 * not depend on MXCSR (FTZ/DAZ) and no denormal slow paths are hit.
 *
 * Tensors are seen as [outer, L, inner] with blocks of k along L. inner == 1 (blocking along the last
 * axis) streams block by block (two-level formats: by chunks of whole blocks, so that short blocks still
 * fill vectors); inner > 1 works on tiles of k rows x up to TILE columns, vectorized across columns.
 *
 * The worker functions are compiled three times (AVX-512, AVX2, baseline x86-64) and chosen at import
 * with __builtin_cpu_supports; OpenMP splits the blocks (or tiles) statically among threads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "_mxscalar.h"

/* ---- the block loops ---------------------------------------------------------------------------
 * MODE 0: fake-quantize (write values), MODE 1: quantize (write packed codes + scales). */
/* One block of rows_impl: n elements (n == k except for a ragged last block) from flat index base. */
AINLINE void row_block(const job_t *J, const fmt_t *f, int64_t b, int64_t base, const int n, const int k,
                       uint32_t *buf, uint32_t *val, uint8_t *cod, const int MODE, const int DT, const int RND) {
    const void *in = J->in; void *out = J->out;
    const uint32_t seed = J->seed;
    uint32_t m = 0;
#pragma omp simd reduction(max:m)
    for (int j = 0; j < n; j++) {
        uint32_t x = load_bits(in, base + j, DT);
        buf[j] = x;
        uint32_t ax = x & 0x7FFFFFFFu;
        m = ax > m ? ax : m;
    }
    for (int j = n; j < k; j++) buf[j] = 0;
    int special = m >= 0x7F800000u;
    int32_t X = shared_exp(m, J->smode, f);
    if (MODE == 0) {
        if (special) {
            for (int j = 0; j < n; j++) store_bits(out, base + j, 0x7FC00000u, DT);
            return;
        }
        const int32_t T = X + f->emin + 127;
        if (RND != R_STOCH && T >= 1) {
            const uint32_t maxb = max_bits(X, f);
#pragma omp simd
            for (int j = 0; j < n; j++) {
                uint32_t c, vv;
                quant_fast(buf[j], T, maxb, f, &c, &vv, 1, 0);
                store_fast(out, base + j, vv, DT);
            }
            return;
        }
#pragma omp simd
        for (int j = 0; j < n; j++) {
            uint32_t u = 0, c;
            if (RND == R_STOCH) u = lowbias32((uint32_t)(base + j) * 0x9E3779B9u + seed);
            quant_elem(buf[j], X, u, RND, f, &c, &val[j]);
        }
#pragma omp simd
        for (int j = 0; j < n; j++) store_bits(out, base + j, val[j], DT);
    } else {
        if (special) {
            memset(cod, 0, (size_t)k);
            J->scales[b] = (uint8_t)f->s_nan;
        } else if (RND != R_STOCH && X + f->emin + 127 >= 1) {
            const int32_t T = X + f->emin + 127;
#pragma omp simd
            for (int j = 0; j < k; j++) {
                uint32_t c, vv;
                quant_fast(buf[j], T, 0u, f, &c, &vv, 0, 1);
                cod[j] = (uint8_t)c;
            }
            J->scales[b] = (uint8_t)(X + f->s_bias);
        } else {
#pragma omp simd
            for (int j = 0; j < k; j++) {
                uint32_t u = 0, c, vv;
                if (RND == R_STOCH) u = lowbias32((uint32_t)(base + j) * 0x9E3779B9u + seed);
                quant_elem(buf[j], X, u, RND, f, &c, &vv);
                cod[j] = (uint8_t)c;
            }
            J->scales[b] = (uint8_t)(X + f->s_bias);
        }
        pack_block(cod, 1, k, f->bits, J->codes + b * (int64_t)(k * f->bits / 8));
    }
}

AINLINE void rows_impl(const job_t *J, int64_t b0, int64_t b1, const int MODE, const int DT, const int RND,
                       const int KC) {
    const fmt_t F = J->f, *f = &F;   /* local copy: no aliasing with the output */
    const int k = KC ? KC : f->k;    /* KC: compile-time block size (the caller checked f->k == KC), or 0 */
    const int64_t L = J->L, nb = J->nb;
    uint32_t buf[MAXK], val[MAXK];
    uint8_t cod[MAXK];
    int64_t v = nb ? b0 / nb : 0, lb = b0 - v * nb;   /* (vector, block in vector) of b, kept incrementally */
    for (int64_t b = b0; b < b1; b++, lb++) {
        if (lb == nb) { lb = 0; v++; }
        int64_t base = v * L + lb * k;
        int n = (int)((L - lb * k) < k ? (L - lb * k) : k);
        if (KC && n == KC) row_block(J, f, b, base, KC, KC, buf, val, cod, MODE, DT, RND);
        else row_block(J, f, b, base, n, k, buf, val, cod, MODE, DT, RND);
    }
}

/* Software prefetch of tile t's input rows (and, fake-quantize, its output rows for writing): a tile
 * reads k row segments of TILE columns far apart in memory, more concurrent streams than the hardware
 * prefetchers follow, so without this every segment waits for memory (axis-0 fake-quantize at ~2.5x a
 * copy). One tile ahead covers the memory latency. */
AINLINE void prefetch_tile(const job_t *J, int64_t t, int64_t ntile, const int MODE, const int DT) {
    const int k = J->f.k;
    const int64_t L = J->L, nb = J->nb, inner = J->inner;
    int64_t it = t % ntile, ol = t / ntile, lb = ol % nb, o = ol / nb;
    int64_t i0 = it * TILE;
    int w = (int)((inner - i0) < TILE ? (inner - i0) : TILE);
    int n = (int)((L - lb * k) < k ? (L - lb * k) : k);
    const int es = DT == DT_F32 ? 4 : 2;
    const char *in = (const char *)J->in, *out = (const char *)J->out;
    int64_t base = (o * L + lb * k) * inner + i0;
    for (int j = 0; j < n; j++) {
        int64_t off = (base + j * inner) * es;
        for (int c = 0; c < w * es; c += 64) {
            __builtin_prefetch(in + off + c, 0, 3);
            if (MODE == 0) __builtin_prefetch(out + off + c, 1, 3);
        }
    }
}

/* Tiles for inner > 1: item t = ((o * nb) + lb) * ntile + it covers rows [lb*k, lb*k+k) and columns
 * [it*TILE, ...) of outer slice o. */
AINLINE void tiles_impl(const job_t *J, int64_t t0, int64_t t1, const int MODE, const int DT, const int RND) {
    const fmt_t F = J->f, *f = &F;
    const int k = f->k;
    const int64_t L = J->L, nb = J->nb, inner = J->inner;
    const int64_t ntile = (inner + TILE - 1) / TILE;
    const void *in = J->in; void *out = J->out;
    const uint32_t seed = J->seed;
    uint32_t amax[TILE], maxb[TILE];
    int32_t X[TILE], Tc[TILE];
    uint8_t cod[TILE * MAXK > 65536 ? 65536 : TILE * MAXK];  /* [row][col] codes of one tile (MODE 1) */
    for (int64_t t = t0; t < t1; t++) {
        int64_t it = t % ntile, ol = t / ntile, lb = ol % nb, o = ol / nb;
        int64_t i0 = it * TILE;
        int w = (int)((inner - i0) < TILE ? (inner - i0) : TILE);
        int n = (int)((L - lb * k) < k ? (L - lb * k) : k);
        int64_t base = (o * L + lb * k) * inner + i0;     /* flat index of (o, lb*k, i0) */
        if (t + 1 < t1) prefetch_tile(J, t + 1, ntile, MODE, DT);
        for (int c = 0; c < w; c++) amax[c] = 0;
        for (int j = 0; j < n; j++) {
#pragma omp simd
            for (int c = 0; c < w; c++) {
                uint32_t ax = load_bits(in, base + j * inner + c, DT) & 0x7FFFFFFFu;
                amax[c] = ax > amax[c] ? ax : amax[c];
            }
        }
        int fast = RND != R_STOCH;
        for (int c = 0; c < w; c++) {
            X[c] = shared_exp(amax[c], J->smode, f);
            Tc[c] = X[c] + f->emin + 127;
            fast &= Tc[c] >= 1;
            /* special (Inf/NaN) columns get NaN values / zero codes below; maxb only has to be defined */
            maxb[c] = amax[c] >= 0x7F800000u ? 0x7FC00000u : max_bits(X[c], f);
        }
        if (fast) {
            for (int j = 0; j < (MODE == 0 ? n : k); j++) {
                int64_t row = base + j * inner;
#pragma omp simd
                for (int c = 0; c < w; c++) {
                    uint32_t x = j < n ? load_bits(in, row + c, DT) : 0u;
                    uint32_t code, vv;
                    if (MODE == 0) {
                        quant_fast(x, Tc[c], maxb[c], f, &code, &vv, 1, 0);
                        vv = amax[c] >= 0x7F800000u ? 0x7FC00000u : vv;
                        store_fast(out, row + c, vv, DT);
                    } else {
                        quant_fast(x, Tc[c], 0u, f, &code, &vv, 0, 1);
                        cod[j * TILE + c] = amax[c] >= 0x7F800000u ? 0 : (uint8_t)code;
                    }
                }
            }
        } else
        for (int j = 0; j < (MODE == 0 ? n : k); j++) {
            int64_t row = base + j * inner;
#pragma omp simd
            for (int c = 0; c < w; c++) {
                uint32_t x = j < n ? load_bits(in, row + c, DT) : 0u;
                uint32_t u = 0, code, vv;
                if (RND == R_STOCH) u = lowbias32((uint32_t)(row + c) * 0x9E3779B9u + seed);
                quant_elem(x, X[c], u, RND, f, &code, &vv);
                if (MODE == 0) {
                    vv = amax[c] >= 0x7F800000u ? 0x7FC00000u : vv;
                    store_bits(out, row + c, vv, DT);
                } else {
                    cod[j * TILE + c] = amax[c] >= 0x7F800000u ? 0 : (uint8_t)code;
                }
            }
        }
        if (MODE == 1) {
            int64_t bytes = (int64_t)k * f->bits / 8;
            for (int c = 0; c < w; c++) {
                int64_t blk = (o * inner + i0 + c) * nb + lb;
                J->scales[blk] = amax[c] >= 0x7F800000u ? (uint8_t)f->s_nan : (uint8_t)(X[c] + f->s_bias);
                pack_block(cod + c, TILE, k, f->bits, J->codes + blk * bytes);
            }
        }
    }
}

/* ---- two-level (BDR microexponent) formats ------------------------------------------------------
 * Rouhani et al., ISCA 2023 §3; reference._quantize_two_level / docs/bdr.md "Two-level rules". A block of
 * k1 = f->k elements gets the shared exponent X of the single-level formats (shared_exp, any scale mode);
 * each k2-element sub-block j gets the microexponent s_j = clamp(X + emax_elem - floor(log2 amax_j), 0,
 * beta) (beta for an all-zero sub-block), and its elements are rounded exactly like single-level elements
 * with the shared exponent X - s_j (quant_elem / quant_fast). A NaN/Inf block gets the NaN scale code,
 * zero codes and zero microexponents, and fake-quantizes to NaN. */

/* Microexponent of a sub-block from its amax bits sa (finite, >= 0) and E = X + emax_elem. */
AINLINE int32_t sub_shift(uint32_t sa, int32_t E, int32_t beta) {
    uint32_t fb = f2u((float)(int32_t)(sa & 0x7FFFFFu));             /* subnormal sa: exact */
    int32_t e = (sa >> 23) ? (int32_t)(sa >> 23) - 127 : (int32_t)(fb >> 23) - 276;
    int32_t s = E - e;
    s = s < 0 ? 0 : (s > beta ? beta : s);
    return sa ? s : beta;
}

/* One (ragged) block of rows2_impl (inner == 1): n < k elements from flat index base, zero padded. Cold
 * (at most one block per row): runtime parameters, one compiled copy. MODE 1 writes the block's
 * microexponents unpacked to J->micro[b * (k / k2) ...] (packed after the parallel loop). */
NOINLINE static void row_block2(const job_t *J, const fmt_t *f, int64_t b, int64_t base, const int n, const int MODE) {
    const int k = f->k, k2 = f->k2, nsub = k / k2, dt = J->idt;
    const int32_t beta = f->beta;
    uint32_t buf[MAXK2], val[MAXK2];
    uint8_t cod[MAXK2];
    uint32_t m = 0;
    load_run(J->in, base, n, dt, buf);
    for (int j = n; j < k; j++) buf[j] = 0;
    for (int j = 0; j < n; j++) m = (buf[j] & 0x7FFFFFFFu) > m ? buf[j] & 0x7FFFFFFFu : m;
    const int special = m >= 0x7F800000u;
    const int32_t X = special ? 0 : shared_exp(m, J->smode, f), E = X + f->emax;
    for (int g = 0; g < nsub; g++) {
        uint32_t sa = 0;
        for (int t = 0; t < k2; t++) sa = (buf[g * k2 + t] & 0x7FFFFFFFu) > sa ? buf[g * k2 + t] & 0x7FFFFFFFu : sa;
        int32_t s = special ? 0 : sub_shift(sa, E, beta);
        for (int t = 0; t < k2; t++) {
            int j = g * k2 + t;
            uint32_t u = 0, c, v;
            if (J->rnd == R_STOCH) {
                u = lowbias32((uint32_t)(base + j) * 0x9E3779B9u + J->seed);
                quant_elem(buf[j], X - s, u, R_STOCH, f, &c, &v);
            } else {
                quant_elem(buf[j], X - s, u, R_EVEN, f, &c, &v);   /* (half_mask/even: the rounding mode) */
            }
            val[j] = special ? 0x7FC00000u : v;
            cod[j] = special ? 0 : (uint8_t)c;
        }
        if (MODE == 1) J->micro[b * nsub + g] = (uint8_t)s;
    }
    if (MODE == 0) {
        store_run(J->out, base, n, dt, val, 0);
    } else {
        J->scales[b] = special ? (uint8_t)f->s_nan : (uint8_t)(X + f->s_bias);
        pack_block(cod, 1, k, f->bits, J->codes + b * (int64_t)(k * f->bits / 8));
    }
}

/* Pairwise max of neighbours (n even): a halving step of the sub-block / block amax. (size_t indices:
 * with -fwrapv, which Python's CFLAGS add, an int index 2 * h is not provably affine, and such loops
 * would use gathers / scatters.) */
AINLINE void halve_max(const uint32_t *src, int n, uint32_t *dst) {
    const size_t m = (size_t)n / 2;
#pragma omp simd
    for (size_t h = 0; h < m; h++) dst[h] = src[2 * h] > src[2 * h + 1] ? src[2 * h] : src[2 * h + 1];
}

/* dst[i] = src[i / r] for i < n * r, r a power of two: log2(r) doubling passes through tmp (each pass
 * vectorizes for a runtime r, unlike a loop over r copies). */
AINLINE void expand_pow2(const uint32_t *src, int n, int r, uint32_t *dst, uint32_t *tmp) {
    if (r == 1) { memcpy(dst, src, (size_t)n * 4); return; }
    const int p = __builtin_ctz((unsigned)r);
    uint32_t *A = (p & 1) ? dst : tmp, *B = (p & 1) ? tmp : dst, *o = A;   /* the last pass writes dst */
    const uint32_t *cur = src;
    for (int q = 0; q < p; q++, n *= 2) {
#pragma omp simd
        for (size_t h = 0; h < (size_t)n; h++) { o[2 * h] = cur[h]; o[2 * h + 1] = cur[h]; }
        cur = o;
        o = o == A ? B : A;
    }
}

/* nblk whole blocks b .. b + nblk - 1, contiguous in the input from flat index base, nblk * k <= CHUNK.
 * The per-element work runs as loops over the whole chunk, long enough to vectorize whatever the block
 * size and input width (a 16-element block alone is shorter than one AVX-512 vector of bf16 values); the
 * per-block and per-sub-block work as loops over blocks and sub-blocks. Same arithmetic as row_block2. */
AINLINE void chunk2(const job_t *J, const fmt_t *f, int64_t b, int64_t base, const int nblk,
                    const int K1, const int K2, const int MODE, const int RND) {
    const void *in = J->in;
    const int dt = J->idt;
    const uint32_t seed = J->seed;
    const int k = K1 ? K1 : f->k, k2 = K2 ? K2 : f->k2, spb = k / k2;   /* spb: sub-blocks per block */
    const int ne = nblk * k, ns = nblk * spb;
    const int32_t beta = f->beta, emin = f->emin;
    uint32_t buf[CHUNK], sa[CHUNK], me[CHUNK], mg[CHUNK], bm[CHUNK], Mb[CHUNK], ve[CHUNK], tmp[CHUNK];
    int32_t xe[CHUNK], xs[CHUNK], sg[CHUNK], Xb[CHUNK], spc[CHUNK];
    uint8_t cod[CHUNK];
    /* compile-time sizes: plain loops over blocks and sub-blocks (unrolled); runtime powers of two: halving
     * and doubling passes (a loop over a runtime number of sub-block elements would not vectorize) */
    const int pow2 = !(K1 && K2) && (k2 & (k2 - 1)) == 0 && (spb & (spb - 1)) == 0;
    /* fp32 bits of the chunk: the input itself for fp32 (a copy would only stall loads on the stores) */
    const uint32_t *a = buf;
    if (dt == DT_F32) a = (const uint32_t *)in + base;
    else load_run(in, base, ne, dt, buf);
    if (pow2) {     /* sub-block and block amax by pairwise halving (vectorizes for runtime sizes) */
        uint32_t *src = tmp, *dst = me;                     /* (me, tmp: scratch until the element loop) */
#pragma omp simd
        for (int i = 0; i < ne; i++) tmp[i] = a[i] & 0x7FFFFFFFu;
        for (int n = ne; n > ns; n >>= 1) { halve_max(src, n, dst); uint32_t *t = src; src = dst; dst = t; }
        memcpy(sa, src, (size_t)ns * 4);
        for (int n = ns; n > nblk; n >>= 1) { halve_max(src, n, dst); uint32_t *t = src; src = dst; dst = t; }
        memcpy(bm, src, (size_t)nblk * 4);
    } else {
        /* (size_t offsets: with -fwrapv, which Python's CFLAGS add, an int index g * k2 + t is not provably
         * affine and the loop would use gathers / scatters) */
        for (int g = 0; g < ns; g++) {
            const uint32_t *ag = a + (size_t)g * k2;
            uint32_t m = 0;
            for (int t = 0; t < k2; t++) m = (ag[t] & 0x7FFFFFFFu) > m ? ag[t] & 0x7FFFFFFFu : m;
            sa[g] = m;
        }
        for (int bb = 0; bb < nblk; bb++) {
            const uint32_t *sb = sa + (size_t)bb * spb;
            uint32_t m = 0;
            for (int t = 0; t < spb; t++) m = sb[t] > m ? sb[t] : m;
            bm[bb] = m;
        }
    }
    /* fast path (quant_fast) for blocks where every element's exponent X - s_j has a normal fp32
     * subnormal threshold (X >= xlo) and the largest element value at X, nmax * 2^(pmaxbase + X), is a
     * finite normal fp32 number (X <= xhi); it is then nb + ((pmaxbase + X) << 23), and at X - s_j it is
     * that minus s_j << 23. Flags: 1 = not fast, 2 = NaN/Inf in the block. */
    const uint32_t nb = f2u((float)f->nmax);   /* fp32 bits of nmax */
    const int32_t xlo = 1 - emin - 127 + beta, xhi = 254 - (int32_t)(nb >> 23) - f->pmaxbase;
    const smode_t smc = smode_consts(J->smode, f);
    uint32_t flags = 0;
#pragma omp simd reduction(|:flags)
    for (int bb = 0; bb < nblk; bb++) {         /* shared exponent X, largest element value at X */
        uint32_t sp = bm[bb] >= 0x7F800000u;
        int32_t X = shared_exp_c(sp ? 0u : bm[bb], smc, f);
        flags |= (sp << 1) | ((sp ^ 1u) & (uint32_t)((X < xlo) | (X > xhi)));
        spc[bb] = (int32_t)sp; Xb[bb] = X; Mb[bb] = nb + ((uint32_t)(f->pmaxbase + X) << 23);
    }
    const int fast = RND != R_STOCH && !(flags & 1), special = flags & 2;
    if (RND != R_STOCH && !fast) {              /* extreme exponents (rare): the cold per-block path */
        for (int bb = 0; bb < nblk; bb++) row_block2(J, f, b + bb, base + (int64_t)bb * k, k, MODE);
        return;
    }
    /* microexponents s_j; xs: X - s_j; mg: largest value at X - s_j (block values first spread to sub-blocks) */
    if (pow2) {
        expand_pow2((const uint32_t *)Xb, nblk, spb, (uint32_t *)xs, tmp);
        expand_pow2(Mb, nblk, spb, mg, tmp);
#pragma omp simd
        for (int g = 0; g < ns; g++) {
            int32_t s = sub_shift(sa[g], xs[g] + f->emax, beta);
            sg[g] = s; xs[g] -= s; mg[g] -= (uint32_t)s << 23;
        }
    } else {
        for (int bb = 0; bb < nblk; bb++) {
            const int32_t X = Xb[bb];
            const uint32_t mb = Mb[bb];
            const size_t g0 = (size_t)bb * spb;
            for (int t = 0; t < spb; t++) {
                int32_t s = sub_shift(sa[g0 + t], X + f->emax, beta);
                sg[g0 + t] = s; xs[g0 + t] = X - s; mg[g0 + t] = mb - ((uint32_t)s << 23);
            }
        }
    }
    if (pow2) {
        expand_pow2((const uint32_t *)xs, ns, k2, (uint32_t *)xe, tmp);
        expand_pow2(mg, ns, k2, me, tmp);
    } else {
        for (int g = 0; g < ns; g++) {
            const size_t i0 = (size_t)g * k2;
            for (int t = 0; t < k2; t++) { xe[i0 + t] = xs[g]; me[i0 + t] = mg[g]; }
        }
    }
    if (MODE == 0) {
        /* values go straight to an fp32 output (same index as read: in place is fine), else through ve[] */
        uint32_t *dst = dt == DT_F32 ? (uint32_t *)J->out + base : ve;
        if (fast) {
#pragma omp simd
            for (int i = 0; i < ne; i++) {
                uint32_t c, v;
                quant_fast(a[i], xe[i] + emin + 127, me[i], f, &c, &v, 1, 0);
                dst[i] = v;
            }
        } else {
#pragma omp simd
            for (int i = 0; i < ne; i++) {
                uint32_t u = 0, c, v;
                if (RND == R_STOCH) u = lowbias32((uint32_t)(base + i) * 0x9E3779B9u + seed);
                quant_elem(a[i], xe[i], u, RND, f, &c, &v);
                dst[i] = v;
            }
        }
        if (special)
            for (int bb = 0; bb < nblk; bb++)
                if (spc[bb]) for (int t = 0; t < k; t++) dst[(size_t)bb * k + t] = 0x7FC00000u;
        if (dt != DT_F32) store_run(J->out, base, ne, dt, ve, fast);
        return;
    }
    if (fast) {
#pragma omp simd
        for (int i = 0; i < ne; i++) {
            uint32_t c, v;
            quant_fast(a[i], xe[i] + emin + 127, 0u, f, &c, &v, 0, 1);
            ve[i] = c;
        }
    } else {
#pragma omp simd
        for (int i = 0; i < ne; i++) {
            uint32_t u = 0, c, v;
            if (RND == R_STOCH) u = lowbias32((uint32_t)(base + i) * 0x9E3779B9u + seed);
            quant_elem(a[i], xe[i], u, RND, f, &c, &v);
            ve[i] = c;
        }
    }
#pragma omp simd
    for (int i = 0; i < ne; i++) cod[i] = (uint8_t)ve[i];
    if (special)
        for (int bb = 0; bb < nblk; bb++)
            if (spc[bb]) {
                memset(cod + (size_t)bb * k, 0, (size_t)k);
                for (int t = 0; t < spb; t++) sg[(size_t)bb * spb + t] = 0;
            }
    uint8_t *sc = J->scales + b, *mic = J->micro + b * spb;   /* (byte stores could alias J) */
    for (int bb = 0; bb < nblk; bb++) sc[bb] = spc[bb] ? (uint8_t)f->s_nan : (uint8_t)(Xb[bb] + f->s_bias);
#pragma omp simd
    for (int g = 0; g < ns; g++) mic[g] = (uint8_t)sg[g];
    pack_block(cod, 1, ne, f->bits, J->codes + b * (int64_t)(k * f->bits / 8));
}

/* Blocks b0 .. b1 - 1 of rows (inner == 1): runs of whole blocks contiguous in memory (across vectors when
 * L is a multiple of k) go by chunks, a ragged last block of a vector by row_block2. */
AINLINE void rows2_impl(const job_t *J, int64_t b0, int64_t b1, const int MODE, const int RND,
                        const int K1, const int K2) {
    const fmt_t F = J->f, *f = &F;
    const int k = K1 ? K1 : f->k;    /* K1, K2: compile-time block / sub-block sizes (checked by the caller), or 0 */
    const int64_t L = J->L, nb = J->nb, nfull = L / k;
    const int cb = CHUNK / k;        /* blocks per chunk */
    int64_t v = nb ? b0 / nb : 0, lb = b0 - v * nb;
    for (int64_t b = b0; b < b1;) {
        if (lb < nfull) {
            int64_t run = b1 - b;
            if (nfull < nb) run = run < nfull - lb ? run : nfull - lb;   /* ragged rows: stay within the row */
            run = run < cb ? run : cb;
            chunk2(J, f, b, v * L + lb * k, (int)run, K1, K2, MODE, RND);
            b += run; lb += run;
        } else {
            row_block2(J, f, b, v * L + lb * k, (int)(L - lb * k), MODE);
            b++; lb++;
        }
        while (lb >= nb) { lb -= nb; v++; }
    }
}

/* Tiles of k rows x up to TILE columns (inner > 1), as tiles_impl; s[g * TILE + c] is the microexponent of
 * sub-block g of column c. */
AINLINE void tiles2_impl(const job_t *J, int64_t t0, int64_t t1, const int MODE, const int RND) {
    const fmt_t F = J->f, *f = &F;
    const int k = f->k, k2 = f->k2, nsub = k / k2;
    const int32_t beta = f->beta, emin = f->emin;
    const int64_t L = J->L, nb = J->nb, inner = J->inner;
    const int64_t ntile = (inner + TILE - 1) / TILE;
    const void *in = J->in;
    const int dt = J->idt;
    const uint32_t seed = J->seed;
    uint32_t row_in[TILE], row_out[TILE];
    /* per-column constants and fast-path bounds as in chunk2 */
    const uint32_t nbits = f2u((float)f->nmax);
    const int32_t xlo = 1 - emin - 127 + beta, xhi = 254 - (int32_t)(nbits >> 23) - f->pmaxbase;
    const smode_t smc = smode_consts(J->smode, f);
    uint32_t amax[TILE], maxb[TILE], spc[TILE];
    int32_t X[TILE], Tc[TILE];
    int32_t s[MAXK2 * TILE];     /* sub-block amax bits, then microexponents: [sub-block][column] */
    uint8_t cod[MAXK2 * TILE];   /* [row][column] codes of one tile (MODE 1) */
    for (int64_t t = t0; t < t1; t++) {
        int64_t it = t % ntile, ol = t / ntile, lb = ol % nb, o = ol / nb;
        int64_t i0 = it * TILE;
        int w = (int)((inner - i0) < TILE ? (inner - i0) : TILE);
        int n = (int)((L - lb * k) < k ? (L - lb * k) : k);
        int64_t base = (o * L + lb * k) * inner + i0;
        /* (row pointers hoisted out of the column loops: with -fwrapv, which Python's CFLAGS add, an
         * int index g * TILE + c is not provably contiguous and would become a scatter / gather) */
        for (int g = 0; g < nsub; g++) {
            int32_t *sg = s + (size_t)g * TILE;
            for (int c = 0; c < w; c++) sg[c] = 0;
        }
        for (int j = 0; j < n; j++) {
            int32_t *sg = s + (j / k2) * TILE;
            const uint32_t *ri = row_in;
            if (dt == DT_F32) ri = (const uint32_t *)in + base + j * inner;
            else load_run(in, base + j * inner, w, dt, row_in);
#pragma omp simd
            for (int c = 0; c < w; c++) {
                uint32_t ax = ri[c] & 0x7FFFFFFFu;
                sg[c] = ax > (uint32_t)sg[c] ? (int32_t)ax : sg[c];
            }
        }
        for (int c = 0; c < w; c++) amax[c] = 0;
        for (int g = 0; g < nsub; g++) {
            const int32_t *sg = s + (size_t)g * TILE;
#pragma omp simd
            for (int c = 0; c < w; c++) amax[c] = (uint32_t)sg[c] > amax[c] ? (uint32_t)sg[c] : amax[c];
        }
        uint32_t flags = 0;   /* 1: some column not fast, 2: some column with NaN/Inf */
#pragma omp simd reduction(|:flags)
        for (int c = 0; c < w; c++) {
            uint32_t sp = amax[c] >= 0x7F800000u;
            int32_t x = shared_exp_c(sp ? 0u : amax[c], smc, f);
            flags |= (sp << 1) | ((sp ^ 1u) & (uint32_t)((x < xlo) | (x > xhi)));
            spc[c] = sp; X[c] = x; Tc[c] = x + emin + 127;
            maxb[c] = nbits + ((uint32_t)(f->pmaxbase + x) << 23);
        }
        const int fast = RND != R_STOCH && !(flags & 1);
        for (int g = 0; g < nsub; g++) {
            int32_t *sg = s + (size_t)g * TILE;
#pragma omp simd
            for (int c = 0; c < w; c++) {   /* (unconditional: a conditional load would not vectorize) */
                int32_t sv = sub_shift((uint32_t)sg[c], X[c] + f->emax, beta);
                sg[c] = spc[c] ? 0 : sv;
            }
        }
        /* NaN/Inf columns: computed like the others (their X is the smallest scale, s = 0), then replaced */
        for (int j = 0; j < (MODE == 0 ? n : k); j++) {
            int64_t row = base + j * inner;
            const int32_t *sg = s + (j / k2) * TILE;
            /* fp32 rows are read and written in place, other dtypes through row_in / row_out */
            const uint32_t *ri = row_in;
            uint32_t *ro = MODE == 0 && dt == DT_F32 ? (uint32_t *)J->out + row : row_out;
            if (j >= n) for (int c = 0; c < w; c++) row_in[c] = 0;
            else if (dt == DT_F32) ri = (const uint32_t *)in + row;
            else load_run(in, row, w, dt, row_in);
            if (fast) {
#pragma omp simd
                for (int c = 0; c < w; c++) {
                    uint32_t code, vv, sv = (uint32_t)sg[c];
                    quant_fast(ri[c], Tc[c] - (int32_t)sv, maxb[c] - (sv << 23), f, &code, &vv, MODE == 0, MODE == 1);
                    ro[c] = MODE == 0 ? (spc[c] ? 0x7FC00000u : vv) : (spc[c] ? 0u : code);
                }
            } else {
#pragma omp simd
                for (int c = 0; c < w; c++) {
                    uint32_t u = 0, code, vv;
                    if (RND == R_STOCH) u = lowbias32((uint32_t)(row + c) * 0x9E3779B9u + seed);
                    quant_elem(ri[c], X[c] - sg[c], u, RND, f, &code, &vv);
                    ro[c] = MODE == 0 ? (spc[c] ? 0x7FC00000u : vv) : (spc[c] ? 0u : code);
                }
            }
            if (MODE == 0) { if (dt != DT_F32) store_run(J->out, row, w, dt, row_out, fast); }
            else {
                uint8_t *cj = cod + (size_t)j * TILE;
                for (int c = 0; c < w; c++) cj[c] = (uint8_t)row_out[c];
            }
        }
        if (MODE == 1) {
            int64_t bytes = (int64_t)k * f->bits / 8;
            for (int c = 0; c < w; c++) {
                int64_t blk = (o * inner + i0 + c) * nb + lb;
                J->scales[blk] = spc[c] ? (uint8_t)f->s_nan : (uint8_t)(X[c] + f->s_bias);
                for (int g = 0; g < nsub; g++) J->micro[blk * nsub + g] = (uint8_t)s[g * TILE + c];
                pack_block(cod + c, TILE, k, f->bits, J->codes + blk * bytes);
            }
        }
    }
}

/* Dequantize: blocks (inner == 1) or tiles (inner > 1). ODT may be DT_F64.
 * Fast path: a table of every code's value at X = 0 (normal fp32 numbers), shifted by X through the
 * exponent field; blocks whose X could make a value subnormal or overflow fp32 (|X| > ~110) take the
 * exact element-by-element decode. */
AINLINE void store_deq(void *out, int64_t i, uint32_t v, uint32_t code, int32_t X, int exact, const int ODT,
                       const fmt_t *f) {
    if (ODT == DT_F64) {
        uint64_t v64;
        if (exact) { uint32_t dummy; decode_elem(code, X, 1, f, &dummy, &v64); }
        else { float fv; memcpy(&fv, &v, 4); v64 = d2u((double)fv); }
        ((uint64_t *)out)[i] = v64;
    } else {
        if (exact) { uint64_t dummy; decode_elem(code, X, 0, f, &v, &dummy); }
        store_bits(out, i, v, ODT);
    }
}

AINLINE uint32_t shift_exp(uint32_t t, int32_t X) {
    uint32_t a = t & 0x7FFFFFFFu;
    return (a - 1u < 0x7F7FFFFFu) ? t + ((uint32_t)X << 23) : t;   /* zero, Inf and NaN stay */
}

/* Arithmetic decode (no table lookup, vectorizes without gathers) for blocks whose values are all normal
 * fp32 numbers or zero/Inf/NaN: c1 = (emin + X + 126) << 23, c2 = (emin + X - mb) << 23 (mod 2^32).
 * Codes with an exponent field >= 1 map to (cm << (23 - mb)) + c1, subnormal codes to float(cm) + c2.
 * deq_impl checks it against the decode_elem table at X = 0 before using it. */
AINLINE uint32_t decode_fast(uint32_t code, uint32_t c1, uint32_t c2, const fmt_t *f) {
    const int32_t mb = f->mbits, bits = f->bits;
    const uint32_t fpm = f->enc == ENC_FP ? ~0u : 0u;
    uint32_t sbit = (code >> (bits - 1)) & 1u;
    int32_t sv = (int32_t)code - (int32_t)((code & (1u << (bits - 1))) << 1);
    int32_t asv = sv < 0 ? -sv : sv;
    uint32_t cm = f->enc == ENC_TWOS ? (uint32_t)asv : code & ((1u << (bits - 1)) - 1u);
    uint32_t fb = f2u((float)(int32_t)cm) + c2;
    uint32_t nb = (cm << (23 - mb)) + c1;
    uint32_t v = cm >= (1u << mb) ? nb : fb;
    uint32_t nz = (uint32_t)((int32_t)(0u - cm) >> 31);               /* cm != 0 */
    v &= nz;
    uint32_t special = fpm & (uint32_t)((int32_t)((uint32_t)f->maxmag - cm) >> 31);   /* cm > maxmag */
    uint32_t isinf = special & (cm == (uint32_t)f->inf_mag ? ~0u : 0u);
    uint32_t isnan = special & ~isinf;
    v = (v & ~special) | (isinf & 0x7F800000u) | (isnan & 0x7FC00000u);
    uint32_t sg = (sbit << 31) & (fpm | nz) & ~isnan;
    return v | sg;
}

/* Dequantize set-up shared by the single- and two-level paths: T[c] = fp32 bits of code c at scale 2^0,
 * [elo, ehi] = the biased fp32 exponents of its nonzero finite values, and whether decode_fast (integer
 * arithmetic on the code) reproduces the table for every code (returned). */
static int decode_table(const fmt_t *f, uint32_t T[256], int32_t *elo_out, int32_t *ehi_out) {
    int32_t elo = 255, ehi = 0;
    for (uint32_t c = 0; c < (1u << f->bits); c++) {
        uint64_t d64;
        decode_elem(c, 0, 0, f, &T[c], &d64);
        uint32_t a = T[c] & 0x7FFFFFFFu;
        if (a && a < 0x7F800000u) {
            int32_t e = (int32_t)(a >> 23);
            elo = e < elo ? e : elo; ehi = e > ehi ? e : ehi;
        }
    }
    int arith = f->mbits <= 23;
    for (uint32_t c = 0; c < (1u << f->bits); c++)
        arith &= decode_fast(c, (uint32_t)(f->emin + 126) << 23, (uint32_t)(f->emin - f->mbits) << 23, f) == T[c];
    *elo_out = elo;
    *ehi_out = ehi;
    return arith;
}

AINLINE void deq_impl(const job_t *J, int64_t t0, int64_t t1, const int ODT) {
    const fmt_t F = J->f, *f = &F;
    const int k = f->k;
    const int64_t L = J->L, nb = J->nb, inner = J->inner;
    void *out = J->out;
    const int64_t bytes = (int64_t)k * f->bits / 8;
    uint32_t T[256];
    int32_t elo, ehi;
    const int arith = decode_table(f, T, &elo, &ehi);
    const uint32_t NANB = 0x7FC00000u;
    uint8_t cod[MAXK];
    if (inner == 1) {
        for (int64_t b = t0; b < t1; b++) {
            int64_t v = b / nb, lb = b - v * nb, base = v * L + lb * k;
            int n = (int)((L - lb * k) < k ? (L - lb * k) : k);
            int32_t X = (int32_t)J->scales[b] - f->s_bias;
            unpack_block(J->codes + b * bytes, k, f->bits, cod);
            if (J->scales[b] == f->s_nan) {
                for (int j = 0; j < n; j++) store_deq(out, base + j, NANB, 0, 0, 0, ODT, f);
            } else if (arith && X + elo >= 1 && X + ehi <= 254) {
                const uint32_t c1 = (uint32_t)(f->emin + X + 126) << 23, c2 = (uint32_t)(f->emin + X - f->mbits) << 23;
#pragma omp simd
                for (int j = 0; j < n; j++) store_deq(out, base + j, decode_fast(cod[j], c1, c2, f), 0, 0, 0, ODT, f);
            } else if (X + elo >= 1 && X + ehi <= 254) {
#pragma omp simd
                for (int j = 0; j < n; j++) store_deq(out, base + j, shift_exp(T[cod[j]], X), 0, 0, 0, ODT, f);
            } else {
                for (int j = 0; j < n; j++) store_deq(out, base + j, 0, cod[j], X, 1, ODT, f);
            }
        }
        return;
    }
    const int64_t ntile = (inner + TILE - 1) / TILE;
    uint8_t tc[TILE * MAXK > 65536 ? 65536 : TILE * MAXK];
    int32_t X[TILE];
    uint32_t nanm[TILE];
    for (int64_t t = t0; t < t1; t++) {
        int64_t it = t % ntile, ol = t / ntile, lb = ol % nb, o = ol / nb;
        int64_t i0 = it * TILE;
        int w = (int)((inner - i0) < TILE ? (inner - i0) : TILE);
        int n = (int)((L - lb * k) < k ? (L - lb * k) : k);
        int64_t base = (o * L + lb * k) * inner + i0;
        int safe = 1;
        for (int c = 0; c < w; c++) {
            int64_t blk = (o * inner + i0 + c) * nb + lb;
            X[c] = (int32_t)J->scales[blk] - f->s_bias;
            nanm[c] = J->scales[blk] == f->s_nan ? ~0u : 0u;
            safe &= nanm[c] || (X[c] + elo >= 1 && X[c] + ehi <= 254);
            unpack_block(J->codes + blk * bytes, k, f->bits, cod);
            for (int j = 0; j < n; j++) tc[j * TILE + c] = cod[j];
        }
        for (int j = 0; j < n; j++) {
            int64_t row = base + j * inner;
            if (safe) {
#pragma omp simd
                for (int c = 0; c < w; c++) {
                    uint32_t v = shift_exp(T[tc[j * TILE + c]], X[c]);
                    store_deq(out, row + c, (v & ~nanm[c]) | (NANB & nanm[c]), 0, 0, 0, ODT, f);
                }
            } else {
                for (int c = 0; c < w; c++)
                    store_deq(out, row + c, NANB, tc[j * TILE + c], X[c], !nanm[c], ODT, f);
            }
        }
    }
}

/* Microexponent idx of the packed little-endian d2-bit stream p (packing.py); reads no byte past it. */
AINLINE uint32_t get_micro(const uint8_t *p, int64_t idx, int d2) {
    int64_t bit = idx * d2, by = bit >> 3;
    int sh = (int)(bit & 7);
    uint32_t v = p[by];
    if (sh + d2 > 8) v |= (uint32_t)p[by + 1] << 8;
    return (v >> sh) & ((1u << d2) - 1u);
}

/* n d2-bit fields of the little-endian stream p from bit offset bitoff (packing.py), one per byte of dst. */
AINLINE void unpack_bits(const uint8_t *p, int64_t bitoff, int n, int bits, uint8_t *dst) {
    int64_t by = bitoff >> 3;
    uint32_t acc = (uint32_t)p[by++] >> (bitoff & 7);
    int have = 8 - (int)(bitoff & 7);
    const uint32_t mask = (1u << bits) - 1u;
    for (int j = 0; j < n; j++) {
        if (have < bits) { acc |= (uint32_t)p[by++] << have; have += 8; }   /* bits <= 8: one byte suffices */
        dst[j] = (uint8_t)(acc & mask);
        acc >>= bits; have -= bits;
    }
}

/* Output of dequantized fp32 bits v[0 .. n) (fast: every value is a normal fp32 number, zero, Inf or NaN)
 * at out[base ..] of runtime dtype odt, or, for blocks that are not fast, the exact decode of each code
 * with its exponent xe[i] (fp64 outputs: exact in float64 even beyond the fp32 range). */
AINLINE void deq_store_run(void *out, int64_t base, int n, int odt, const uint32_t *v, const uint32_t *cw,
                           const int32_t *xe, int fast, const uint32_t *nanm, const fmt_t *f) {
    if (odt == DT_F64) {
        if (fast) {
#pragma omp simd
            for (int i = 0; i < n; i++) store_deq(out, base + i, v[i], 0, 0, 0, DT_F64, f);
        } else {
            for (int i = 0; i < n; i++) {
                if (nanm[i]) store_deq(out, base + i, 0x7FC00000u, 0, 0, 0, DT_F64, f);
                else store_deq(out, base + i, 0, cw[i], xe[i], 1, DT_F64, f);
            }
        }
    } else if (odt != DT_F32) {
        store_run(out, base, n, odt, v, 0);
    }
}

/* fp32 bits of codes cw[i] at exponents xe[i]: arithmetic decode, table, or exact (see deq_impl); the
 * canonical NaN where the mask nanm[i] is set (a NaN scale). */
AINLINE void deq_values(uint32_t *dst, int n, const uint32_t *cw, const int32_t *xe, const uint32_t *nanm,
                        int safe, int arith, const uint32_t *T, const fmt_t *f) {
    if (safe && arith) {
#pragma omp simd
        for (int i = 0; i < n; i++) {
            const uint32_t c1 = (uint32_t)(f->emin + xe[i] + 126) << 23, c2 = (uint32_t)(f->emin + xe[i] - f->mbits) << 23;
            dst[i] = (decode_fast(cw[i], c1, c2, f) & ~nanm[i]) | (0x7FC00000u & nanm[i]);
        }
    } else if (safe) {
#pragma omp simd
        for (int i = 0; i < n; i++) dst[i] = (shift_exp(T[cw[i]], xe[i]) & ~nanm[i]) | (0x7FC00000u & nanm[i]);
    } else {
        for (int i = 0; i < n; i++) {
            uint32_t v;
            uint64_t d64;
            decode_elem(cw[i], xe[i], 0, f, &v, &d64);
            dst[i] = nanm[i] ? 0x7FC00000u : v;
        }
    }
}

/* Dequantize nblk whole blocks b .. b + nblk - 1, contiguous in the output from flat index base (as
 * chunk2). The output dtype is a runtime value; fp32 values are written in place. */
AINLINE void deq_chunk2(const job_t *J, const fmt_t *f, int64_t b, int64_t base, const int nblk,
                        const uint32_t *T, int32_t elo, int32_t ehi, int arith, const int K1, const int K2) {
    const int k = K1 ? K1 : f->k, k2 = K2 ? K2 : f->k2, spb = k / k2, ne = nblk * k, ns = nblk * spb;
    const int32_t beta = f->beta;
    uint8_t cod[CHUNK], ms[CHUNK];
    int32_t xs[CHUNK], xe[CHUNK];
    uint32_t cw[CHUNK], ns_nan[CHUNK], nanm[CHUNK], vb[CHUNK];
    unpack_block(J->codes + b * (int64_t)(k * f->bits / 8), ne, f->bits, cod);
    const int64_t mbit = b * spb * (int64_t)f->d2;
    if (mbit % 8 == 0 && ns % 8 == 0) unpack_block(J->micro + mbit / 8, ns, f->d2, ms);
    else unpack_bits(J->micro, mbit, ns, f->d2, ms);
    int safe = 1;
    int32_t Xb[CHUNK];
    uint32_t nb_[CHUNK], tmp[CHUNK];
    for (int bb = 0; bb < nblk; bb++) {
        uint32_t sc = J->scales[b + bb];
        int32_t X = (int32_t)sc - f->s_bias;
        int isnan = sc == (uint32_t)f->s_nan;
        safe &= isnan || (X - beta + elo >= 1 && X + ehi <= 254);
        Xb[bb] = X;
        nb_[bb] = isnan ? ~0u : 0u;
    }
    /* block values to sub-blocks, X - s_j, then to elements (as chunk2) */
    if (!(K1 && K2) && (k2 & (k2 - 1)) == 0 && (spb & (spb - 1)) == 0) {
        expand_pow2((const uint32_t *)Xb, nblk, spb, (uint32_t *)xs, tmp);
        expand_pow2(nb_, nblk, spb, ns_nan, tmp);
#pragma omp simd
        for (int g = 0; g < ns; g++) xs[g] -= (int32_t)ms[g];
        expand_pow2((const uint32_t *)xs, ns, k2, (uint32_t *)xe, tmp);
        expand_pow2(ns_nan, ns, k2, nanm, tmp);
    } else {
        for (int bb = 0; bb < nblk; bb++) {
            const size_t g0 = (size_t)bb * spb;     /* (size_t offsets: see chunk2) */
            for (int t = 0; t < spb; t++) {
                const int32_t xg = Xb[bb] - (int32_t)ms[g0 + t];
                const size_t i0 = (g0 + t) * k2;
                for (int u = 0; u < k2; u++) { xe[i0 + u] = xg; nanm[i0 + u] = nb_[bb]; }
            }
        }
    }
#pragma omp simd
    for (int i = 0; i < ne; i++) cw[i] = cod[i];
    const int odt = J->odt;
    uint32_t *dst = odt == DT_F32 ? (uint32_t *)J->out + base : vb;
    deq_values(dst, ne, cw, xe, nanm, safe, arith, T, f);
    deq_store_run(J->out, base, ne, odt, vb, cw, xe, safe, nanm, f);
}

/* One ragged block (n < k elements) of deq2_impl; cold: runtime parameters, one compiled copy. */
NOINLINE static void deq_block2(const job_t *J, const fmt_t *f, int64_t b, int64_t base, int n) {
    const int k = f->k, k2 = f->k2, nsub = k / k2;
    uint8_t cod[MAXK2];
    uint32_t cw[MAXK2], nanm[MAXK2], vb[MAXK2];
    int32_t xe[MAXK2];
    unpack_block(J->codes + b * (int64_t)(k * f->bits / 8), k, f->bits, cod);
    const int32_t X = (int32_t)J->scales[b] - f->s_bias;
    const uint32_t nan = J->scales[b] == f->s_nan ? ~0u : 0u;
    for (int j = 0; j < n; j++) {
        cw[j] = cod[j];
        xe[j] = X - (int32_t)get_micro(J->micro, b * nsub + j / k2, f->d2);
        nanm[j] = nan;
    }
    deq_values(vb, n, cw, xe, nanm, 0, 0, NULL, f);   /* exact decode */
    if (J->odt == DT_F32) memcpy((uint32_t *)J->out + base, vb, (size_t)n * 4);
    else deq_store_run(J->out, base, n, J->odt, vb, cw, xe, 0, nanm, f);
}

/* Dequantize of two-level formats: as deq_impl, each element decoded with the exponent X - s_j of its
 * sub-block (value = element value x 2^(X - s_j); NaN for the NaN scale code). */
AINLINE void deq2_impl(const job_t *J, int64_t t0, int64_t t1, const int K1, const int K2) {
    const fmt_t F = J->f, *f = &F;
    const int k = K1 ? K1 : f->k, k2 = K2 ? K2 : f->k2, d2 = f->d2, nsub = k / k2;
    const int32_t beta = f->beta;
    const int64_t L = J->L, nb = J->nb, inner = J->inner;
    const int odt = J->odt;
    const int64_t bytes = (int64_t)k * f->bits / 8;
    uint32_t T[256];
    int32_t elo, ehi;
    const int arith = decode_table(f, T, &elo, &ehi);
    if (inner == 1) {
        const int64_t nfull = L / k;
        const int cb = CHUNK / k;
        int64_t v = nb ? t0 / nb : 0, lb = t0 - v * nb;
        for (int64_t b = t0; b < t1;) {
            if (lb < nfull) {     /* runs of whole blocks by chunks, as rows2_impl */
                int64_t run = t1 - b;
                if (nfull < nb) run = run < nfull - lb ? run : nfull - lb;
                run = run < cb ? run : cb;
                deq_chunk2(J, f, b, v * L + lb * k, (int)run, T, elo, ehi, arith, K1, K2);
                b += run; lb += run;
            } else {
                deq_block2(J, f, b, v * L + lb * k, (int)(L - lb * k));
                b++; lb++;
            }
            while (lb >= nb) { lb -= nb; v++; }
        }
        return;
    }
    const int64_t ntile = (inner + TILE - 1) / TILE;
    uint8_t tc[MAXK2 * TILE], cod[MAXK2];
    int32_t s[MAXK2 * TILE];     /* [sub-block][column] */
    int32_t X[TILE], xr[TILE];
    uint32_t nanm[TILE], cw[TILE], vb[TILE];
    for (int64_t t = t0; t < t1; t++) {
        int64_t it = t % ntile, ol = t / ntile, lb = ol % nb, o = ol / nb;
        int64_t i0 = it * TILE;
        int w = (int)((inner - i0) < TILE ? (inner - i0) : TILE);
        int n = (int)((L - lb * k) < k ? (L - lb * k) : k);
        int64_t base = (o * L + lb * k) * inner + i0;
        int safe = 1;
        for (int c = 0; c < w; c++) {
            int64_t blk = (o * inner + i0 + c) * nb + lb;
            X[c] = (int32_t)J->scales[blk] - f->s_bias;
            nanm[c] = J->scales[blk] == f->s_nan ? ~0u : 0u;
            safe &= nanm[c] || (X[c] - beta + elo >= 1 && X[c] + ehi <= 254);
            unpack_block(J->codes + blk * bytes, k, f->bits, cod);
            for (int j = 0; j < n; j++) tc[j * TILE + c] = cod[j];
            for (int g = 0; g < nsub; g++) s[g * TILE + c] = (int32_t)get_micro(J->micro, blk * nsub + g, d2);
        }
        for (int j = 0; j < n; j++) {
            int64_t row = base + j * inner;
            const int32_t *sg = s + (j / k2) * TILE;
            const uint8_t *tj = tc + (size_t)j * TILE;
#pragma omp simd
            for (int c = 0; c < w; c++) { cw[c] = tj[c]; xr[c] = X[c] - sg[c]; }
            uint32_t *dst = odt == DT_F32 ? (uint32_t *)J->out + row : vb;
            deq_values(dst, w, cw, xr, nanm, safe, arith, T, f);
            deq_store_run(J->out, row, w, odt, vb, cw, xr, safe, nanm, f);
        }
    }
}

/* Dispatch runtime parameters to specialized (constant-folded) instances: input dtype x
 * {deterministic, stochastic} rounding x {rows, tiles}. The element encoding and the deterministic
 * rounding mode are runtime values inside the loops (a few selects), which keeps the build small. */
AINLINE void quant_dispatch(const job_t *J, int64_t a, int64_t b, const int MODE) {
#define Q_CALL_R(DT, R) do { if (J->inner == 1) { if (R != R_STOCH && J->f.k == 32) rows_impl(J, a, b, MODE, DT, R, 32); \
                                                       else rows_impl(J, a, b, MODE, DT, R, 0); } \
                             else tiles_impl(J, a, b, MODE, DT, R); } while (0)
    /* two-level formats: the input dtype is a runtime value (load_run/store_run); MX9/MX6/MX4's k1 = 16,
     * k2 = 2 get a compile-time instance for deterministic rounding */
#define Q_CALL_2(R) do { if (J->inner != 1) tiles2_impl(J, a, b, MODE, R); \
                          else if (R != R_STOCH && J->f.k == 16 && J->f.k2 == 2) rows2_impl(J, a, b, MODE, R, 16, 2); \
                          else rows2_impl(J, a, b, MODE, R, 0, 0); } while (0)
#define Q_CALL_D(DT) do { if (J->rnd == R_STOCH) Q_CALL_R(DT, R_STOCH); else Q_CALL_R(DT, R_EVEN); } while (0)
    if (J->f.k2) {
        if (J->rnd == R_STOCH) Q_CALL_2(R_STOCH);
        else Q_CALL_2(R_EVEN);
        return;
    }
    switch (J->idt) {
    case DT_F32: Q_CALL_D(DT_F32); break;
    case DT_BF16: Q_CALL_D(DT_BF16); break;
    default: Q_CALL_D(DT_F16); break;
    }
#undef Q_CALL_R
#undef Q_CALL_2
#undef Q_CALL_D
}

AINLINE void deq_dispatch(const job_t *J, int64_t a, int64_t b) {
    if (J->f.k2) {   /* two-level: the output dtype is a runtime value; MX9/MX6/MX4 get a compile-time instance */
        if (J->inner == 1 && J->f.k == 16 && J->f.k2 == 2) deq2_impl(J, a, b, 16, 2);
        else deq2_impl(J, a, b, 0, 0);
        return;
    }
    switch (J->odt) {
    case DT_F32: deq_impl(J, a, b, DT_F32); break;
    case DT_BF16: deq_impl(J, a, b, DT_BF16); break;
    case DT_F16: deq_impl(J, a, b, DT_F16); break;
    default: deq_impl(J, a, b, DT_F64); break;
    }
}

typedef void (*worker_fn)(const job_t *, int64_t, int64_t);

#define DEFINE_WORKERS(SFX, ATTR) \
    ATTR static void fq_##SFX(const job_t *J, int64_t a, int64_t b) { quant_dispatch(J, a, b, 0); } \
    ATTR static void qz_##SFX(const job_t *J, int64_t a, int64_t b) { quant_dispatch(J, a, b, 1); } \
    ATTR static void dq_##SFX(const job_t *J, int64_t a, int64_t b) { deq_dispatch(J, a, b); }

DEFINE_WORKERS(base, )
#if defined(__x86_64__) && defined(__GNUC__)
#define HAVE_X86_VARIANTS 1
DEFINE_WORKERS(avx2, __attribute__((target("avx2,fma,f16c,bmi2"))))
DEFINE_WORKERS(avx512, __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2"))))
#endif

static worker_fn W_FQ = fq_base, W_QZ = qz_base, W_DQ = dq_base;
static const char *ISA = "baseline";

/* MICROSCALE_KERNELS_ISA=avx2|baseline caps the variant (so tests can run every variant on one CPU). */
static void select_isa(void) {
#ifdef HAVE_X86_VARIANTS
    const char *cap = getenv("MICROSCALE_KERNELS_ISA");
    int allow512 = !cap || !strcmp(cap, "avx512"), allow2 = allow512 || (cap && !strcmp(cap, "avx2"));
    __builtin_cpu_init();
    if (allow512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
        W_FQ = fq_avx512; W_QZ = qz_avx512; W_DQ = dq_avx512; ISA = "avx512";
    } else if (allow2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("bmi2")) {
        W_FQ = fq_avx2; W_QZ = qz_avx2; W_DQ = dq_avx2; ISA = "avx2";
    }
#endif
}

static void run_parallel(worker_fn fn, const job_t *J, int64_t nitems, int nthreads) {
#ifdef _OPENMP
    if (nthreads > 1 && nitems > 1) {
        if (nthreads > nitems) nthreads = (int)nitems;
#pragma omp parallel num_threads(nthreads)
        {
            int t = omp_get_thread_num(), nt = omp_get_num_threads();
            int64_t a = nitems * t / nt, b = nitems * (t + 1) / nt;
            fn(J, a, b);
        }
        return;
    }
#endif
    (void)nthreads;
    fn(J, 0, nitems);
}

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
static int parse_fmt(PyObject *tup, fmt_t *f) {
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

/* Pack n one-byte codes of `bits` bits (< 8) into the little-endian bit stream of packing.py: groups of 8
 * codes fill `bits` bytes; the last group writes only the bytes the stream has (ceil(n * bits / 8)). */
static void pack_stream(const uint8_t *src, uint8_t *dst, int64_t n, int bits, int nthreads) {
    const int64_t ngroups = (n + 7) / 8, nbytes = (n * bits + 7) / 8;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && ngroups > 4096)
#endif
    for (int64_t g = 0; g < ngroups; g++) {
        uint64_t x = 0;
        if (8 * g + 8 <= n) memcpy(&x, src + 8 * g, 8);
        else memcpy(&x, src + 8 * g, (size_t)(n - 8 * g));
        uint64_t acc = MX_LE ? pack8xb(x, bits) : 0;
        if (!MX_LE)
            for (int t = 0; t < 8 && 8 * g + t < n; t++) acc |= (uint64_t)src[8 * g + t] << (t * bits);
        for (int i = 0; i < bits && g * bits + i < nbytes; i++) dst[g * bits + i] = (uint8_t)(acc >> (8 * i));
    }
    (void)nthreads;
}

static int64_t n_items(const job_t *J) {
    if (J->inner == 1) return J->outer * J->nb;
    return J->outer * J->nb * ((J->inner + TILE - 1) / TILE);
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
    if (parse_fmt(ft, &J.f)) return NULL;
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
    int64_t items = n_items(&J);
    Py_BEGIN_ALLOW_THREADS
    if (mode == 0) advise_hugepages(J.out, outer * L * inner * (dt == DT_F32 ? 4 : 2));
    else advise_hugepages(J.codes, outer * J.nb * J.f.k * J.f.bits / 8);
    run_parallel(mode == 0 ? W_FQ : W_QZ, &J, items, nt);
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
    if (parse_fmt(ft, &J.f)) return NULL;
    if (dt < DT_F32 || dt > DT_F64 || L < 1 || (J.f.k2 && !micro)) {
        PyErr_SetString(PyExc_ValueError, "bad kernel arguments");
        return NULL;
    }
    J.codes = (uint8_t *)(uintptr_t)codes; J.scales = (uint8_t *)(uintptr_t)scales;
    J.out = (void *)(uintptr_t)out; J.micro = (uint8_t *)(uintptr_t)micro;
    J.outer = outer; J.L = L; J.inner = inner; J.nb = (L + J.f.k - 1) / J.f.k; J.odt = dt;
    int64_t items = n_items(&J);
    Py_BEGIN_ALLOW_THREADS
    advise_hugepages(J.out, outer * L * inner * (dt == DT_F32 ? 4 : (dt == DT_F64 ? 8 : 2)));
    run_parallel(W_DQ, &J, items, nt);
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
    select_isa();
    PyObject *m = PyModule_Create(&moddef);
    if (m && mxgemm_add_functions(m) < 0) { Py_DECREF(m); return NULL; }
    { extern int mxconv_add_functions(PyObject *); if (m && mxconv_add_functions(m) < 0) { Py_DECREF(m); return NULL; } }  /* _mxconv.c */
    return m;
}

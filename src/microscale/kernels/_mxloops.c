/* The loops of the fast MX quantization kernels for CPU: fake-quantize, quantize-to-packed, dequantize.
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
 * One family of loops serves both kinds of format: a single-level format is the two-level case with
 * one sub-block per block (k2 = k) and no microexponent (s_j = 0). The compile-time parameter MICRO (0 or
 * 1) selects which, like MODE / DT / RND / K1 / K2 (all constant-folded through always-inline functions),
 * so the single-level instances carry none of the sub-block work.
 *
 * Tensors are seen as [outer, L, inner] with blocks of k along L. inner == 1 (blocking along the last
 * axis) goes by chunks of whole blocks (so that short blocks still fill vectors; a ragged last block of a
 * row is a chunk of one zero-padded block); inner > 1 works on tiles of k rows x up to TILE columns,
 * vectorized across columns.
 *
 * The worker functions are compiled three times (AVX-512, AVX2, baseline x86-64) and chosen at import
 * with __builtin_cpu_supports; OpenMP splits the blocks (or tiles) statically among threads.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "_mxscalar.h"
#include "_mxloops.h"

/* ---- compile-time parameters of the loops ---------------------------------------------------------
 * MODE  0: fake-quantize (write values), 1: quantize (write codes + scales [+ microexponents])
 * DT    input (quantize) or output (dequantize) dtype, or DT_ANY: the runtime J->idt / J->odt (two-level
 *       formats: the dtype only changes the load / store runs, which keeps the build small)
 * RND   R_STOCH, or R_EVEN for every deterministic mode (half_mask / even of fmt_t carry the mode)
 * K1    block size, or 0: the runtime f->k
 * K2    sub-block size (MICRO only), or 0: the runtime f->k2
 * MICRO 1: two-level format (k2-element sub-blocks with a microexponent), 0: single level (k2 = k, s = 0)
 */
#define DT_ANY (-1)
/* ISA   the variant being compiled (ISA_BASE / ISA_AVX2 / ISA_AVX512): selects intrinsic primitives */
enum { ISA_BASE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
#if defined(__x86_64__) && defined(__GNUC__)
#define HAVE_X86_VARIANTS 1
#endif
/* elements per chunk of whole blocks in the row loops (a block larger than this is a chunk by itself) */
#define CHUNKMAX (CHUNK > MAXK ? CHUNK : MAXK)

/* ---- two-level pieces (Rouhani et al., ISCA 2023 §3; reference._quantize_two_level, docs/bdr.md
 * "Two-level rules"). A block of k1 = f->k elements gets the shared exponent X of the single-level formats
 * (shared_exp, any scale mode); each k2-element sub-block j gets the microexponent s_j = clamp(X +
 * emax_elem - floor(log2 amax_j), 0, beta) (beta for an all-zero sub-block), and its elements are rounded
 * exactly like single-level elements with the shared exponent X - s_j (quant_elem / quant_fast). A
 * NaN/Inf block gets the NaN scale code, zero codes and zero microexponents, and fake-quantizes to NaN. */

/* Microexponent of a sub-block from its amax bits sa (finite, >= 0) and E = X + emax_elem. */
AINLINE int32_t sub_shift(uint32_t sa, int32_t E, int32_t beta) {
    uint32_t fb = f2u((float)(int32_t)(sa & 0x7FFFFFu));             /* subnormal sa: exact */
    int32_t e = (sa >> 23) ? (int32_t)(sa >> 23) - 127 : (int32_t)(fb >> 23) - 276;
    int32_t s = E - e;
    s = s < 0 ? 0 : (s > beta ? beta : s);
    return sa ? s : beta;
}

/* sub_shift for a block on the fast path (quant_chunk: X >= xlo = 1 - emin - 127 + beta): a subnormal or
 * zero sa then has E - e >= 1 + beta + emax - emin > beta (emax >= emin: the elements' largest exponent),
 * so it clamps to beta like the biased exponent field 0 (e = -127) does, and the exponent is just the field.
 * (A third of two-level bf16 fake-quantize went into the general form.) */
AINLINE int32_t sub_shift_fast(uint32_t sa, int32_t E, int32_t beta) {
    int32_t s = E + 127 - (int32_t)(sa >> 23);
    return s < 0 ? 0 : (s > beta ? beta : s);
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

/* dst[i] = src[i / r] for i < n * r, any r (plain loops; compile-time r unrolls). */
AINLINE void expand_any(const uint32_t *src, int n, int r, uint32_t *dst) {
    for (int g = 0; g < n; g++) {
        const size_t i0 = (size_t)g * r;     /* (size_t offsets: see halve_max) */
        for (int t = 0; t < r; t++) dst[i0 + t] = src[g];
    }
}

/* Software prefetch of tile t's input rows (and, fake-quantize, its output rows for writing): a tile
 * reads k row segments of TILE columns far apart in memory, more concurrent streams than the hardware
 * prefetchers follow, so without this every segment waits for memory (axis-0 fake-quantize at ~2.5x a
 * copy). One tile ahead covers the memory latency. */
AINLINE void prefetch_tile(const job_t *J, int64_t t, int64_t ntile, const int MODE, const int dt) {
    const int k = J->f.k;
    const int64_t L = J->L, nb = J->nb, inner = J->inner;
    int64_t it = t % ntile, ol = t / ntile, lb = ol % nb, o = ol / nb;
    int64_t i0 = it * TILE;
    int w = (int)((inner - i0) < TILE ? (inner - i0) : TILE);
    int n = (int)((L - lb * k) < k ? (L - lb * k) : k);
    const int es = dt == DT_F32 ? 4 : 2;
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

/* ---- quantize / fake-quantize, inner == 1 -------------------------------------------------------- */
/* nblk whole blocks b .. b + nblk - 1, contiguous in the input from flat index base; nv elements are
 * valid (nv == nblk * k, or nv < k for the zero-padded ragged last block of a row, nblk == 1). The
 * per-element work runs as loops over the whole chunk, long enough to vectorize whatever the block size
 * and input width (a 16-element block alone is shorter than one AVX-512 vector of bf16 values); the
 * per-block and per-sub-block work as loops over blocks and sub-blocks. MODE 1 writes the blocks'
 * microexponents unpacked to J->micro[b * (k / k2) ...] (packed after the parallel loop). */
AINLINE void quant_chunk(const job_t *J, const fmt_t *f, int64_t b, int64_t base, const int nblk, const int nv,
                         const int MODE, const int DT, const int RND, const int K1, const int K2, const int MICRO) {
    const void *in = J->in;
    const int dt = DT >= 0 ? DT : J->idt;
    const uint32_t seed = J->seed;
    const int k = K1 ? K1 : f->k;
    const int k2 = MICRO ? (K2 ? K2 : f->k2) : k, spb = MICRO ? k / k2 : 1;   /* spb: sub-blocks per block */
    const int ne = nblk * k, ns = nblk * spb;
    const int32_t beta = MICRO ? f->beta : 0, emin = f->emin;
    uint32_t buf[CHUNKMAX], me[CHUNKMAX], ve[CHUNKMAX], tmp[CHUNKMAX];
    int32_t xe[CHUNKMAX];
    uint32_t bm[CHUNKMAX], Mb[CHUNKMAX], sa[CHUNKMAX];
    int32_t Xb[CHUNKMAX], spc[CHUNKMAX], xs[CHUNKMAX], sg[CHUNKMAX];
    uint8_t cod[CHUNKMAX];
    /* compile-time sizes: plain loops over blocks and sub-blocks (unrolled); runtime powers of two: halving
     * and doubling passes (a loop over a runtime number of sub-block elements would not vectorize) */
    const int pow2 = !(K1 && (K2 || !MICRO)) && (k2 & (k2 - 1)) == 0 && (spb & (spb - 1)) == 0;
    /* fp32 bits of the chunk: the input itself for whole fp32 blocks (a copy would only stall loads on the
     * stores), else converted / zero padded into buf */
    const uint32_t *a = buf;
    if (dt == DT_F32 && nv == ne) a = (const uint32_t *)in + base;
    else {
        load_run(in, base, nv, dt, buf);
        for (int i = nv; i < ne; i++) buf[i] = 0;
    }
    /* software prefetch of the chunk after next (input) and of the next one (output, for writing): the
     * chunk's work is a burst of loads (amax), then a burst of arithmetic and stores, longer than the
     * out-of-order window; without this the loads of a chunk wait for memory (fp32 fake-quantize went
     * from 1.0x to 1.4x a copy when the row loops became chunked) */
    {
        const int es = dt == DT_F32 ? 4 : 2;
        const char *pin = (const char *)in + (base + 2 * (int64_t)ne) * es;
        const char *pout = (const char *)J->out + (base + (int64_t)ne) * es;
        for (int off = 0; off < ne * es; off += 64) {
            __builtin_prefetch(pin + off, 0, 3);
            if (MODE == 0) __builtin_prefetch(pout + off, 1, 3);
        }
    }
    if (pow2) {     /* sub-block and block amax by pairwise halving (vectorizes for runtime sizes) */
        uint32_t *src = tmp, *dst = me;                     /* (me, tmp: scratch until the element loop) */
#pragma omp simd
        for (int i = 0; i < ne; i++) tmp[i] = a[i] & 0x7FFFFFFFu;
        if (MICRO) {
            for (int n = ne; n > ns; n >>= 1) { halve_max(src, n, dst); uint32_t *t = src; src = dst; dst = t; }
            memcpy(sa, src, (size_t)ns * 4);
        }
        for (int n = MICRO ? ns : ne; n > nblk; n >>= 1) { halve_max(src, n, dst); uint32_t *t = src; src = dst; dst = t; }
        memcpy(bm, src, (size_t)nblk * 4);
    } else if (MICRO) {
        /* (size_t offsets: see halve_max) */
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
    } else {
        for (int bb = 0; bb < nblk; bb++) {
            const uint32_t *ab = a + (size_t)bb * k;
            uint32_t m = 0;
#pragma omp simd reduction(max:m)
            for (int t = 0; t < k; t++) m = (ab[t] & 0x7FFFFFFFu) > m ? ab[t] & 0x7FFFFFFFu : m;
            bm[bb] = m;
        }
    }
    /* fast path (quant_fast) for blocks where every element's exponent X - s_j has a normal fp32
     * subnormal threshold (X >= xlo) and the largest element value at X, nmax * 2^(pmaxbase + X), is a
     * finite normal fp32 number (X <= xhi); it is then nb + ((pmaxbase + X) << 23), and at X - s_j it is
     * that minus s_j << 23. Other blocks (extreme exponents, rare) and stochastic rounding: quant_elem.
     * Flags: 1 = not fast, 2 = NaN/Inf in the block. */
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
    /* per-element exponent xe (X - s_j), spread from blocks / sub-blocks; a single-level format of
     * compile-time block size skips this and runs the element loop per block */
    const int per_block = !MICRO && K1;
    if (MICRO) {    /* microexponents s_j (sub_shift_fast on the fast path); xs: X - s_j */
        if (pow2) {
            expand_pow2((const uint32_t *)Xb, nblk, spb, (uint32_t *)xs, tmp);
            if (fast) {
#pragma omp simd
                for (int g = 0; g < ns; g++) {
                    int32_t s = sub_shift_fast(sa[g], xs[g] + f->emax, beta);
                    sg[g] = s; xs[g] -= s;
                }
            } else {
#pragma omp simd
                for (int g = 0; g < ns; g++) {
                    int32_t s = sub_shift(sa[g], xs[g] + f->emax, beta);
                    sg[g] = s; xs[g] -= s;
                }
            }
        } else if (fast) {
            for (int bb = 0; bb < nblk; bb++) {
                const int32_t X = Xb[bb];
                const size_t g0 = (size_t)bb * spb;
                for (int t = 0; t < spb; t++) {
                    int32_t s = sub_shift_fast(sa[g0 + t], X + f->emax, beta);
                    sg[g0 + t] = s; xs[g0 + t] = X - s;
                }
            }
        } else {
            for (int bb = 0; bb < nblk; bb++) {
                const int32_t X = Xb[bb];
                const size_t g0 = (size_t)bb * spb;
                for (int t = 0; t < spb; t++) {
                    int32_t s = sub_shift(sa[g0 + t], X + f->emax, beta);
                    sg[g0 + t] = s; xs[g0 + t] = X - s;
                }
            }
        }
    }
    if (!per_block) {
        const uint32_t *xsrc = MICRO ? (const uint32_t *)xs : (const uint32_t *)Xb;
        if (pow2) expand_pow2(xsrc, ns, k2, (uint32_t *)xe, tmp);
        else expand_any(xsrc, ns, k2, (uint32_t *)xe);
    }
    /* values (MODE 0) or codes (MODE 1) into dst: values straight to a whole fp32 output (same index as
     * read: in place is fine), else through ve[] */
    uint32_t *dst = MODE == 0 && dt == DT_F32 && nv == ne ? (uint32_t *)J->out + base : ve;
    if (fast && per_block) {
        for (int bb = 0; bb < nblk; bb++) {
            const uint32_t *ab = a + (size_t)bb * k;
            uint32_t *db = dst + (size_t)bb * k;
            const int32_t T = Xb[bb] + emin + 127;
            const uint32_t M = Mb[bb];
#pragma omp simd
            for (int t = 0; t < k; t++) {
                uint32_t c, v;
                quant_fast(ab[t], T, M, f, &c, &v, MODE == 0, MODE == 1);
                db[t] = MODE == 0 ? v : c;
            }
        }
    } else if (fast) {
#pragma omp simd
        for (int i = 0; i < ne; i++) {
            uint32_t c, v;
            /* largest value at xe: nb + ((pmaxbase + xe) << 23) as for Mb (recomputed: cheaper than a load of a
             * spread copy) */
            quant_fast(a[i], xe[i] + emin + 127, MODE == 0 ? nb + ((uint32_t)(f->pmaxbase + xe[i]) << 23) : 0u, f,
                       &c, &v, MODE == 0, MODE == 1);
            dst[i] = MODE == 0 ? v : c;
        }
    } else if (per_block) {
        for (int bb = 0; bb < nblk; bb++) {
            const uint32_t *ab = a + (size_t)bb * k;
            uint32_t *db = dst + (size_t)bb * k;
            const int32_t X = Xb[bb];
            const int64_t ib = base + (int64_t)bb * k;
#pragma omp simd
            for (int t = 0; t < k; t++) {
                uint32_t u = 0, c, v;
                if (RND == R_STOCH) u = lowbias32((uint32_t)(ib + t) * 0x9E3779B9u + seed);
                quant_elem(ab[t], X, u, RND, f, &c, &v);
                db[t] = MODE == 0 ? v : c;
            }
        }
    } else {
#pragma omp simd
        for (int i = 0; i < ne; i++) {
            uint32_t u = 0, c, v;
            if (RND == R_STOCH) u = lowbias32((uint32_t)(base + i) * 0x9E3779B9u + seed);
            quant_elem(a[i], xe[i], u, RND, f, &c, &v);
            dst[i] = MODE == 0 ? v : c;
        }
    }
    if (MODE == 0) {
        if (special)
            for (int bb = 0; bb < nblk; bb++)
                if (spc[bb]) for (int t = 0; t < k; t++) dst[(size_t)bb * k + t] = 0x7FC00000u;
        if (dst == ve) store_run(J->out, base, nv, dt, ve, fast);
        return;
    }
#pragma omp simd
    for (int i = 0; i < ne; i++) cod[i] = (uint8_t)ve[i];
    if (special)
        for (int bb = 0; bb < nblk; bb++)
            if (spc[bb]) {
                memset(cod + (size_t)bb * k, 0, (size_t)k);
                if (MICRO) for (int t = 0; t < spb; t++) sg[(size_t)bb * spb + t] = 0;
            }
    uint8_t *sc = J->scales + b;   /* (byte stores could alias J) */
    for (int bb = 0; bb < nblk; bb++) sc[bb] = spc[bb] ? (uint8_t)f->s_nan : (uint8_t)(Xb[bb] + f->s_bias);
    if (MICRO) {
        uint8_t *mic = J->micro + b * spb;
#pragma omp simd
        for (int g = 0; g < ns; g++) mic[g] = (uint8_t)sg[g];
    }
    pack_block(cod, 1, ne, f->bits, J->codes + b * (int64_t)(k * f->bits / 8));
}

/* Blocks b0 .. b1 - 1 of rows (inner == 1): runs of whole blocks contiguous in memory (across vectors when
 * L is a multiple of k) go by chunks, a ragged last block of a vector as a chunk of one padded block. */
AINLINE void quant_rows(const job_t *J, int64_t b0, int64_t b1, const int MODE, const int DT, const int RND,
                        const int K1, const int K2, const int MICRO) {
    const fmt_t F = J->f, *f = &F;   /* local copy: no aliasing with the output */
    const int k = K1 ? K1 : f->k;    /* K1, K2: compile-time block / sub-block sizes (checked by the caller), or 0 */
    const int64_t L = J->L, nb = J->nb, nfull = L / k;
    const int cb = k <= CHUNK ? CHUNK / k : 1;    /* blocks per chunk */
    int64_t v = nb ? b0 / nb : 0, lb = b0 - v * nb;
    for (int64_t b = b0; b < b1;) {
        if (lb < nfull) {
            int64_t run = b1 - b;
            if (nfull < nb) run = run < nfull - lb ? run : nfull - lb;   /* ragged rows: stay within the row */
            run = run < cb ? run : cb;
            quant_chunk(J, f, b, v * L + lb * k, (int)run, (int)run * k, MODE, DT, RND, K1, K2, MICRO);
            b += run; lb += run;
        } else {
            quant_chunk(J, f, b, v * L + lb * k, 1, (int)(L - lb * k), MODE, DT, RND, K1, K2, MICRO);
            b++; lb++;
        }
        while (lb >= nb) { lb -= nb; v++; }
    }
}

/* ---- quantize / fake-quantize, inner > 1 --------------------------------------------------------- */
/* Tiles of k rows x up to TILE columns: item t = ((o * nb) + lb) * ntile + it covers rows [lb*k, lb*k+k)
 * and columns [it*TILE, ...) of outer slice o, vectorized across columns; s[g * TILE + c] holds the
 * amax, then the microexponent, of sub-block g of column c (single level: one sub-block, s = 0). */
AINLINE void quant_tiles(const job_t *J, int64_t t0, int64_t t1, const int MODE, const int DT, const int RND,
                         const int MICRO) {
    const fmt_t F = J->f, *f = &F;
    const int k = f->k, k2 = MICRO ? f->k2 : k, nsub = MICRO ? k / k2 : 1;
    const int32_t beta = MICRO ? f->beta : 0, emin = f->emin;
    const int64_t L = J->L, nb = J->nb, inner = J->inner;
    const int64_t ntile = (inner + TILE - 1) / TILE;
    const void *in = J->in;
    const int dt = DT >= 0 ? DT : J->idt;
    const uint32_t seed = J->seed;
    uint32_t row_in[TILE], row_out[TILE];
    /* per-column constants and fast-path bounds as in quant_chunk */
    const uint32_t nbits = f2u((float)f->nmax);
    const int32_t xlo = 1 - emin - 127 + beta, xhi = 254 - (int32_t)(nbits >> 23) - f->pmaxbase;
    const smode_t smc = smode_consts(J->smode, f);
    uint32_t amax[TILE], maxb[TILE], spc[TILE];
    int32_t X[TILE], Tc[TILE];
    int32_t s[MAXK2 * TILE];
    uint8_t cod[TILE * MAXK > 65536 ? 65536 : TILE * MAXK];   /* [row][column] codes (MODE 1) */
    for (int64_t t = t0; t < t1; t++) {
        int64_t it = t % ntile, ol = t / ntile, lb = ol % nb, o = ol / nb;
        int64_t i0 = it * TILE;
        int w = (int)((inner - i0) < TILE ? (inner - i0) : TILE);
        int n = (int)((L - lb * k) < k ? (L - lb * k) : k);
        int64_t base = (o * L + lb * k) * inner + i0;
        if (t + 1 < t1) prefetch_tile(J, t + 1, ntile, MODE, dt);
        /* (row pointers hoisted out of the column loops: with -fwrapv, which Python's CFLAGS add, an
         * int index g * TILE + c is not provably contiguous and would become a scatter / gather) */
        for (int g = 0; g < nsub; g++) {
            int32_t *sg = s + (size_t)g * TILE;
            for (int c = 0; c < w; c++) sg[c] = 0;
        }
        for (int j = 0; j < n; j++) {
            int32_t *sg = s + (MICRO ? (size_t)(j / k2) * TILE : 0);
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
        if (MICRO)
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
            const int32_t *sg = s + (MICRO ? (size_t)(j / k2) * TILE : 0);
            /* fp32 rows are read and written in place, other dtypes through row_in / row_out */
            const uint32_t *ri = row_in;
            uint32_t *ro = MODE == 0 && dt == DT_F32 ? (uint32_t *)J->out + row : row_out;
            if (j >= n) for (int c = 0; c < w; c++) row_in[c] = 0;
            else if (dt == DT_F32) ri = (const uint32_t *)in + row;
            else load_run(in, row, w, dt, row_in);
            if (fast) {
#pragma omp simd
                for (int c = 0; c < w; c++) {
                    uint32_t code, vv, sv = MICRO ? (uint32_t)sg[c] : 0u;
                    quant_fast(ri[c], Tc[c] - (int32_t)sv, maxb[c] - (sv << 23), f, &code, &vv, MODE == 0, MODE == 1);
                    ro[c] = MODE == 0 ? (spc[c] ? 0x7FC00000u : vv) : (spc[c] ? 0u : code);
                }
            } else {
#pragma omp simd
                for (int c = 0; c < w; c++) {
                    uint32_t u = 0, code, vv;
                    if (RND == R_STOCH) u = lowbias32((uint32_t)(row + c) * 0x9E3779B9u + seed);
                    quant_elem(ri[c], X[c] - (MICRO ? sg[c] : 0), u, RND, f, &code, &vv);
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
                if (MICRO) for (int g = 0; g < nsub; g++) J->micro[blk * nsub + g] = (uint8_t)s[g * TILE + c];
                pack_block(cod + c, TILE, k, f->bits, J->codes + blk * bytes);
            }
        }
    }
}

/* ---- dequantize ------------------------------------------------------------------------------------
 * Fast path: every code's value at X = 0 is a normal fp32 number (or zero / Inf / NaN); at exponent X it
 * is shifted through the exponent field, by integer arithmetic on the code (decode_fast) or a 256-entry
 * table (shift_exp); blocks whose exponent could make a value subnormal or overflow fp32 (|X| > ~110) take
 * the exact element-by-element decode (decode_elem). Two-level formats decode each element with the
 * exponent X - s_j of its sub-block (value = element value x 2^(X - s_j); NaN for the NaN scale code).
 * AVX-512, bf16 / fp32 outputs of formats whose values have at most 8 significant bits (every MX and BDR
 * format: exact in bf16, which has fp32's exponent range): the bf16 bit pattern of each code at X = 0 is
 * looked up with word permutes (vpermt2w) and 2^(X - s_j) applied as an integer add to its exponent field
 * (deq32_w512, deq_row_w512); fp32 is that pattern widened. Other variants store bf16 as the high half of
 * the exact fp32 bits. */
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
 * decode_table checks it against the decode_elem table at X = 0 before it is used. */
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

/* Dequantize set-up: T[c] = fp32 bits of code c at scale 2^0, [elo, ehi] = the biased fp32 exponents of
 * its nonzero finite values, and whether decode_fast (integer arithmetic on the code) reproduces the
 * table for every code (returned). */
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

/* Output of dequantized fp32 bits v[0 .. n) (fast: every value is a normal fp32 number, zero, Inf or NaN)
 * at out[base ..] of dtype odt (fp32 outputs were written in place by the caller), or, for blocks that are
 * not fast, the exact decode of each code with its exponent xe[i] (fp64 outputs: exact in float64 even
 * beyond the fp32 range); trunc16: bf16 values are exact (deqtab_t.exact16), their bits the high halves. */
AINLINE void deq_store_run(void *out, int64_t base, int n, const int odt, const uint32_t *v, const uint32_t *cw,
                           const int32_t *xe, int fast, int trunc16, const uint32_t *nanm, const fmt_t *f) {
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
    } else if (odt == DT_F32) {
        memcpy((uint32_t *)out + base, v, (size_t)n * 4);
    } else {
        store_run(out, base, n, odt, v, trunc16);
    }
}

/* fp32 bits of codes cw[i] at exponents xe[i]: arithmetic decode, table, or exact; the canonical NaN
 * where the mask nanm[i] is set (a NaN scale). */
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

/* Dequantize tables of one call: T (fp32 bits at X = 0, decode_table), [elo, ehi], arith (decode_fast
 * reproduces T), exact16: every value at X = 0 has a zero low half (at most 8 significant bits), so at any
 * exponent that keeps it a normal fp32 number it is exact in bf16 (bf16 has fp32's exponent range) and
 * its bf16 bits are the high half of its fp32 bits; T16: those halves for every code (word-table decode). */
typedef struct { uint32_t T[256]; int32_t elo, ehi; int arith, exact16; uint16_t T16[256]; } deqtab_t;

static void deq_setup(const fmt_t *f, deqtab_t *D) {
    D->arith = decode_table(f, D->T, &D->elo, &D->ehi);
    D->exact16 = 1;
    for (uint32_t c = 0; c < (1u << f->bits); c++) D->exact16 &= (D->T[c] & 0xFFFFu) == 0;
    for (uint32_t c = 0; c < 256; c++) D->T16[c] = (uint16_t)(D->T[c < (1u << f->bits) ? c : 0] >> 16);
}

#ifdef HAVE_X86_VARIANTS
#include <immintrin.h>
/* AVX-512 (F + BW) word-table decode of ngroups groups of 32 elements of `bits` (<= 6, or 8) bits, bf16 or fp32
 * out: single-level blocks of k = 32 (micro NULL) or two-level blocks of k = 16 with k2 = 2, d2 = 1 (MX6 /
 * MX4: micro is the byte-aligned microexponent stream of these blocks, 16 bits per group). Every block
 * is safe (no value at X - s_j leaves fp32's normal range) or of the NaN scale, and the values are exact16.
 * The 32 codes of a group are spread to 16-bit lanes (byte widening, a word permute to the two bytes
 * holding each code, a per-lane shift), looked up in the bf16 table T16 (vpermt2w over 64 entries; 8-bit
 * codes: four of them, blended on the codes' two top bits), and the
 * scale 2^(X - s_j) is applied by adding X - s_j to the exponent field of the nonzero finite values (units
 * of 128: the bf16 exponent field); a NaN scale gives the canonical NaN. fp32 out: the bf16 bits widened
 * (exact). Bit-identical to decode_fast / shift_exp and the stores of deq_store_run. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2")))
static void deq32_w512(const uint8_t *codes, const uint8_t *scales, const uint8_t *micro, int ngroups, int bits,
                       const uint16_t *T16, int32_t s_bias, int32_t s_nan, void *out, int out_f32) {
    int16_t ia[32], ib[32], sh[32];
    for (int i = 0; i < 32; i++) {
        ia[i] = (int16_t)(bits * i / 8); ib[i] = (int16_t)(ia[i] + 1); sh[i] = (int16_t)(bits * i % 8);
    }
    const __m512i IA = _mm512_loadu_si512(ia), IB = _mm512_loadu_si512(ib), SH = _mm512_loadu_si512(sh);
    const __m512i M = _mm512_set1_epi16((short)((1 << bits) - 1)), T0 = _mm512_loadu_si512(T16);
    const __m512i T1 = _mm512_loadu_si512(T16 + 32), T2 = _mm512_loadu_si512(T16 + 64);
    const __m512i T3 = _mm512_loadu_si512(T16 + 96), T4 = _mm512_loadu_si512(T16 + 128);
    const __m512i T5 = _mm512_loadu_si512(T16 + 160), T6 = _mm512_loadu_si512(T16 + 192);
    const __m512i T7 = _mm512_loadu_si512(T16 + 224), B6 = _mm512_set1_epi16(64), B7 = _mm512_set1_epi16(128), ABS = _mm512_set1_epi16(0x7FFF), ONE = _mm512_set1_epi16(1);
    const __m512i FIN = _mm512_set1_epi16(0x7F7F), QNAN = _mm512_set1_epi16(0x7FC0), E1 = _mm512_set1_epi16(128);
    const __mmask32 lm = bits == 8 ? 0xFFFFFFFFu : (__mmask32)((1ull << (4 * bits)) - 1u);
    const int bytes = 4 * bits;
    for (int g = 0; g < ngroups; g++) {
        const __m512i w = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(lm, codes + (size_t)g * bytes));
        __m512i c = w, t;
        if (bits != 8) {
            c = _mm512_permutexvar_epi16(IA, w);
            if (8 % bits) c = _mm512_or_si512(c, _mm512_slli_epi16(_mm512_permutexvar_epi16(IB, w), 8));   /* codes across bytes */
            c = _mm512_and_si512(_mm512_srlv_epi16(c, SH), M);
            t = _mm512_permutex2var_epi16(T0, c, T1);
        } else {
            const __mmask32 h6 = _mm512_test_epi16_mask(c, B6), h7 = _mm512_test_epi16_mask(c, B7);
            const __m512i lo = _mm512_mask_blend_epi16(h6, _mm512_permutex2var_epi16(T0, c, T1), _mm512_permutex2var_epi16(T2, c, T3));
            const __m512i hi = _mm512_mask_blend_epi16(h6, _mm512_permutex2var_epi16(T4, c, T5), _mm512_permutex2var_epi16(T6, c, T7));
            t = _mm512_mask_blend_epi16(h7, lo, hi);
        }
        const __mmask32 fin = _mm512_cmplt_epu16_mask(_mm512_sub_epi16(_mm512_and_si512(t, ABS), ONE), FIN);
        __m512i xv;
        __mmask32 nanm;
        if (!micro) {
            const int32_t sc = scales[g];
            xv = _mm512_set1_epi16((short)((sc - s_bias) * 128));
            nanm = sc == s_nan ? 0xFFFFFFFFu : 0u;
        } else {
            const int32_t s0 = scales[2 * g], s1 = scales[2 * g + 1];
            xv = _mm512_mask_blend_epi16(0xFFFF0000u, _mm512_set1_epi16((short)((s0 - s_bias) * 128)),
                                         _mm512_set1_epi16((short)((s1 - s_bias) * 128)));
            nanm = (s0 == s_nan ? 0x0000FFFFu : 0u) | (s1 == s_nan ? 0xFFFF0000u : 0u);
            const uint32_t m = (uint32_t)micro[2 * g] | ((uint32_t)micro[2 * g + 1] << 8);   /* s_j of lanes 2j, 2j+1 */
            const __mmask32 sub = _pdep_u32(m, 0x55555555u) | _pdep_u32(m, 0xAAAAAAAAu);
            xv = _mm512_mask_sub_epi16(xv, sub, xv, E1);
        }
        __m512i r = _mm512_mask_add_epi16(t, fin, t, xv);
        r = _mm512_mask_mov_epi16(r, nanm, QNAN);
        if (out_f32) {
            uint32_t *o = (uint32_t *)out + (size_t)g * 32;
            _mm512_storeu_si512(o, _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(r)), 16));
            _mm512_storeu_si512(o + 16, _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(r, 1)), 16));
        } else {
            _mm512_storeu_si512((uint16_t *)out + (size_t)g * 32, r);
        }
    }
}

/* The same decode for one row of an axis-0 tile (deq_tiles): w <= 64 codes, one byte each (cw8), each with
 * its own exponent in units of 128 (xw: (X - s_j) * 128) and NaN bit (nanbits), to bf16 or fp32; fp32
 * rows of 64 whole 64-byte aligned lines may be written with streaming stores (stream). */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2")))
static void deq_row_w512(const uint8_t *cw8, const int16_t *xw, uint64_t nanbits, int w, int bits, const uint16_t *T16,
                         void *out, int out_f32, int stream) {
    const __m512i ABS = _mm512_set1_epi16(0x7FFF), ONE = _mm512_set1_epi16(1), FIN = _mm512_set1_epi16(0x7F7F);
    const __m512i QNAN = _mm512_set1_epi16(0x7FC0), B6 = _mm512_set1_epi16(64), B7 = _mm512_set1_epi16(128);
    for (int g = 0; g < w; g += 32) {
        const __mmask32 vm = w - g >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << (w - g)) - 1u);
        const __m512i c = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(vm, cw8 + g));
        __m512i t = _mm512_permutex2var_epi16(_mm512_loadu_si512(T16), c, _mm512_loadu_si512(T16 + 32));
        if (bits == 8) {
            const __mmask32 h6 = _mm512_test_epi16_mask(c, B6), h7 = _mm512_test_epi16_mask(c, B7);
            const __m512i q1 = _mm512_permutex2var_epi16(_mm512_loadu_si512(T16 + 64), c, _mm512_loadu_si512(T16 + 96));
            const __m512i q2 = _mm512_permutex2var_epi16(_mm512_loadu_si512(T16 + 128), c, _mm512_loadu_si512(T16 + 160));
            const __m512i q3 = _mm512_permutex2var_epi16(_mm512_loadu_si512(T16 + 192), c, _mm512_loadu_si512(T16 + 224));
            t = _mm512_mask_blend_epi16(h7, _mm512_mask_blend_epi16(h6, t, q1), _mm512_mask_blend_epi16(h6, q2, q3));
        }
        const __mmask32 fin = _mm512_cmplt_epu16_mask(_mm512_sub_epi16(_mm512_and_si512(t, ABS), ONE), FIN);
        __m512i r = _mm512_mask_add_epi16(t, fin, t, _mm512_maskz_loadu_epi16(vm, xw + g));
        r = _mm512_mask_mov_epi16(r, (__mmask32)(nanbits >> g), QNAN);
        if (!out_f32) { _mm512_mask_storeu_epi16((uint16_t *)out + g, vm, r); continue; }
        const __m512i lo = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(r)), 16);
        const __m512i hi = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(r, 1)), 16);
        uint32_t *o = (uint32_t *)out + g;
        if (stream) { _mm512_stream_si512((void *)o, lo); _mm512_stream_si512((void *)(o + 16), hi); }
        else { _mm512_mask_storeu_epi32(o, (__mmask16)vm, lo); _mm512_mask_storeu_epi32(o + 16, (__mmask16)(vm >> 16), hi); }
    }
}
#endif

/* Dequantize nblk whole blocks b .. b + nblk - 1, contiguous in the output from flat index base (as
 * quant_chunk: nv valid elements, the ragged last block of a row a chunk of one block). */
AINLINE void deq_chunk(const job_t *J, const fmt_t *f, int64_t b, int64_t base, const int nblk, const int nv,
                       const deqtab_t *D, const int DT, const int K1, const int K2, const int MICRO, const int ISA) {
    const int k = K1 ? K1 : f->k;
    const int k2 = MICRO ? (K2 ? K2 : f->k2) : k, spb = MICRO ? k / k2 : 1, ne = nblk * k, ns = nblk * spb;
    const int32_t beta = MICRO ? f->beta : 0;
    const int odt = DT >= 0 ? DT : J->odt;
    uint8_t cod[CHUNKMAX], ms[CHUNKMAX];
    int32_t xs[CHUNKMAX], xe[CHUNKMAX], Xb[CHUNKMAX];
    uint32_t cw[CHUNKMAX], ns_nan[CHUNKMAX], nanm[CHUNKMAX], vb[CHUNKMAX], nb_[CHUNKMAX], tmp[CHUNKMAX];
    int safe = 1;
    for (int bb = 0; bb < nblk; bb++) {
        uint32_t sc = J->scales[b + bb];
        int32_t X = (int32_t)sc - f->s_bias;
        int isnan = sc == (uint32_t)f->s_nan;
        safe &= isnan || (X - beta + D->elo >= 1 && X + D->ehi <= 254);
        Xb[bb] = X;
        nb_[bb] = isnan ? ~0u : 0u;
    }
    /* bf16 output of exact16 values: the high half of the fp32 bits (no rounding step) */
    const int trunc16 = odt == DT_BF16 && safe && D->exact16;
#ifdef HAVE_X86_VARIANTS
    /* AVX-512 word-table decode (deq32_w512): single level with k = 32, or MX6 / MX4's k1 = 16, k2 = 2, d2 = 1 */
    if (ISA == ISA_AVX512 && safe && D->exact16 && nv == ne && (f->bits <= 6 || f->bits == 8) && (odt == DT_BF16 || odt == DT_F32)
        && (MICRO ? (K1 == 16 && K2 == 2 && f->d2 == 1 && nblk % 2 == 0) : K1 == 32)) {
        deq32_w512(J->codes + b * (int64_t)(k * f->bits / 8), J->scales + b, MICRO ? J->micro + b : NULL, ne / 32,
                   f->bits, D->T16, f->s_bias, f->s_nan, (char *)J->out + base * (odt == DT_F32 ? 4 : 2),
                   odt == DT_F32);
        return;
    }
#endif
    unpack_block(J->codes + b * (int64_t)(k * f->bits / 8), ne, f->bits, cod);
    if (MICRO) {
        const int64_t mbit = b * spb * (int64_t)f->d2;
        if (mbit % 8 == 0 && ns % 8 == 0) unpack_block(J->micro + mbit / 8, ns, f->d2, ms);
        else unpack_bits(J->micro, mbit, ns, f->d2, ms);
    }
#pragma omp simd
    for (int i = 0; i < ne; i++) cw[i] = cod[i];
    uint32_t *dst = odt == DT_F32 && nv == ne ? (uint32_t *)J->out + base : vb;
    if (!MICRO && K1 && D->arith && trunc16 && nv == ne) {   /* as below, bf16 bits straight to the output */
        for (int bb = 0; bb < nblk; bb++) {
            const uint32_t c1 = (uint32_t)(f->emin + Xb[bb] + 126) << 23, c2 = (uint32_t)(f->emin + Xb[bb] - f->mbits) << 23;
            const uint32_t nm = nb_[bb];
            const uint32_t *cb = cw + (size_t)bb * k;
            uint16_t *db = (uint16_t *)J->out + base + (size_t)bb * k;
#pragma omp simd
            for (int t = 0; t < k; t++) db[t] = (uint16_t)(((decode_fast(cb[t], c1, c2, f) & ~nm) | (0x7FC00000u & nm)) >> 16);
        }
        return;
    }
    if (!MICRO && K1 && safe && D->arith) {   /* single level, compile-time block size: per block */
        for (int bb = 0; bb < nblk; bb++) {
            const uint32_t c1 = (uint32_t)(f->emin + Xb[bb] + 126) << 23, c2 = (uint32_t)(f->emin + Xb[bb] - f->mbits) << 23;
            const uint32_t nm = nb_[bb];
            const uint32_t *cb = cw + (size_t)bb * k;
            uint32_t *db = dst + (size_t)bb * k;
#pragma omp simd
            for (int t = 0; t < k; t++) db[t] = (decode_fast(cb[t], c1, c2, f) & ~nm) | (0x7FC00000u & nm);
        }
    } else {
        /* block values to sub-blocks, X - s_j, then to elements (as quant_chunk) */
        const int pow2 = !(K1 && (K2 || !MICRO)) && (k2 & (k2 - 1)) == 0 && (spb & (spb - 1)) == 0;
        const uint32_t *xsrc = (const uint32_t *)Xb, *nsrc = nb_;
        if (MICRO) {
            if (pow2) {
                expand_pow2((const uint32_t *)Xb, nblk, spb, (uint32_t *)xs, tmp);
                expand_pow2(nb_, nblk, spb, ns_nan, tmp);
            } else {
                expand_any((const uint32_t *)Xb, nblk, spb, (uint32_t *)xs);
                expand_any(nb_, nblk, spb, ns_nan);
            }
#pragma omp simd
            for (int g = 0; g < ns; g++) xs[g] -= (int32_t)ms[g];
            xsrc = (const uint32_t *)xs; nsrc = ns_nan;
        }
        if (pow2) {
            expand_pow2(xsrc, ns, k2, (uint32_t *)xe, tmp);
            expand_pow2(nsrc, ns, k2, nanm, tmp);
        } else {
            expand_any(xsrc, ns, k2, (uint32_t *)xe);
            expand_any(nsrc, ns, k2, nanm);
        }
        deq_values(dst, ne, cw, xe, nanm, safe, D->arith, D->T, f);
    }
    if (dst == vb) deq_store_run(J->out, base, nv, odt, vb, cw, xe, safe, trunc16, nanm, f);   /* (xe / nanm: only read when not safe) */
}

/* Blocks t0 .. t1 - 1 of rows (inner == 1), by chunks as quant_rows. */
AINLINE void deq_rows(const job_t *J, int64_t t0, int64_t t1, const int DT, const int K1, const int K2,
                      const int MICRO, const int ISA) {
    const fmt_t F = J->f, *f = &F;
    const int k = K1 ? K1 : f->k;
    const int64_t L = J->L, nb = J->nb, nfull = L / k;
    const int cb = k <= CHUNK ? CHUNK / k : 1;
    deqtab_t D;
    deq_setup(f, &D);
    int64_t v = nb ? t0 / nb : 0, lb = t0 - v * nb;
    for (int64_t b = t0; b < t1;) {
        if (lb < nfull) {
            int64_t run = t1 - b;
            if (nfull < nb) run = run < nfull - lb ? run : nfull - lb;
            run = run < cb ? run : cb;
            deq_chunk(J, f, b, v * L + lb * k, (int)run, (int)run * k, &D, DT, K1, K2, MICRO, ISA);
            b += run; lb += run;
        } else {
            deq_chunk(J, f, b, v * L + lb * k, 1, (int)(L - lb * k), &D, DT, K1, K2, MICRO, ISA);
            b++; lb++;
        }
        while (lb >= nb) { lb -= nb; v++; }
    }
}

/* 8 x 8 byte transpose: byte j of x[i] goes to byte i of x[j] (three rounds of block swaps). */
AINLINE void transpose8x8(uint64_t x[8]) {
    for (int i = 0; i < 4; i++) {
        uint64_t t = ((x[i] >> 32) ^ x[i + 4]) & 0x00000000FFFFFFFFull;
        x[i] ^= t << 32; x[i + 4] ^= t;
    }
    for (int i = 0; i < 8; i += (i & 1) ? 3 : 1) {   /* 0, 1, 4, 5 */
        uint64_t t = ((x[i] >> 16) ^ x[i + 2]) & 0x0000FFFF0000FFFFull;
        x[i] ^= t << 16; x[i + 2] ^= t;
    }
    for (int i = 0; i < 8; i += 2) {
        uint64_t t = ((x[i] >> 8) ^ x[i + 1]) & 0x00FF00FF00FF00FFull;
        x[i] ^= t << 8; x[i + 1] ^= t;
    }
}

/* Dequantize tiles (inner > 1): rb block rows (rb * k <= 64 rows) x TILE columns, consecutive tiles moving
 * across the columns of the same rows (item t = ((o * nbg) + lbg) * ntile + it), so that the output is
 * written as rb * k rows that each advance sequentially (the hardware prefetchers follow them and their
 * pages stay in the TLB). A tile reads rb consecutive blocks per column (contiguous: whole cache lines),
 * columns nb * bytes apart. The codes of a tile are transposed to [row][column] bytes by 8 x 8 byte
 * transposes (8 columns' blocks at a time), then decoded row by row, vectorized across columns (AVX-512:
 * the word-table decode deq_row_w512). (In the former order a column tile of k rows walked down all block
 * rows: every tile wrote k short row segments in k pages never revisited, 2-4x a copy.) */
/* Block rows per axis-0 dequantize tile: a tile covers rb * k rows (up to 64) so that the per-column reads
 * (codes, scale, microexponents: rb consecutive blocks of one column are contiguous) use whole cache lines. */
#define DQ_RBMAX 8
static inline int deq_tile_rb(const fmt_t *f) {
    return f->k >= 64 ? 1 : (64 / f->k < DQ_RBMAX ? 64 / f->k : DQ_RBMAX);
}

/* One tile's decoded inputs (deq_tiles): codes transposed to [row][column], per block row r and column c
 * the exponent X and NaN mask ([r * TILE + c]) and microexponents ([(r * nsub + g) * TILE + c]). */
typedef struct {
    uint8_t tc[TILE * MAXK > 65536 ? 65536 : TILE * MAXK];
    uint8_t s[MAXK2 * TILE];
    int32_t X[DQ_RBMAX * TILE];
    uint32_t nanm[DQ_RBMAX * TILE];
    int64_t base;
    int w, n, safe;
} dtile_t;

/* Tile t's inputs: item t = ((o * nbg) + lbg) * ntile + it covers block rows [lbg * rb, lbg * rb + rb) and
 * columns [it * TILE, ...) of outer slice o. */
AINLINE void deq_tile_load(const job_t *J, const fmt_t *f, const deqtab_t *D, int64_t t, int rb, dtile_t *T,
                           const int MICRO) {
    const int k = f->k, d2 = f->d2, nsub = MICRO ? k / f->k2 : 1;
    const int32_t beta = MICRO ? f->beta : 0;
    const int64_t L = J->L, nb = J->nb, inner = J->inner, ntile = (inner + TILE - 1) / TILE, nbg = (nb + rb - 1) / rb;
    const int64_t bytes = (int64_t)k * f->bits / 8;
    const int64_t it = t % ntile, ol = t / ntile, lb0 = (ol % nbg) * rb, o = ol / nbg, i0 = it * TILE;
    const int w = (int)((inner - i0) < TILE ? (inner - i0) : TILE);
    const int nr = (int)(nb - lb0 < rb ? nb - lb0 : rb);
    uint8_t cod[8 * (MAXK > 64 ? MAXK : 64)];
    int safe = 1;
    T->w = w; T->n = (int)((L - lb0 * k) < (int64_t)rb * k ? (L - lb0 * k) : (int64_t)rb * k);
    T->base = (o * L + lb0 * k) * inner + i0;
    for (int r = 0; r < nr; r++) {
        const int64_t lb = lb0 + r;
        int32_t *X = T->X + (size_t)r * TILE;
        uint32_t *nanm = T->nanm + (size_t)r * TILE;
        uint32_t mw[TILE];   /* a block's nsub microexponents as one word (nsub * d2 <= 32) */
        for (int c = 0; c < w; c++) {
            int64_t blk = (o * inner + i0 + c) * nb + lb;
            X[c] = (int32_t)J->scales[blk] - f->s_bias;
            nanm[c] = J->scales[blk] == f->s_nan ? ~0u : 0u;
            safe &= nanm[c] || (X[c] - beta + D->elo >= 1 && X[c] + D->ehi <= 254);
            if (MICRO && nsub * d2 <= 32) mw[c] = get_bits32(J->micro, blk * nsub * d2, nsub * d2);
            else if (MICRO)
                for (int g = 0; g < nsub; g++)
                    T->s[((size_t)r * nsub + g) * TILE + c] = (uint8_t)get_micro(J->micro, blk * nsub + g, d2);
        }
        if (MICRO && nsub * d2 <= 32)
            for (int g = 0; g < nsub; g++) {   /* (vectorized across columns) */
                uint8_t *sr = T->s + ((size_t)r * nsub + g) * TILE;
#pragma omp simd
                for (int c = 0; c < w; c++) sr[c] = (uint8_t)((mw[c] >> (g * d2)) & (uint32_t)beta);
            }
    }
    T->safe = safe;
    /* codes of 8 columns (a column's nr blocks are contiguous: one run of nr * k codes, rows in tile order),
     * transposed into tc[row * TILE + column] */
    const int nc = nr * k, n = T->n;
    for (int c0 = 0; c0 < w; c0 += 8) {
        const int wc = w - c0 < 8 ? w - c0 : 8;
        for (int c = 0; c < wc; c++)
            unpack_block(J->codes + ((o * inner + i0 + c0 + c) * nb + lb0) * bytes, nc, f->bits, cod + (size_t)c * nc);
        if (wc == 8 && k % 8 == 0 && MX_LE) {
            for (int j0 = 0; j0 < n; j0 += 8) {
                uint64_t x[8];
                for (int c = 0; c < 8; c++) memcpy(&x[c], cod + (size_t)c * nc + j0, 8);
                transpose8x8(x);
                for (int q = 0; q < 8; q++) memcpy(T->tc + (size_t)(j0 + q) * TILE + c0, &x[q], 8);
            }
        } else {
            for (int c = 0; c < wc; c++)
                for (int j = 0; j < n; j++) T->tc[(size_t)j * TILE + c0 + c] = cod[(size_t)c * nc + j];
        }
    }
}

AINLINE void deq_tiles(const job_t *J, int64_t t0, int64_t t1, const int DT, const int MICRO, const int ISA) {
    const fmt_t F = J->f, *f = &F;
    const int k = f->k, k2 = MICRO ? f->k2 : k, nsub = MICRO ? k / k2 : 1, rb = deq_tile_rb(f);
    const int64_t nb = J->nb, inner = J->inner, ntile = (inner + TILE - 1) / TILE, nbg = (nb + rb - 1) / rb;
    const int odt = DT >= 0 ? DT : J->odt;
    const int64_t bytes = (int64_t)k * f->bits / 8;
    deqtab_t D;
    deq_setup(f, &D);
    dtile_t TT[2];
    int32_t xr[TILE];
    uint32_t cw[TILE], vb[TILE];
    /* AVX-512 word-table decode of safe tiles; outputs beyond the caches (> 16 MiB) whose row segments are
     * whole 64-byte lines: streamed (the rows of a tile are that many output streams at once; streaming whole
     * lines skips reading each line before it is overwritten) */
    const int es = odt == DT_F32 ? 4 : (odt == DT_F64 ? 8 : 2);
    const int nt_ok = ISA == ISA_AVX512 && odt == DT_F32 && J->outer * J->L * inner * es > ((int64_t)16 << 20)
                      && (inner * es) % 64 == 0 && ((uintptr_t)J->out) % 64 == 0;
    const int w512 = ISA == ISA_AVX512 && D.exact16 && (f->bits <= 6 || f->bits == 8) && (odt == DT_BF16 || odt == DT_F32);
    int16_t xw[TILE];
    int streamed = 0;
    /* software pipeline: tile t is loaded (codes transposed into one buffer) while tile t - 1 is decoded
     * from the other, so the transposed bytes' stores have retired before the vector loads read them (a
     * load right after the 8-byte stores it spans cannot be forwarded and waits for them) */
    for (int64_t t = t0; t <= t1; t++) {
        if (t + 1 < t1) {   /* the per-column inputs of the tile after this one (far apart) */
            int64_t it1 = (t + 1) % ntile, ol1 = (t + 1) / ntile, lb1 = (ol1 % nbg) * rb, o1 = ol1 / nbg, c0 = it1 * TILE;
            int w1 = (int)((inner - c0) < TILE ? (inner - c0) : TILE);
            for (int c = 0; c < w1; c++) {
                const int64_t blk = (o1 * inner + c0 + c) * nb + lb1;
                __builtin_prefetch(J->codes + blk * bytes, 0, 3);
                __builtin_prefetch(J->codes + (blk + rb) * bytes - 1, 0, 3);
                __builtin_prefetch(J->scales + blk, 0, 3);
                if (MICRO) __builtin_prefetch(J->micro + blk * nsub * f->d2 / 8, 0, 3);
            }
        }
        if (t < t1) deq_tile_load(J, f, &D, t, rb, &TT[t & 1], MICRO);
        if (t == t0) continue;
        const dtile_t *T = &TT[(t - 1) & 1];
        const int w = T->w, safe = T->safe;
#ifdef HAVE_X86_VARIANTS
        if (w512 && safe) {   /* AVX-512 word-table decode of each row (deq_row_w512) */
            uint64_t nanbits = 0;
            const int stream = nt_ok && w == TILE;
            for (int j = 0; j < T->n; j++) {
                const int r = j / k, jr = j % k;
                const int32_t *X = T->X + (size_t)r * TILE;
                if (jr == 0) {
                    const uint32_t *nanm = T->nanm + (size_t)r * TILE;
                    nanbits = 0;
                    for (int c = 0; c < w; c++) nanbits |= (uint64_t)(nanm[c] & 1u) << c;
                }
                if (jr == 0 || (MICRO && jr % k2 == 0)) {
                    const uint8_t *sg = T->s + (MICRO ? ((size_t)r * nsub + jr / k2) * TILE : 0);
#pragma omp simd
                    for (int c = 0; c < w; c++) xw[c] = (int16_t)((X[c] - (MICRO ? (int32_t)sg[c] : 0)) * 128);
                }
                deq_row_w512(T->tc + (size_t)j * TILE, xw, nanbits, w, f->bits, D.T16,
                             (char *)J->out + (T->base + j * inner) * es, odt == DT_F32, stream);
            }
            streamed |= stream;
            continue;
        }
#endif
        for (int j = 0; j < T->n; j++) {
            const int r = j / k, jr = j % k;
            int64_t row = T->base + j * inner;
            const int32_t *X = T->X + (size_t)r * TILE;
            const uint32_t *nanm = T->nanm + (size_t)r * TILE;
            const uint8_t *sg = T->s + (MICRO ? ((size_t)r * nsub + jr / k2) * TILE : 0);
            const uint8_t *tj = T->tc + (size_t)j * TILE;
#pragma omp simd
            for (int c = 0; c < w; c++) { cw[c] = tj[c]; xr[c] = X[c] - (MICRO ? (int32_t)sg[c] : 0); }
            uint32_t *dst = odt == DT_F32 ? (uint32_t *)J->out + row : vb;
            deq_values(dst, w, cw, xr, nanm, safe, D.arith, D.T, f);
            if (odt != DT_F32) deq_store_run(J->out, row, w, odt, vb, cw, xr, safe, safe && D.exact16, nanm, f);
        }
    }
#ifdef HAVE_X86_VARIANTS
    if (ISA == ISA_AVX512 && streamed) _mm_sfence();
#endif
    (void)streamed;
}

/* ---- dispatch ----------------------------------------------------------------------------------------
 * Runtime parameters to specialized (constant-folded) instances. Single level: input dtype x
 * {deterministic, stochastic} rounding x {rows of k = 32, rows of any k, tiles}; two level: {deterministic,
 * stochastic} x {rows of MX9 / MX6 / MX4's k1 = 16, k2 = 2, rows of any k1 / k2, tiles} with a runtime
 * dtype. The element encoding and the deterministic rounding mode are runtime values inside the loops (a
 * few selects), which keeps the build small. */
AINLINE void quant_dispatch(const job_t *J, int64_t a, int64_t b, const int MODE) {
#define Q_ONE(DT, R) do { if (J->inner != 1) quant_tiles(J, a, b, MODE, DT, R, 0); \
                          else if (R != R_STOCH && J->f.k == 32) quant_rows(J, a, b, MODE, DT, R, 32, 0, 0); \
                          else quant_rows(J, a, b, MODE, DT, R, 0, 0, 0); } while (0)
#define Q_TWO(R) do { if (J->inner != 1) quant_tiles(J, a, b, MODE, DT_ANY, R, 1); \
                      else if (R != R_STOCH && J->f.k == 16 && J->f.k2 == 2) quant_rows(J, a, b, MODE, DT_ANY, R, 16, 2, 1); \
                      else quant_rows(J, a, b, MODE, DT_ANY, R, 0, 0, 1); } while (0)
#define Q_DT(DT) do { if (J->rnd == R_STOCH) Q_ONE(DT, R_STOCH); else Q_ONE(DT, R_EVEN); } while (0)
    if (J->f.k2) {
        if (J->rnd == R_STOCH) Q_TWO(R_STOCH);
        else Q_TWO(R_EVEN);
        return;
    }
    switch (J->idt) {
    case DT_F32: Q_DT(DT_F32); break;
    case DT_BF16: Q_DT(DT_BF16); break;
    default: Q_DT(DT_F16); break;
    }
#undef Q_ONE
#undef Q_TWO
#undef Q_DT
}

AINLINE void deq_dispatch(const job_t *J, int64_t a, int64_t b, const int ISA) {
#define D_ONE(DT) do { if (J->inner != 1) deq_tiles(J, a, b, DT, 0, ISA); \
                       else if (J->f.k == 32) deq_rows(J, a, b, DT, 32, 0, 0, ISA); \
                       else deq_rows(J, a, b, DT, 0, 0, 0, ISA); } while (0)
    if (J->f.k2) {
        if (J->inner != 1) deq_tiles(J, a, b, DT_ANY, 1, ISA);
        else if (J->f.k == 16 && J->f.k2 == 2) deq_rows(J, a, b, DT_ANY, 16, 2, 1, ISA);
        else deq_rows(J, a, b, DT_ANY, 0, 0, 1, ISA);
        return;
    }
    switch (J->odt) {
    case DT_F32: D_ONE(DT_F32); break;
    case DT_BF16: D_ONE(DT_BF16); break;
    case DT_F16: D_ONE(DT_F16); break;
    default: D_ONE(DT_F64); break;
    }
#undef D_ONE
}

typedef void (*worker_fn)(const job_t *, int64_t, int64_t);

#define DEFINE_WORKERS(SFX, ATTR, ISA) \
    ATTR static void fq_##SFX(const job_t *J, int64_t a, int64_t b) { quant_dispatch(J, a, b, 0); } \
    ATTR static void qz_##SFX(const job_t *J, int64_t a, int64_t b) { quant_dispatch(J, a, b, 1); } \
    ATTR static void dq_##SFX(const job_t *J, int64_t a, int64_t b) { deq_dispatch(J, a, b, ISA); }

DEFINE_WORKERS(base, , ISA_BASE)
#ifdef HAVE_X86_VARIANTS
DEFINE_WORKERS(avx2, __attribute__((target("avx2,fma,f16c,bmi2"))), ISA_AVX2)
DEFINE_WORKERS(avx512, __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2"))), ISA_AVX512)
#endif

static worker_fn W_FQ = fq_base, W_QZ = qz_base, W_DQ = dq_base;

/* MICROSCALE_KERNELS_ISA=avx2|baseline caps the variant (so tests can run every variant on one CPU). */
const char *mxloops_select_isa(void) {
#ifdef HAVE_X86_VARIANTS
    const char *cap = getenv("MICROSCALE_KERNELS_ISA");
    int allow512 = !cap || !strcmp(cap, "avx512"), allow2 = allow512 || (cap && !strcmp(cap, "avx2"));
    __builtin_cpu_init();
    if (allow512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
        W_FQ = fq_avx512; W_QZ = qz_avx512; W_DQ = dq_avx512;
        return "avx512";
    }
    if (allow2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("bmi2")) {
        W_FQ = fq_avx2; W_QZ = qz_avx2; W_DQ = dq_avx2;
        return "avx2";
    }
#endif
    return "baseline";
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

/* work items: blocks (inner == 1) or tiles of TILE columns */
static int64_t n_items(const job_t *J) {
    if (J->inner == 1) return J->outer * J->nb;
    return J->outer * J->nb * ((J->inner + TILE - 1) / TILE);
}

void mxloops_quantize(const job_t *J, int mode, int nt) {
    run_parallel(mode == 0 ? W_FQ : W_QZ, J, n_items(J), nt);
}

void mxloops_dequantize(const job_t *J, int nt) {
    const int64_t rb = deq_tile_rb(&J->f);   /* axis-0 tiles span rb block rows (deq_tiles) */
    run_parallel(W_DQ, J, J->inner == 1 ? n_items(J) : J->outer * ((J->nb + rb - 1) / rb) * ((J->inner + TILE - 1) / TILE), nt);
}

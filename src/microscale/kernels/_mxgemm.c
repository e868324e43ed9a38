/* Fused packed-weight linear for CPU: y = x . dequant(Wq)^T (+ bias), Wq an MX weight [N, K] blocked
 * along K (OCP MX v1.0 §6: k-element blocks, one E8M0 scale each; codes bit-packed as in packing.py:
 * 4-bit low nibble first, 6-bit four codes per three bytes, 8-bit one per byte).
 *
 * Compiled into the _mxkernels extension (see kernels/gemm.py for the Python side, which checks every
 * argument before any C runs). Two entry points:
 *   gemv  : x [M, Kp] fp32 (M <= 8, zero padded to whole blocks) -> y [M, N] fp32. Parallel over output
 *           rows (OpenMP, static split), every weight byte read once; codes are decoded in registers,
 *           never stored as fp32 weights.
 *   decode: rows [n0, n1) of Wq -> fp32 [n1 - n0, Kp] into a caller-owned, cache-sized buffer (the tiled
 *           GEMM path: Python decodes one tile at a time and runs torch's BLAS on it).
 *   decode_bf16: the same rows as bf16 (the tile of the bf16 GEMM path): each fp32 value v(code) * 2^X
 *           rounded to bf16 to nearest, ties to even (NaN -> 0x7FC0), as torch converts fp32 to bf16, so
 *           the tile equals dequantize(W, bfloat16); exact for every MX value with at most 8 significant
 *           bits above bf16's subnormal range (all of them, short of the smallest scales).
 *
 * Decoding is exact: a weight is w = v(code) * 2^X with v the element value (a 256-entry fp32 table built
 * in Python from formats.py) and 2^X the block scale (a 256-entry table, NaN for the NaN code). The
 * product of two fp32 numbers whose exact result is an fp32 value (the kernels' coverage condition: every
 * MX value is one) is exact, so each w equals what dequantize() gives, and y differs from
 * F.linear(x, dequantize(W)) only by summation order.
 *
 * Variants (chosen at import, capped by MICROSCALE_KERNELS_ISA=avx2|baseline like the other kernels):
 *   avx512 (F+BW+VL+VBMI, F16C), GEMV: every path sums the unscaled products x * v(code) of a block (or of
 *     the lanes that belong to one block) first and applies the block scale once, by one FMA per vector
 *     of partial sums: 2^X * sum(x * v) is sum(x * v * 2^X) up to summation order. Per format:
 *     - MXFP4: 128 codes per 64-byte load, nibble lanes (shift + 16-entry vpermps per 16 weights) against
 *       x reordered once per call, block scales by exponent arithmetic (gemv512_fp4_rows);
 *     - MXFP6: 64 codes per 48 bytes, one byte permute into 24-bit groups, then per 16 weights one
 *       vpmultishiftqb (magnitude to the low bits, sign to bit 31), a 32-entry vpermt2ps on the magnitude
 *       and the sign xor'ed in, against x reordered likewise (gemv512_fp6_rows);
 *     - MXFP8: the code read as an fp16 bit pattern (E5M2 exactly; E4M3 after a shift, times 2^-8, NaN
 *       codes and scales 247..254 sent to the table decode) and widened by vcvtph2ps (gemv512_fp8_rows);
 *     - MXINT8 and anything else: 32 codes at a time through dec512_32 (below) (gemv512_rows).
 *     dec512_32 (also the decode of the tiled GEMM path): one masked load, a byte permute (vpermb) that
 *     puts each code's two source bytes in a 16-bit lane, a per-lane shift (vpsrlvw) and mask; the code is
 *     then looked up as the fp16 bit pattern of v (vpermt2w over a 64-entry table; 8-bit sign-magnitude fp
 *     codes use 128 magnitudes + the sign bit; MXINT8 converts the int8 code directly), widened to fp32
 *     with vcvtph2ps (every MX element value is an fp16 value); the tile decode multiplies by 2^X.
 *   avx2 / baseline: the same loop in portable C (block decoded through the fp32 table into 32 floats on
 *     the stack, FMAs vectorized by the compiler for the target).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define GEMM_X86 1
#endif

#if defined(__GNUC__)
#define GINLINE static inline __attribute__((always_inline))
#else
#define GINLINE static inline
#endif

#define GEMV_MAX_M 8
#define GEMV_GROUP 32   /* rows sharing one pass over each K chunk of x (AVX-512 GEMV) */
#define GEMM_MAXK 1024

/* decode modes (chosen in Python from the format's code table) */
enum { GM_GENERIC = 0, GM_LUT6 = 1, GM_SM8 = 2, GM_INT8 = 3 };

typedef struct {
    const float *x;          /* [M, Kp] fp32 */
    const float *xq;         /* [M, K128] x reordered for the 4-bit path (see gemv512_fp4), or NULL */
    int64_t M, Kp;
    const uint8_t *codes;    /* [N, nb * k * bits / 8] */
    const uint8_t *scales;   /* [N, nb] */
    int64_t N, nb;
    int k, bits, mode;
    const float *lut32;      /* [256] element value of each code */
    const uint16_t *lut16;   /* [256] fp16 bits of each value (modes LUT6 / SM8) */
    const float *scl;        /* [256] 2^X of each scale code (NaN for the NaN code) */
    const float *bias;       /* [N] or NULL */
    float *y;                /* [M, N] */
    float *out;              /* decode: [n1 - n0, Kp] */
    int fp16x;               /* 8-bit codes decode as fp16 bits (AVX-512 path): 1 E5M2 (code << 8), 2 E4M3
                                (2^-8 times the value), 0 neither (see fp8_as_fp16) */
    int sm6;                 /* 6-bit sign-magnitude codes without NaN (AVX-512 6-bit lane path) */
    int xgroup;              /* xq: codes per lane (8 for 4-bit, 4 for 6-bit), 0 when xq is NULL */
    uint16_t *out16;         /* decode_bf16: [n1 - n0, Kp] bf16 bits (then out is NULL) */
} gjob_t;

typedef void (*gworker_fn)(const gjob_t *, int64_t, int64_t);

/* ---- portable path ---------------------------------------------------------------------------- */
GINLINE void unpack_block_codes(const uint8_t *src, int k, int bits, uint8_t *c) {
    if (bits == 8) { memcpy(c, src, (size_t)k); return; }
    if (bits == 4) {
        for (int i = 0; i < k / 2; i++) { c[2 * i] = src[i] & 15u; c[2 * i + 1] = src[i] >> 4; }
        return;
    }
    /* 6 bits: byte0 = c0 | c1<<6, byte1 = c1>>2 | c2<<4, byte2 = c2>>4 | c3<<2 */
    for (int g = 0; g < k / 4; g++) {
        uint32_t w = (uint32_t)src[3 * g] | ((uint32_t)src[3 * g + 1] << 8) | ((uint32_t)src[3 * g + 2] << 16);
        c[4 * g] = w & 63u; c[4 * g + 1] = (w >> 6) & 63u; c[4 * g + 2] = (w >> 12) & 63u; c[4 * g + 3] = w >> 18;
    }
}

GINLINE void decode_block_generic(const gjob_t *J, int64_t n, int64_t b, float *w) {
    uint8_t c[GEMM_MAXK];
    const int64_t row_bytes = J->nb * J->k * J->bits / 8;
    unpack_block_codes(J->codes + n * row_bytes + b * (J->k * J->bits / 8), J->k, J->bits, c);
    const float s = J->scl[J->scales[n * J->nb + b]];
    const float *lut = J->lut32;
    const int k = J->k;
#pragma omp simd
    for (int i = 0; i < k; i++) w[i] = lut[c[i]] * s;
}

GINLINE void gemv_generic_impl(const gjob_t *J, int64_t n0, int64_t n1) {
    float w[GEMM_MAXK];
    const int64_t M = J->M, Kp = J->Kp, nb = J->nb;
    const int k = J->k;
    for (int64_t n = n0; n < n1; n++) {
        float part[GEMV_MAX_M][16];
        memset(part, 0, sizeof part);
        for (int64_t b = 0; b < nb; b++) {
            decode_block_generic(J, n, b, w);
            for (int64_t m = 0; m < M; m++) {
                const float *xr = J->x + m * Kp + b * k;
                for (int j = 0; j < k; j += 16) {
#pragma omp simd
                    for (int l = 0; l < 16; l++) part[m][l] += xr[j + l] * w[j + l];
                }
            }
        }
        for (int64_t m = 0; m < M; m++) {
            float s = 0.0f;
            for (int l = 0; l < 16; l++) s += part[m][l];
            J->y[m * J->N + n] = s + (J->bias ? J->bias[n] : 0.0f);
        }
    }
}

/* fp32 -> bf16 bits, round to nearest even (torch's c10::BFloat16 rounding; NaN -> 0x7FC0) */
GINLINE uint16_t bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0x7FC0u;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

GINLINE void decode_generic_impl(const gjob_t *J, int64_t n0, int64_t n1, int64_t base) {
    if (J->out16) {
        float w[GEMM_MAXK];
        for (int64_t n = n0; n < n1; n++)
            for (int64_t b = 0; b < J->nb; b++) {
                decode_block_generic(J, n, b, w);
                uint16_t *dst = J->out16 + (n - base) * J->Kp + b * J->k;
                for (int i = 0; i < J->k; i++) dst[i] = bf16_bits(w[i]);
            }
        return;
    }
    for (int64_t n = n0; n < n1; n++)
        for (int64_t b = 0; b < J->nb; b++) decode_block_generic(J, n, b, J->out + (n - base) * J->Kp + b * J->k);
}

#define DEFINE_GENERIC(SFX, ATTR) \
    ATTR static void gemv_##SFX(const gjob_t *J, int64_t a, int64_t b) { gemv_generic_impl(J, a, b); } \
    ATTR static void decode_##SFX(const gjob_t *J, int64_t a, int64_t b) { decode_generic_impl(J, a, b, 0); }

DEFINE_GENERIC(base, )
#ifdef GEMM_X86
DEFINE_GENERIC(avx2, __attribute__((target("avx2,fma,f16c,bmi2"))))

/* ---- AVX-512 path ------------------------------------------------------------------------------ */
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx2,fma,f16c,bmi2")))
#define AI512 static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx2,fma,f16c,bmi2")))

/* Software prefetch of the codes GEMV_PF_SETS row sets ahead (the rows the next iteration of the row loop
 * reads, at the same offset): the decode keeps the core busy enough that the hardware prefetchers alone
 * leave memory latency exposed. 0 disables. */
#ifndef GEMV_PF_SETS
#define GEMV_PF_SETS 1
#endif
/* The 4-bit loop finishes a row in about half the time of the others; it looks four rows ahead and
 * prefetches into L2 (_MM_HINT_T1) rather than L1, and at batch 1 it reads one row at a time (R = 1: one
 * sequential stream per thread instead of two interleaved ones). 16384 x 4096, batch 1, 2 threads, the
 * weight streamed from DRAM (28 copies rotated): 1.54 ms, against 1.73 ms with two rows per step and
 * 1.96 ms with L1 prefetch two row pairs ahead; with the weight warm in cache all three take 1.2 ms. The
 * other formats measured slower with either change (they are compute-bound at this size) and keep L1
 * prefetch one row set ahead. */
#define GEMV_PF_ROWS_FP4 (GEMV_PF_SETS ? 4 : 0)
#define PF_CODES(p) do { if (GEMV_PF_SETS) _mm_prefetch((const char *)(p), _MM_HINT_T0); } while (0)
#define PF_CODES_L2(p) do { if (GEMV_PF_SETS) _mm_prefetch((const char *)(p), _MM_HINT_T1); } while (0)

typedef struct {
    __m512i perm, shv, mask;        /* byte gather, per-lane shift and code mask (bits 4 / 6) */
    __m512i t0, t1, t2, t3;         /* fp16 tables: 64 entries in (t0, t1); 128 magnitudes in t0..t3 */
} dec512_t;

T512 static void dec512_init(const gjob_t *J, dec512_t *D) {
    uint8_t perm[64];
    uint16_t shv[32];
    for (int j = 0; j < 32; j++) {
        int bit = j * J->bits;
        perm[2 * j] = (uint8_t)(bit >> 3);
        perm[2 * j + 1] = (uint8_t)((bit >> 3) + 1);
        shv[j] = (uint16_t)(bit & 7);
    }
    D->perm = _mm512_loadu_si512(perm);
    D->shv = _mm512_loadu_si512(shv);
    D->mask = _mm512_set1_epi16((short)((1 << J->bits) - 1));
    uint16_t t[128];
    memset(t, 0, sizeof t);
    if (J->mode == GM_LUT6 || J->mode == GM_SM8) memcpy(t, J->lut16, sizeof t);
    D->t0 = _mm512_loadu_si512(t); D->t1 = _mm512_loadu_si512(t + 32);
    D->t2 = _mm512_loadu_si512(t + 64); D->t3 = _mm512_loadu_si512(t + 96);
}

/* 32 consecutive codes at src -> 32 element values (unscaled), in order, as two 16-lane vectors. */
AI512 void dec512_32(const uint8_t *src, const int BITS, const int MODE, const dec512_t *D, __m512 *v0, __m512 *v1) {
    if (MODE == GM_INT8) {
        __m256i raw = _mm256_loadu_si256((const __m256i *)src);
        *v0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(raw)));
        *v1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(raw, 1)));
        return;
    }
    __m512i c;
    if (BITS == 8) {
        c = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)src));
    } else {
        __m512i raw = BITS == 4 ? _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)src))
                                : _mm512_castsi256_si512(_mm256_maskz_loadu_epi8(0xFFFFFFu, src));
        c = _mm512_and_si512(_mm512_srlv_epi16(_mm512_permutexvar_epi8(D->perm, raw), D->shv), D->mask);
    }
    __m512i h;
    if (MODE == GM_LUT6) {
        h = _mm512_permutex2var_epi16(D->t0, c, D->t1);
    } else { /* GM_SM8: magnitude (7 bits) through two 64-entry tables, then the sign bit */
        __m512i lo = _mm512_permutex2var_epi16(D->t0, c, D->t1);
        __m512i hi = _mm512_permutex2var_epi16(D->t2, c, D->t3);
        __mmask32 upper = _mm512_test_epi16_mask(c, _mm512_set1_epi16(64));
        h = _mm512_mask_blend_epi16(upper, lo, hi);
        h = _mm512_or_si512(h, _mm512_slli_epi16(_mm512_and_si512(c, _mm512_set1_epi16(128)), 8));
    }
    *v0 = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
    *v1 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
}

/* R output rows at a time (R = 2 when M <= 4: more independent FMA chains and one x load for two rows).
 * For M <= 2 the unscaled products of a block are summed first and the block scale applied once per
 * block (one FMA per x row); for more x rows the decoded weights are scaled once instead (two multiplies
 * per 32 weights, shared by all x rows). */
AI512 void gemv512_rows(const gjob_t *J, int64_t n, const int M, const int R, const int BITS, const int MODE,
                        const dec512_t *D, const float *sclv, int64_t b0, int64_t b1, float *part) {
    const int64_t nb = J->nb, Kp = J->Kp;
    const int k = J->k, chunk_bytes = 4 * BITS;
    const int64_t row_bytes = nb * k * BITS / 8;
    __m512 acc[2][GEMV_MAX_M];
#pragma GCC unroll 2
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) acc[r][m] = _mm512_setzero_ps();
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *src0 = J->codes + n * row_bytes + b * (int64_t)(k * BITS / 8);
        const int LATE = M <= 2;   /* scale the block sums (else the weights) */
        __m512 t[2][GEMV_MAX_M], s[2];
#pragma GCC unroll 2
        for (int r = 0; r < R; r++) {
            s[r] = _mm512_set1_ps(sclv[J->scales[(n + r) * nb + b]]);
#pragma GCC unroll 8
            for (int m = 0; m < M; m++) t[r][m] = _mm512_setzero_ps();
        }
        for (int j = 0; j < k; j += 32) {
            __m512 w[2][2];
#pragma GCC unroll 2
            for (int r = 0; r < R; r++) {
                PF_CODES(src0 + (r + GEMV_PF_SETS * R) * row_bytes + (j / 32) * chunk_bytes);
                dec512_32(src0 + r * row_bytes + (j / 32) * chunk_bytes, BITS, MODE, D, &w[r][0], &w[r][1]);
                if (!LATE) { w[r][0] = _mm512_mul_ps(w[r][0], s[r]); w[r][1] = _mm512_mul_ps(w[r][1], s[r]); }
            }
            const float *xb = J->x + b * k + j;
#pragma GCC unroll 8
            for (int m = 0; m < M; m++) {
                __m512 x0 = _mm512_loadu_ps(xb + m * Kp), x1 = _mm512_loadu_ps(xb + m * Kp + 16);
#pragma GCC unroll 2
                for (int r = 0; r < R; r++) {
                    __m512 *dst = LATE ? &t[r][m] : &acc[r][m];
                    *dst = _mm512_fmadd_ps(x1, w[r][1], _mm512_fmadd_ps(x0, w[r][0], *dst));
                }
            }
        }
        if (LATE)
#pragma GCC unroll 2
            for (int r = 0; r < R; r++)
#pragma GCC unroll 8
                for (int m = 0; m < M; m++) acc[r][m] = _mm512_fmadd_ps(t[r][m], s[r], acc[r][m]);
    }
#pragma GCC unroll 2
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) part[r * GEMV_MAX_M + m] += _mm512_reduce_add_ps(acc[r][m]);
}

/* 2^X of four E8M0 scale codes, each repeated over four lanes (lane j: code j / 4), by exponent
 * arithmetic: the fp32 bits of 2^(c - 127) are c << 23 for c in 1..254; c = 0 is the subnormal 2^-127 and
 * c = 255 NaN (fixed up only when ANY_SPECIAL: rows whose scales are all ordinary skip the two compares). */
AI512 __m512 scale4_512(const uint8_t *sc, const int ANY_SPECIAL) {
    const __m512i pick = _mm512_set_epi32(0xFFFFFF03, 0xFFFFFF03, 0xFFFFFF03, 0xFFFFFF03, 0xFFFFFF02, 0xFFFFFF02,
                                          0xFFFFFF02, 0xFFFFFF02, 0xFFFFFF01, 0xFFFFFF01, 0xFFFFFF01, 0xFFFFFF01,
                                          (int)0xFFFFFF00, (int)0xFFFFFF00, (int)0xFFFFFF00, (int)0xFFFFFF00);
    int32_t four;
    memcpy(&four, sc, 4);
    __m512i c = _mm512_shuffle_epi8(_mm512_set1_epi32(four), pick);
    __m512i e = _mm512_slli_epi32(c, 23);
    if (ANY_SPECIAL) {
        e = _mm512_mask_mov_epi32(e, _mm512_cmpeq_epi32_mask(c, _mm512_setzero_si512()), _mm512_set1_epi32(0x00400000));
        e = _mm512_mask_mov_epi32(e, _mm512_cmpeq_epi32_mask(c, _mm512_set1_epi32(255)), _mm512_set1_epi32(0x7FC00000));
    }
    return _mm512_castsi512_ps(e);
}

/* Whether any of the n scale codes at sc lies in [lo, hi]. */
AI512 int scales_inside(const uint8_t *sc, int64_t n, const int lo, const int hi) {
    const __m512i vlo = _mm512_set1_epi8((char)lo), vhi = _mm512_set1_epi8((char)hi);
    __mmask64 hit = 0;
    for (int64_t i = 0; i < n; i += 64) {
        const __mmask64 live = n - i >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (n - i)) - 1);
        __m512i v = _mm512_maskz_loadu_epi8(live, sc + i);
        hit |= _mm512_mask_cmpge_epu8_mask(live, v, vlo) & _mm512_mask_cmple_epu8_mask(live, v, vhi);
    }
    return hit != 0;
}

/* 4-bit codes, 128 at a time (four 32-element blocks, one 64-byte load): dword lane j holds codes
 * 8j .. 8j+7 of the chunk in its nibbles; shifting by 4s and looking the low nibble up in the 16-entry fp32
 * table (vpermps) yields codes {8j + s}. x is reordered to match once per call (xq[c*128 + 16s + j] =
 * x[c*128 + 8j + s]), so no code is moved across lanes: one permute per 16 weights. Lane j belongs to
 * block j / 4 for all eight shifts, so the unscaled products of a chunk are summed per lane first and the
 * block scale (exponent arithmetic) is applied once per lane and chunk by one FMA: 2^X * sum(x * v) equals
 * sum(x * v * 2^X) up to summation order (a power-of-two factor is exact away from overflow / underflow).
 * Per 16 weights: shift, permute, FMA (the former per-weight scale multiply is gone). Tail blocks (K not a
 * multiple of 128) take gemv512_rows. */
AI512 void gemv512_fp4_rows(const gjob_t *J, int64_t n, const int M, const int R, const dec512_t *D,
                            const float *sclv, int64_t b0, int64_t b1, float *part) {
    const int64_t nb = J->nb, Kp = J->Kp, nchunk = nb / 4, row_bytes = nb * 16;
    const __m512 lut = _mm512_loadu_ps(J->lut32);
    __m512 acc[2][GEMV_MAX_M];
#pragma GCC unroll 2
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) acc[r][m] = _mm512_setzero_ps();
    const int64_t c0 = b0 / 4, c1 = (b1 < 4 * nchunk ? b1 : 4 * nchunk) / 4;
    const int NT = M * R <= 2 ? 2 : 1;   /* independent partial sums per (row, x row): enough FMA chains */
    int special = 0;
#pragma GCC unroll 2
    for (int r = 0; r < R; r++) {   /* 0 (subnormal 2^-127) and 255 (NaN) need the fix-ups of scale4_512 */
        const uint8_t *sc = J->scales + (n + r) * nb + 4 * c0;
        special |= scales_inside(sc, 4 * (c1 - c0), 0, 0) | scales_inside(sc, 4 * (c1 - c0), 255, 255);
    }
#define FP4_CHUNK_LOOP(SPECIAL) \
    for (int64_t c = c0; c < c1; c++) { \
        __m512i q[2]; \
        __m512 t[2][GEMV_MAX_M][2]; \
        _Pragma("GCC unroll 2") for (int r = 0; r < R; r++) { \
            q[r] = _mm512_loadu_si512(J->codes + (n + r) * row_bytes + c * 64); \
            PF_CODES_L2(J->codes + (n + r + GEMV_PF_ROWS_FP4 * R) * row_bytes + c * 64); \
        } \
        _Pragma("GCC unroll 8") for (int sh = 0; sh < 8; sh++) { \
            __m512 w[2]; \
            _Pragma("GCC unroll 2") for (int r = 0; r < R; r++) \
                w[r] = _mm512_permutexvar_ps(sh ? _mm512_srli_epi32(q[r], 4 * sh) : q[r], lut); \
            const float *xb = J->xq + c * 128 + sh * 16; \
            _Pragma("GCC unroll 8") for (int m = 0; m < M; m++) { \
                __m512 xv = _mm512_loadu_ps(xb + m * Kp); \
                _Pragma("GCC unroll 2") for (int r = 0; r < R; r++) \
                    t[r][m][sh % NT] = sh < NT ? _mm512_mul_ps(xv, w[r]) : _mm512_fmadd_ps(xv, w[r], t[r][m][sh % NT]); \
            } \
        } \
        _Pragma("GCC unroll 2") for (int r = 0; r < R; r++) { \
            const __m512 s = scale4_512(J->scales + (n + r) * nb + 4 * c, SPECIAL); \
            _Pragma("GCC unroll 8") for (int m = 0; m < M; m++) \
                acc[r][m] = _mm512_fmadd_ps(NT == 2 ? _mm512_add_ps(t[r][m][0], t[r][m][1]) : t[r][m][0], s, acc[r][m]); \
        } \
    }
    if (special) { FP4_CHUNK_LOOP(1) } else { FP4_CHUNK_LOOP(0) }
#undef FP4_CHUNK_LOOP
#pragma GCC unroll 2
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) part[r * GEMV_MAX_M + m] += _mm512_reduce_add_ps(acc[r][m]);
    const int64_t tail0 = b0 > 4 * nchunk ? b0 : 4 * nchunk;   /* blocks past the last whole lane chunk */
    if (tail0 < b1) gemv512_rows(J, n, M, R, 4, GM_LUT6, D, sclv, tail0, b1, part);
}

/* 8-bit fp codes (MXFP8 E5M2 / E4M3), 32-element blocks, no table: the code moved to the high byte of a
 * 16-bit lane (one zero-masked vpermb) is the fp16 bit pattern of the E5M2 value (E5M2 is the top half of
 * IEEE binary16, subnormals, infinities and NaNs included); for E4M3, an arithmetic shift right by one and
 * clearing bit 14 gives sign | eeee mmm << 7, the fp16 pattern of the value times 2^-8 (E4M3 subnormals
 * land on fp16 subnormals, so the relation is exact for every finite code); vcvtph2ps widens exactly.
 * The unscaled products of a block are summed first and the block scale (times 2^8 for E4M3, from a
 * table) applied once by one FMA. E4M3 has no code the shift maps to NaN, so NaN codes (magnitude 0x7F)
 * are detected (min over ~code & 0x7F) and the rows are recomputed by gemv512_rows; so are rows with a
 * scale code in 247..254, where 2^(X + 8) is not an fp32 value. Returns 1 (nothing added to part) then. */
AI512 int gemv512_fp8_rows(const gjob_t *J, int64_t n, const int M, const int R, const int E4M3,
                           const float *sclv, int64_t b0, int64_t b1, float *part) {
    const int64_t nb = J->nb, Kp = J->Kp, row_bytes = nb * 32;
    if (E4M3)
#pragma GCC unroll 2
        for (int r = 0; r < R; r++)
            if (scales_inside(J->scales + (n + r) * nb + b0, b1 - b0, 247, 254)) return 1;
    uint8_t hi_byte[64];
    for (int i = 0; i < 32; i++) { hi_byte[2 * i] = 0; hi_byte[2 * i + 1] = (uint8_t)i; }
    const __m512i idx = _mm512_loadu_si512(hi_byte);
    const __mmask64 odd = 0xAAAAAAAAAAAAAAAAull;
    const __m512i keep = _mm512_set1_epi16((short)0xBFFF), low7 = _mm512_set1_epi8(0x7F);
    __m512i nanmin = low7;
    __m512 acc[2][GEMV_MAX_M];
#pragma GCC unroll 2
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) acc[r][m] = _mm512_setzero_ps();
    for (int64_t b = b0; b < b1; b++) {
        __m512 v[2][2], s[2];
#pragma GCC unroll 2
        for (int r = 0; r < R; r++) {
            PF_CODES(J->codes + (n + r + GEMV_PF_SETS * R) * row_bytes + b * 32);
            const __m512i raw = _mm512_zextsi256_si512(
                _mm256_loadu_si256((const __m256i *)(J->codes + (n + r) * row_bytes + b * 32)));
            __m512i h = _mm512_maskz_permutexvar_epi8(odd, idx, raw);
            if (E4M3) {
                h = _mm512_and_si512(_mm512_srai_epi16(h, 1), keep);
                nanmin = _mm512_min_epu8(nanmin, _mm512_andnot_si512(raw, low7));
            }
            v[r][0] = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
            v[r][1] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
            s[r] = _mm512_set1_ps(sclv[J->scales[(n + r) * nb + b]]);
        }
        const float *xb = J->x + b * 32;
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) {
            const __m512 x0 = _mm512_loadu_ps(xb + m * Kp), x1 = _mm512_loadu_ps(xb + m * Kp + 16);
#pragma GCC unroll 2
            for (int r = 0; r < R; r++)
                acc[r][m] = _mm512_fmadd_ps(_mm512_fmadd_ps(x1, v[r][1], _mm512_mul_ps(x0, v[r][0])), s[r], acc[r][m]);
        }
    }
    if (E4M3 && _mm512_cmpeq_epi8_mask(nanmin, _mm512_setzero_si512())) return 1;
#pragma GCC unroll 2
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) part[r * GEMV_MAX_M + m] += _mm512_reduce_add_ps(acc[r][m]);
    return 0;
}

/* 6-bit sign-magnitude fp codes (MXFP6 E2M3 / E3M2), 64 at a time (two 32-element blocks, 48 bytes): a
 * byte permute puts the three bytes of code group j (codes 4j .. 4j+3, 24 bits) in dword lane j; one bit-field
 * select per step s (vpmultishiftqb, below) brings code 4j+s to the low bits and its sign bit to bit 31, its
 * 5-bit magnitude is looked up in a 32-entry fp32 table (vpermt2ps) and the sign xor'ed in (one ternary
 * logic op). x is reordered once per
 * call to match (xq[c*64 + 16s + j] = x[c*64 + 4j + s]); lanes 0..7 belong to the first block, 8..15 to
 * the second, so the unscaled products are summed per lane over the four shifts and the two block scales
 * (fp32 table, NaN / subnormal codes included) applied once by one FMA. Tail blocks take gemv512_rows. */
AI512 void gemv512_fp6_rows(const gjob_t *J, int64_t n, const int M, const int R, const dec512_t *D,
                            const float *sclv, int64_t b0, int64_t b1, float *part) {
    const int64_t nb = J->nb, Kp = J->Kp, nchunk = nb / 2, row_bytes = nb * 24;
    const __m512 lo = _mm512_loadu_ps(J->lut32), hi = _mm512_loadu_ps(J->lut32 + 16);
    uint8_t gsel[64];
    for (int j = 0; j < 16; j++)
        for (int i = 0; i < 4; i++) gsel[4 * j + i] = (uint8_t)(3 * j + (i < 3 ? i : 2));
    const __m512i gidx = _mm512_loadu_si512(gsel), sign = _mm512_set1_epi32((int)0x80000000u);
    /* Per shift st, one vpmultishiftqb (bit fields of a qword, offsets mod 64) builds each dword lane's
     * lookup word: byte 0 = the 8 bits from code 4j+st's first bit (its 5-bit magnitude is the permute
     * index: vpermt2ps reads index bits 0..4 only) and byte 3 = the 8 bits ending at its sign bit (bit 5 of
     * the code), so the sign lands on bit 31 and is xor'ed in by the ternary op. This replaces the shift
     * right and the shift left of each step (16384 x 4096 MXFP6, batch 1, 2 threads: 2.12 -> 1.92 ms with
     * the weight warm in cache, 2.49 -> 2.35 ms streamed from DRAM). */
    __m512i pick[4];
    for (int st = 0; st < 4; st++) {
        uint8_t ctl[64];
        for (int q = 0; q < 8; q++)
            for (int half = 0; half < 2; half++) {
                const int code_bit = 32 * half + 6 * st;
                uint8_t *c = ctl + 8 * q + 4 * half;
                c[0] = c[1] = c[2] = (uint8_t)code_bit;
                c[3] = (uint8_t)((code_bit + 5 - 7 + 64) & 63);
            }
        pick[st] = _mm512_loadu_si512(ctl);
    }
    const int NT = M * R <= 2 ? 2 : 1;
    __m512 acc[2][GEMV_MAX_M];
#pragma GCC unroll 2
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) acc[r][m] = _mm512_setzero_ps();
    const int64_t c0 = b0 / 2, c1 = (b1 < 2 * nchunk ? b1 : 2 * nchunk) / 2;
    for (int64_t c = c0; c < c1; c++) {
        __m512i g[2];
        __m512 t[2][GEMV_MAX_M][2], s[2];
#pragma GCC unroll 2
        for (int r = 0; r < R; r++) {
            PF_CODES(J->codes + (n + r + GEMV_PF_SETS * R) * row_bytes + c * 48 + 47);
            g[r] = _mm512_permutexvar_epi8(gidx, _mm512_maskz_loadu_epi8(0xFFFFFFFFFFFFull,
                                                                          J->codes + (n + r) * row_bytes + c * 48));
            const uint8_t *sc = J->scales + (n + r) * nb + 2 * c;
            s[r] = _mm512_mask_mov_ps(_mm512_set1_ps(sclv[sc[0]]), 0xFF00, _mm512_set1_ps(sclv[sc[1]]));
        }
#pragma GCC unroll 4
        for (int st = 0; st < 4; st++) {
            __m512 w[2];
#pragma GCC unroll 2
            for (int r = 0; r < R; r++) {
                const __m512i gi = _mm512_multishift_epi64_epi8(pick[st], g[r]);
                w[r] = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(
                    _mm512_castps_si512(_mm512_permutex2var_ps(lo, gi, hi)), gi, sign, 0x78));
            }
            const float *xb = J->xq + c * 64 + st * 16;
#pragma GCC unroll 8
            for (int m = 0; m < M; m++) {
                const __m512 xv = _mm512_loadu_ps(xb + m * Kp);
#pragma GCC unroll 2
                for (int r = 0; r < R; r++)
                    t[r][m][st % NT] = st < NT ? _mm512_mul_ps(xv, w[r]) : _mm512_fmadd_ps(xv, w[r], t[r][m][st % NT]);
            }
        }
#pragma GCC unroll 2
        for (int r = 0; r < R; r++)
#pragma GCC unroll 8
            for (int m = 0; m < M; m++)
                acc[r][m] = _mm512_fmadd_ps(NT == 2 ? _mm512_add_ps(t[r][m][0], t[r][m][1]) : t[r][m][0], s[r], acc[r][m]);
    }
#pragma GCC unroll 2
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) part[r * GEMV_MAX_M + m] += _mm512_reduce_add_ps(acc[r][m]);
    const int64_t tail0 = b0 > 2 * nchunk ? b0 : 2 * nchunk;   /* blocks past the last whole lane chunk */
    if (tail0 < b1) gemv512_rows(J, n, M, R, 6, GM_LUT6, D, sclv, tail0, b1, part);
}

enum { PATH_GENERIC = 0, PATH_FP4 = 1, PATH_FP6 = 2, PATH_E5M2 = 3, PATH_E4M3 = 4 };

/* R rows [n, n + R) over blocks [b0, b1) with the kernel of PATH; the fp16 FP8 paths fall back to the
 * table decode for rows they decline (NaN codes, huge scales). */
AI512 void gemv512_rows_path(const gjob_t *J, int64_t n, const int M, const int R, const int BITS, const int MODE,
                             const dec512_t *D, const float *sclv, const float *sclv8, const int PATH, int64_t b0,
                             int64_t b1, float *part) {
    if (PATH == PATH_FP4) gemv512_fp4_rows(J, n, M, R, D, sclv, b0, b1, part);
    else if (PATH == PATH_FP6) gemv512_fp6_rows(J, n, M, R, D, sclv, b0, b1, part);
    else if (PATH == PATH_E5M2) { if (gemv512_fp8_rows(J, n, M, R, 0, sclv, b0, b1, part)) gemv512_rows(J, n, M, R, BITS, MODE, D, sclv, b0, b1, part); }
    else if (PATH == PATH_E4M3) { if (gemv512_fp8_rows(J, n, M, R, 1, sclv8, b0, b1, part)) gemv512_rows(J, n, M, R, BITS, MODE, D, sclv, b0, b1, part); }
    else gemv512_rows(J, n, M, R, BITS, MODE, D, sclv, b0, b1, part);
}

/* Rows [n0, n1) in groups of GEMV_GROUP rows; within a group, K in chunks small enough that the chunk of
 * x (M rows) stays in L1 while every row of the group uses it (x is re-read per row: without chunking,
 * M = 8 rows of a 4096-wide x would stream 128 KB from L2 for every 2 KB of MXFP4 weights). */
AI512 void gemv512_range_any(const gjob_t *J, int64_t n0, int64_t n1, const int M, const int BITS, const int MODE,
                             const dec512_t *D, const float *sclv, const float *sclv8, const int PATH) {
    const int64_t nb = J->nb;
    int64_t kcb = (int64_t)(128 / M) & ~(int64_t)3;   /* blocks of 32 per K chunk: M * kcb * 128 B <= 16 KiB */
    if (kcb < 4) kcb = 4;
    for (int64_t g0 = n0; g0 < n1; g0 += GEMV_GROUP) {
        const int64_t g1 = g0 + GEMV_GROUP < n1 ? g0 + GEMV_GROUP : n1;
        float part[GEMV_GROUP * GEMV_MAX_M];
        memset(part, 0, sizeof part);
        for (int64_t b0 = 0; b0 < nb; b0 += kcb) {
            const int64_t b1 = b0 + kcb < nb ? b0 + kcb : nb;
            int64_t n = g0;
            if (M <= 4 && !(PATH == PATH_FP4 && M == 1))   /* FP4 at batch 1: one stream (see GEMV_PF_ROWS_FP4) */
                for (; n + 2 <= g1; n += 2)
                    gemv512_rows_path(J, n, M, 2, BITS, MODE, D, sclv, sclv8, PATH, b0, b1, part + (n - g0) * GEMV_MAX_M);
            for (; n < g1; n++)
                gemv512_rows_path(J, n, M, 1, BITS, MODE, D, sclv, sclv8, PATH, b0, b1, part + (n - g0) * GEMV_MAX_M);
        }
        for (int64_t n = g0; n < g1; n++)
            for (int m = 0; m < M; m++)
                J->y[m * J->N + n] = part[(n - g0) * GEMV_MAX_M + m] + (J->bias ? J->bias[n] : 0.0f);
    }
}

#define DEFINE_RANGE(NAME, PATH) \
    AI512 void NAME(const gjob_t *J, int64_t n0, int64_t n1, const int M, const int BITS, const int MODE, \
                    const dec512_t *D, const float *sclv, const float *sclv8) { \
        gemv512_range_any(J, n0, n1, M, BITS, MODE, D, sclv, sclv8, PATH); \
    }
DEFINE_RANGE(gemv512_range, PATH_GENERIC)
DEFINE_RANGE(gemv512_fp4_range, PATH_FP4)
DEFINE_RANGE(gemv512_fp6_range, PATH_FP6)
DEFINE_RANGE(gemv512_e5m2_range, PATH_E5M2)
DEFINE_RANGE(gemv512_e4m3_range, PATH_E4M3)

#define GEMV512_M(FN, BITS, MODE) \
    switch (J->M) { \
    case 1: FN(J, a, b, 1, BITS, MODE, &D, sclv, sclv8); break; \
    case 2: FN(J, a, b, 2, BITS, MODE, &D, sclv, sclv8); break; \
    case 3: FN(J, a, b, 3, BITS, MODE, &D, sclv, sclv8); break; \
    case 4: FN(J, a, b, 4, BITS, MODE, &D, sclv, sclv8); break; \
    case 5: FN(J, a, b, 5, BITS, MODE, &D, sclv, sclv8); break; \
    case 6: FN(J, a, b, 6, BITS, MODE, &D, sclv, sclv8); break; \
    case 7: FN(J, a, b, 7, BITS, MODE, &D, sclv, sclv8); break; \
    default: FN(J, a, b, 8, BITS, MODE, &D, sclv, sclv8); break; \
    }

/* The MXINT8 path converts the int8 code itself: its unit 2^-frac (lut32[1]) goes into the scale table. */
T512 static void scale_table(const gjob_t *J, float *sclv) {
    const float unit = J->mode == GM_INT8 ? J->lut32[1] : 1.0f;
    for (int i = 0; i < 256; i++) sclv[i] = J->scl[i] * unit;
}

/* The scale table is E8M0 with bias 127 (what scale4_512 computes by exponent arithmetic). */
static int e8m0_scales(const gjob_t *J) {
    for (int c = 1; c < 255; c++) {
        uint32_t u;
        memcpy(&u, &J->scl[c], 4);
        if (u != (uint32_t)c << 23) return 0;
    }
    uint32_t z, nan;
    memcpy(&z, &J->scl[0], 4); memcpy(&nan, &J->scl[255], 4);
    return z == 0x00400000u && (nan & 0x7F800000u) == 0x7F800000u && (nan & 0x7FFFFFu);
}

T512 static void gemv_avx512(const gjob_t *J, int64_t a, int64_t b) {
    if (J->mode == GM_GENERIC || J->k % 32) { gemv_generic_impl(J, a, b); return; }
    dec512_t D;
    float sclv[256], sclv8[256];
    dec512_init(J, &D);
    scale_table(J, sclv);
    for (int i = 0; i < 256; i++) sclv8[i] = sclv[i] * 256.0f;   /* E4M3 path (codes 247..254 declined) */
    if (J->mode == GM_INT8) { GEMV512_M(gemv512_range, 8, GM_INT8) }
    else if (J->mode == GM_SM8 && J->k == 32 && J->fp16x == 1) { GEMV512_M(gemv512_e5m2_range, 8, GM_SM8) }
    else if (J->mode == GM_SM8 && J->k == 32 && J->fp16x == 2) { GEMV512_M(gemv512_e4m3_range, 8, GM_SM8) }
    else if (J->mode == GM_SM8) { GEMV512_M(gemv512_range, 8, GM_SM8) }
    else if (J->bits == 4 && J->k == 32 && J->xgroup == 8 && e8m0_scales(J)) { GEMV512_M(gemv512_fp4_range, 4, GM_LUT6) }
    else if (J->bits == 4) { GEMV512_M(gemv512_range, 4, GM_LUT6) }
    else if (J->bits == 6 && J->k == 32 && J->xgroup == 4) { GEMV512_M(gemv512_fp6_range, 6, GM_LUT6) }
    else if (J->bits == 6) { GEMV512_M(gemv512_range, 6, GM_LUT6) }
    else { GEMV512_M(gemv512_range, 8, GM_LUT6) }
}

/* 16 fp32 -> 16 bf16 bits, round to nearest even, NaN -> 0x7FC0 (bf16_bits above, vectorized) */
AI512 __m256i bf16x16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
}

AI512 void decode512_range(const gjob_t *J, int64_t n0, int64_t n1, const int BITS, const int MODE,
                           const dec512_t *D, const float *sclv) {
    const int64_t nb = J->nb, row_bytes = nb * J->k * BITS / 8;
    const int k = J->k;
    for (int64_t n = n0; n < n1; n++) {
        float *dst = J->out ? J->out + n * J->Kp : NULL;
        uint16_t *dst16 = J->out16 ? J->out16 + n * J->Kp : NULL;
        const uint8_t *src = J->codes + n * row_bytes;
        for (int64_t b = 0; b < nb; b++) {
            __m512 s = _mm512_set1_ps(sclv[J->scales[n * nb + b]]);
            for (int j = 0; j < k; j += 32) {
                __m512 v0, v1;
                dec512_32(src, BITS, MODE, D, &v0, &v1);
                v0 = _mm512_mul_ps(v0, s); v1 = _mm512_mul_ps(v1, s);
                if (dst16) {
                    _mm256_storeu_si256((__m256i *)dst16, bf16x16(v0));
                    _mm256_storeu_si256((__m256i *)(dst16 + 16), bf16x16(v1));
                    dst16 += 32;
                } else {
                    _mm512_storeu_ps(dst, v0);
                    _mm512_storeu_ps(dst + 16, v1);
                    dst += 32;
                }
                src += 4 * BITS;
            }
        }
    }
}

T512 static void decode_avx512(const gjob_t *J, int64_t a, int64_t b) {
    if (J->mode == GM_GENERIC || J->k % 32) { decode_generic_impl(J, a, b, 0); return; }
    dec512_t D;
    float sclv[256];
    dec512_init(J, &D);
    scale_table(J, sclv);
    if (J->mode == GM_INT8) decode512_range(J, a, b, 8, GM_INT8, &D, sclv);
    else if (J->mode == GM_SM8) decode512_range(J, a, b, 8, GM_SM8, &D, sclv);
    else if (J->bits == 4) decode512_range(J, a, b, 4, GM_LUT6, &D, sclv);
    else if (J->bits == 6) decode512_range(J, a, b, 6, GM_LUT6, &D, sclv);
    else decode512_range(J, a, b, 8, GM_LUT6, &D, sclv);
}
#endif

static gworker_fn G_GEMV = gemv_base, G_DECODE = decode_base;
static const char *G_ISA = "baseline";

/* Same rule as the quantization kernels (MICROSCALE_KERNELS_ISA caps the variant); the AVX-512 variant
 * also needs VBMI (vpermb) and F16C. */
void mxgemm_select_isa(void) {
#ifdef GEMM_X86
    const char *cap = getenv("MICROSCALE_KERNELS_ISA");
    int allow512 = !cap || !strcmp(cap, "avx512"), allow2 = allow512 || (cap && !strcmp(cap, "avx2"));
    __builtin_cpu_init();
    if (allow512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma")) {
        G_GEMV = gemv_avx512; G_DECODE = decode_avx512; G_ISA = "avx512";
    } else if (allow2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("bmi2")) {
        G_GEMV = gemv_avx2; G_DECODE = decode_avx2; G_ISA = "avx2";
    }
#endif
}

/* Rows are handed out in chunks of at most ROW_CHUNK, and at least four chunks per thread (dynamic
 * schedule: on a shared machine a descheduled thread does not hold the others back at the end). Each chunk
 * start is a new memory stream that the prefetchers pick up late: 16384 x 4096 at batch 1, 2 threads,
 * streamed from DRAM, MXFP4 took 1.49-1.62 ms with 1024-row chunks against 1.57-1.65 ms with 256 (MXFP6
 * and MXINT8 about 2% faster, MXFP8 E4M3 within noise). */
#define ROW_CHUNK 1024
static void run_rows(gworker_fn fn, const gjob_t *J, int64_t nrows, int nthreads) {
#ifdef _OPENMP
    if (nthreads > 1 && nrows > 2 * GEMV_GROUP) {
        int64_t chunk = nrows / (4 * (int64_t)nthreads);
        chunk = chunk > ROW_CHUNK ? ROW_CHUNK : (chunk < GEMV_GROUP ? GEMV_GROUP : chunk / GEMV_GROUP * GEMV_GROUP);
        const int64_t nchunks = (nrows + chunk - 1) / chunk;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
        for (int64_t c = 0; c < nchunks; c++) {
            int64_t a = c * chunk, b = a + chunk < nrows ? a + chunk : nrows;
            fn(J, a, b);
        }
        return;
    }
#endif
    (void)nthreads;
    fn(J, 0, nrows);
}

static int parse_common(gjob_t *J, unsigned long long codes, unsigned long long scales, long long N, long long nb,
                        int k, int bits, int mode, unsigned long long lut32, unsigned long long lut16,
                        unsigned long long scl) {
    memset(J, 0, sizeof *J);
    if (N < 1 || nb < 1 || k < 1 || k > GEMM_MAXK || k % 16 || (bits != 4 && bits != 6 && bits != 8) ||
        (k * bits) % 32 || mode < GM_GENERIC || mode > GM_INT8 || ((mode == GM_SM8 || mode == GM_INT8) && bits != 8) ||
        (mode == GM_LUT6 && bits > 6) || !codes || !scales || !lut32 || !scl ||
        ((mode == GM_LUT6 || mode == GM_SM8) && !lut16)) {
        PyErr_SetString(PyExc_ValueError, "bad packed_linear kernel arguments");
        return -1;
    }
    J->codes = (const uint8_t *)(uintptr_t)codes; J->scales = (const uint8_t *)(uintptr_t)scales;
    J->N = N; J->nb = nb; J->k = k; J->bits = bits; J->mode = mode;
    J->lut32 = (const float *)(uintptr_t)lut32; J->lut16 = (const uint16_t *)(uintptr_t)lut16;
    J->scl = (const float *)(uintptr_t)scl;
    J->Kp = nb * k;
    return 0;
}

#ifdef GEMM_X86
/* Which fp16 reading of 8-bit codes reproduces the element table lut32 exactly: 1 when every code c is
 * the fp16 pattern c << 8 (E5M2), 2 when every non-NaN code is 2^8 times the fp16 pattern
 * (c << 8 >> 1, arithmetic, bit 14 cleared) and the NaN codes are exactly magnitude 0x7F (E4M3), else 0. */
__attribute__((target("f16c"))) static int fp8_as_fp16(const float *lut32) {
    int e5 = 1, e4 = 1;
    for (int c = 0; c < 256; c++) {
        const float want = lut32[c];
        const float a = _cvtsh_ss((unsigned short)(c << 8));
        const float b = _cvtsh_ss((unsigned short)((((uint16_t)(int16_t)((int16_t)(c << 8) >> 1)) & 0xBFFFu))) * 256.0f;
        uint32_t uw, ua, ub;
        memcpy(&uw, &want, 4); memcpy(&ua, &a, 4); memcpy(&ub, &b, 4);
        if (!(uw == ua || (want != want && a != a))) e5 = 0;
        if ((c & 0x7F) == 0x7F ? want == want : uw != ub) e4 = 0;
    }
    return e5 ? 1 : e4 ? 2 : 0;
}

/* Whether 6-bit codes are sign-magnitude (code | 0x20 negates, bit for bit) with no NaN. */
static int sign_magnitude6(const float *lut32) {
    for (int c = 0; c < 32; c++) {
        uint32_t p, q;
        memcpy(&p, &lut32[c], 4); memcpy(&q, &lut32[c | 32], 4);
        if (lut32[c] != lut32[c] || q != (p ^ 0x80000000u)) return 0;
    }
    return 1;
}
#endif

/* gemv(x, M, codes, scales, N, nb, k, bits, mode, lut32, lut16, scl, bias_or_0, y, nthreads) */
static PyObject *py_gemv(PyObject *self, PyObject *args) {
    unsigned long long x, codes, scales, lut32, lut16, scl, bias, y;
    long long M, N, nb;
    int k, bits, mode, nt;
    gjob_t J;
    (void)self;
    if (!PyArg_ParseTuple(args, "KLKKLLiiiKKKKKi", &x, &M, &codes, &scales, &N, &nb, &k, &bits, &mode, &lut32,
                          &lut16, &scl, &bias, &y, &nt))
        return NULL;
    if (parse_common(&J, codes, scales, N, nb, k, bits, mode, lut32, lut16, scl)) return NULL;
    if (M < 1 || M > GEMV_MAX_M || !x || !y) {
        PyErr_SetString(PyExc_ValueError, "bad packed_linear kernel arguments (gemv takes 1..8 rows)");
        return NULL;
    }
    J.x = (const float *)(uintptr_t)x; J.M = M;
    J.bias = (const float *)(uintptr_t)bias; J.y = (float *)(uintptr_t)y;
    float *xq = NULL;
#ifdef GEMM_X86
    if (G_GEMV == gemv_avx512 && k == 32 && mode == GM_SM8) J.fp16x = fp8_as_fp16(J.lut32);
    if (G_GEMV == gemv_avx512 && k == 32 && mode == GM_LUT6 && bits == 6) J.sm6 = sign_magnitude6(J.lut32);
    const int group = G_GEMV != gemv_avx512 || k != 32 || mode != GM_LUT6 ? 0 : bits == 4 ? 8 : J.sm6 ? 4 : 0;
    if (group) {
        /* x in the order of the lane loops: per chunk of 16 * group elements, xq[16 s + j] = x[group * j + s] */
        const int64_t C = 16 * group, KC = J.Kp / C * C;
        xq = (float *)malloc((size_t)(M * J.Kp) * sizeof(float));
        if (!xq) return PyErr_NoMemory();
        for (int64_t m = 0; m < M; m++) {
            const float *xr = J.x + m * J.Kp;
            float *qr = xq + m * J.Kp;
            for (int64_t c = 0; c < KC; c += C)
                for (int sft = 0; sft < group; sft++)
                    for (int j = 0; j < 16; j++) qr[c + 16 * sft + j] = xr[c + group * j + sft];
            memcpy(qr + KC, xr + KC, (size_t)(J.Kp - KC) * sizeof(float));
        }
        J.xq = xq;
        J.xgroup = group;
    }
#endif
    Py_BEGIN_ALLOW_THREADS
    run_rows(G_GEMV, &J, N, nt);
    Py_END_ALLOW_THREADS
    free(xq);
    Py_RETURN_NONE;
}

/* decode(codes, scales, N, nb, k, bits, mode, lut32, lut16, scl, out, nthreads): rows [0, N) of the given
 * codes / scales (the caller offsets the pointers to a tile) -> fp32 out [N, nb * k]; decode_bf16: the same
 * with out a bf16 [N, nb * k] buffer. */
static PyObject *decode_entry(PyObject *args, int bf16) {
    unsigned long long codes, scales, lut32, lut16, scl, out;
    long long N, nb;
    int k, bits, mode, nt;
    gjob_t J;
    if (!PyArg_ParseTuple(args, "KKLLiiiKKKKi", &codes, &scales, &N, &nb, &k, &bits, &mode, &lut32, &lut16, &scl,
                          &out, &nt))
        return NULL;
    if (parse_common(&J, codes, scales, N, nb, k, bits, mode, lut32, lut16, scl)) return NULL;
    if (!out) {
        PyErr_SetString(PyExc_ValueError, "bad packed_linear kernel arguments (no output)");
        return NULL;
    }
    if (bf16) J.out16 = (uint16_t *)(uintptr_t)out;
    else J.out = (float *)(uintptr_t)out;
    Py_BEGIN_ALLOW_THREADS
    run_rows(G_DECODE, &J, N, nt);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_decode(PyObject *self, PyObject *args) { (void)self; return decode_entry(args, 0); }
static PyObject *py_decode_bf16(PyObject *self, PyObject *args) { (void)self; return decode_entry(args, 1); }

static PyObject *py_gemm_info(PyObject *self, PyObject *noargs) {
    (void)self; (void)noargs;
    return Py_BuildValue("{s:s,s:i,s:i}", "isa", G_ISA, "gemv_max_rows", GEMV_MAX_M, "max_block", GEMM_MAXK);
}

static PyMethodDef gemm_methods[] = {
    {"gemm_gemv", py_gemv, METH_VARARGS, "fused packed-weight GEMV: y[M, N] = x[M, Kp] . dequant(W)^T (+ bias)"},
    {"gemm_decode", py_decode, METH_VARARGS, "decode packed weight rows to fp32 (one GEMM tile)"},
    {"gemm_decode_bf16", py_decode_bf16, METH_VARARGS, "decode packed weight rows to bf16 (one bf16 GEMM tile)"},
    {"gemm_info", py_gemm_info, METH_NOARGS, "build facts of the packed GEMM kernels: selected ISA"},
    {NULL, NULL, 0, NULL},
};

/* Called from PyInit__mxkernels: selects the ISA variant and adds the functions above to the module. */
int mxgemm_add_functions(PyObject *module) {
    mxgemm_select_isa();
    return PyModule_AddFunctions(module, gemm_methods);
}

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
 *   avx512 (F+BW+VL+VBMI, F16C): 32 codes at a time: one masked load, a byte permute (vpermb) that puts
 *     each code's two source bytes in a 16-bit lane, a per-lane shift (vpsrlvw) and mask; the code is then
 *     looked up as the fp16 bit pattern of v (vpermt2w over a 64-entry table; 8-bit sign-magnitude fp
 *     codes use 128 magnitudes + the sign bit; MXINT8 converts the int8 code directly), widened to fp32
 *     with vcvtph2ps (every MX element value is an fp16 value), multiplied by 2^X and FMA'd into
 *     16-lane accumulators.
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

/* R output rows at a time (R = 2 when M <= 4: more independent FMA chains and one x load for two rows). */
AI512 void gemv512_rows(const gjob_t *J, int64_t n, const int M, const int R, const int BITS, const int MODE,
                        const dec512_t *D, const float *sclv, int64_t b0, int64_t b1, float *part) {
    const int64_t nb = J->nb, Kp = J->Kp;
    const int k = J->k, chunk_bytes = 4 * BITS;
    const int64_t row_bytes = nb * k * BITS / 8;
    __m512 acc[2][GEMV_MAX_M][2];
#pragma GCC unroll 2
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) acc[r][m][0] = acc[r][m][1] = _mm512_setzero_ps();
    for (int64_t b = b0; b < b1; b++) {
        __m512 s[2];
#pragma GCC unroll 2
        for (int r = 0; r < R; r++) s[r] = _mm512_set1_ps(sclv[J->scales[(n + r) * nb + b]]);
        const uint8_t *src0 = J->codes + n * row_bytes + b * (int64_t)(k * BITS / 8);
        for (int j = 0; j < k; j += 32) {
            __m512 w[2][2];
#pragma GCC unroll 2
            for (int r = 0; r < R; r++) {
                dec512_32(src0 + r * row_bytes + (j / 32) * chunk_bytes, BITS, MODE, D, &w[r][0], &w[r][1]);
                w[r][0] = _mm512_mul_ps(w[r][0], s[r]);
                w[r][1] = _mm512_mul_ps(w[r][1], s[r]);
            }
            const float *xb = J->x + b * k + j;
#pragma GCC unroll 8
            for (int m = 0; m < M; m++) {
                __m512 x0 = _mm512_loadu_ps(xb + m * Kp), x1 = _mm512_loadu_ps(xb + m * Kp + 16);
#pragma GCC unroll 2
                for (int r = 0; r < R; r++) {
                    acc[r][m][0] = _mm512_fmadd_ps(x0, w[r][0], acc[r][m][0]);
                    acc[r][m][1] = _mm512_fmadd_ps(x1, w[r][1], acc[r][m][1]);
                }
            }
        }
    }
#pragma GCC unroll 2
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) part[r * GEMV_MAX_M + m] += _mm512_reduce_add_ps(_mm512_add_ps(acc[r][m][0], acc[r][m][1]));
}

/* 2^X of four E8M0 scale codes, each repeated over four lanes (lane j: code j / 4), by exponent
 * arithmetic: the fp32 bits of 2^(c - 127) are c << 23 for c in 1..254; c = 0 is the subnormal 2^-127 and
 * c = 255 NaN. */
AI512 __m512 scale4_512(const uint8_t *sc) {
    uint32_t four;
    memcpy(&four, sc, 4);
    const __m512i pick = _mm512_set_epi32(0xFFFFFF03, 0xFFFFFF03, 0xFFFFFF03, 0xFFFFFF03, 0xFFFFFF02, 0xFFFFFF02,
                                          0xFFFFFF02, 0xFFFFFF02, 0xFFFFFF01, 0xFFFFFF01, 0xFFFFFF01, 0xFFFFFF01,
                                          (int)0xFFFFFF00, (int)0xFFFFFF00, (int)0xFFFFFF00, (int)0xFFFFFF00);
    __m512i c = _mm512_shuffle_epi8(_mm512_set1_epi32((int)four), pick);
    __m512i e = _mm512_slli_epi32(c, 23);
    e = _mm512_mask_mov_epi32(e, _mm512_cmpeq_epi32_mask(c, _mm512_setzero_si512()), _mm512_set1_epi32(0x00400000));
    e = _mm512_mask_mov_epi32(e, _mm512_cmpeq_epi32_mask(c, _mm512_set1_epi32(255)), _mm512_set1_epi32(0x7FC00000));
    return _mm512_castsi512_ps(e);
}

/* 4-bit codes, 128 at a time (four 32-element blocks, one 64-byte load): dword lane j holds codes
 * 8j .. 8j+7 of the chunk in its nibbles; shifting by 4s and looking the low nibble up in the 16-entry fp32
 * table (vpermps) yields codes {8j + s}. x is reordered to match once per call (xq[c*128 + 16s + j] =
 * x[c*128 + 8j + s]), so no code is moved across lanes: one permute per 16 weights, and the scale of the
 * lane's block (j / 4) by exponent arithmetic. Tail blocks (K not a multiple of 128) take dec512_32. */
AI512 void gemv512_fp4_rows(const gjob_t *J, int64_t n, const int M, const int R, const dec512_t *D,
                            const float *sclv, int64_t b0, int64_t b1, float *part) {
    const int64_t nb = J->nb, Kp = J->Kp, nchunk = nb / 4, row_bytes = nb * 16;
    const __m512 lut = _mm512_loadu_ps(J->lut32);
    __m512 acc[2][GEMV_MAX_M][2];
#pragma GCC unroll 2
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) acc[r][m][0] = acc[r][m][1] = _mm512_setzero_ps();
    const int64_t c1 = (b1 < 4 * nchunk ? b1 : 4 * nchunk) / 4;
    for (int64_t c = b0 / 4; c < c1; c++) {
        __m512i q[2];
        __m512 s[2];
#pragma GCC unroll 2
        for (int r = 0; r < R; r++) {
            q[r] = _mm512_loadu_si512(J->codes + (n + r) * row_bytes + c * 64);
            s[r] = scale4_512(J->scales + (n + r) * nb + 4 * c);
        }
#pragma GCC unroll 8
        for (int sh = 0; sh < 8; sh++) {
            __m512 w[2];
#pragma GCC unroll 2
            for (int r = 0; r < R; r++)
                w[r] = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(q[r], 4 * sh), lut), s[r]);
            const float *xb = J->xq + c * 128 + sh * 16;
#pragma GCC unroll 8
            for (int m = 0; m < M; m++) {
                __m512 xv = _mm512_loadu_ps(xb + m * Kp);
#pragma GCC unroll 2
                for (int r = 0; r < R; r++) acc[r][m][sh & 1] = _mm512_fmadd_ps(xv, w[r], acc[r][m][sh & 1]);
            }
        }
    }
    for (int64_t b = b0 > 4 * nchunk ? b0 : 4 * nchunk; b < b1; b++) {
#pragma GCC unroll 2
        for (int r = 0; r < R; r++) {
            __m512 v0, v1, sv = _mm512_set1_ps(sclv[J->scales[(n + r) * nb + b]]);
            dec512_32(J->codes + (n + r) * row_bytes + b * 16, 4, GM_LUT6, D, &v0, &v1);
            v0 = _mm512_mul_ps(v0, sv); v1 = _mm512_mul_ps(v1, sv);
#pragma GCC unroll 8
            for (int m = 0; m < M; m++) {
                acc[r][m][0] = _mm512_fmadd_ps(_mm512_loadu_ps(J->x + m * Kp + b * 32), v0, acc[r][m][0]);
                acc[r][m][1] = _mm512_fmadd_ps(_mm512_loadu_ps(J->x + m * Kp + b * 32 + 16), v1, acc[r][m][1]);
            }
        }
    }
#pragma GCC unroll 2
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) part[r * GEMV_MAX_M + m] += _mm512_reduce_add_ps(_mm512_add_ps(acc[r][m][0], acc[r][m][1]));
}

/* Rows [n0, n1) in groups of GEMV_GROUP rows; within a group, K in chunks small enough that the chunk of
 * x (M rows) stays in L1 while every row of the group uses it (x is re-read per row: without chunking,
 * M = 8 rows of a 4096-wide x would stream 128 KB from L2 for every 2 KB of MXFP4 weights). */
AI512 void gemv512_range_any(const gjob_t *J, int64_t n0, int64_t n1, const int M, const int BITS, const int MODE,
                             const dec512_t *D, const float *sclv, const int FP4) {
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
            if (M <= 4)
                for (; n + 2 <= g1; n += 2) {
                    if (FP4) gemv512_fp4_rows(J, n, M, 2, D, sclv, b0, b1, part + (n - g0) * GEMV_MAX_M);
                    else gemv512_rows(J, n, M, 2, BITS, MODE, D, sclv, b0, b1, part + (n - g0) * GEMV_MAX_M);
                }
            for (; n < g1; n++) {
                if (FP4) gemv512_fp4_rows(J, n, M, 1, D, sclv, b0, b1, part + (n - g0) * GEMV_MAX_M);
                else gemv512_rows(J, n, M, 1, BITS, MODE, D, sclv, b0, b1, part + (n - g0) * GEMV_MAX_M);
            }
        }
        for (int64_t n = g0; n < g1; n++)
            for (int m = 0; m < M; m++)
                J->y[m * J->N + n] = part[(n - g0) * GEMV_MAX_M + m] + (J->bias ? J->bias[n] : 0.0f);
    }
}

AI512 void gemv512_fp4_range(const gjob_t *J, int64_t n0, int64_t n1, const int M, const int BITS, const int MODE,
                             const dec512_t *D, const float *sclv) {
    gemv512_range_any(J, n0, n1, M, BITS, MODE, D, sclv, 1);
}

AI512 void gemv512_range(const gjob_t *J, int64_t n0, int64_t n1, const int M, const int BITS, const int MODE,
                         const dec512_t *D, const float *sclv) {
    gemv512_range_any(J, n0, n1, M, BITS, MODE, D, sclv, 0);
}

#define GEMV512_M(FN, BITS, MODE) \
    switch (J->M) { \
    case 1: FN(J, a, b, 1, BITS, MODE, &D, sclv); break; \
    case 2: FN(J, a, b, 2, BITS, MODE, &D, sclv); break; \
    case 3: FN(J, a, b, 3, BITS, MODE, &D, sclv); break; \
    case 4: FN(J, a, b, 4, BITS, MODE, &D, sclv); break; \
    case 5: FN(J, a, b, 5, BITS, MODE, &D, sclv); break; \
    case 6: FN(J, a, b, 6, BITS, MODE, &D, sclv); break; \
    case 7: FN(J, a, b, 7, BITS, MODE, &D, sclv); break; \
    default: FN(J, a, b, 8, BITS, MODE, &D, sclv); break; \
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
    float sclv[256];
    dec512_init(J, &D);
    scale_table(J, sclv);
    if (J->mode == GM_INT8) { GEMV512_M(gemv512_range, 8, GM_INT8) }
    else if (J->mode == GM_SM8) { GEMV512_M(gemv512_range, 8, GM_SM8) }
    else if (J->bits == 4 && J->k == 32 && J->xq && e8m0_scales(J)) { GEMV512_M(gemv512_fp4_range, 4, GM_LUT6) }
    else if (J->bits == 4) { GEMV512_M(gemv512_range, 4, GM_LUT6) }
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

/* Rows are handed out in chunks of ROW_CHUNK (dynamic schedule: on a shared machine a descheduled thread
 * does not hold the others back at the end). */
#define ROW_CHUNK 256
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
    if (G_GEMV == gemv_avx512 && bits == 4 && k == 32 && mode == GM_LUT6) {
        /* x in the order of the 4-bit nibble-lane loop: per 128-element chunk, xq[16 s + j] = x[8 j + s] */
        xq = (float *)malloc((size_t)(M * J.Kp) * sizeof(float));
        if (!xq) return PyErr_NoMemory();
        const int64_t K128 = J.Kp / 128 * 128;
        for (int64_t m = 0; m < M; m++) {
            const float *xr = J.x + m * J.Kp;
            float *qr = xq + m * J.Kp;
            for (int64_t c = 0; c < K128; c += 128)
                for (int sft = 0; sft < 8; sft++)
                    for (int j = 0; j < 16; j++) qr[c + 16 * sft + j] = xr[c + 8 * j + sft];
            memcpy(qr + K128, xr + K128, (size_t)(J.Kp - K128) * sizeof(float));
        }
        J.xq = xq;
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

/* Shared scalar pieces of the MX C kernels: format and job descriptors, fp32/bf16/fp16 bit helpers,
 * the shared-exponent rule, element rounding (quant_elem / quant_fast) and element decode; code packing
 * is in _mxpack.h (included at the end).
 * Included by _mxloops.c (the quantize / dequantize loops) and by any other kernel file of the same
 * extension that must round exactly as they do; everything here is static inline (no symbols exported).
 * The arithmetic is described at the top of _mxloops.c. */
#ifndef MICROSCALE_MXSCALAR_H
#define MICROSCALE_MXSCALAR_H
#include <stdint.h>
#include <string.h>

#define MAXK 1024   /* largest block size handled here (bigger blocks fall back to the reference) */
#define TILE 64     /* columns per tile when inner > 1 */
#define MAXK2 256   /* largest block size of two-level (microexponent) formats handled here */
#define CHUNK 512   /* elements per chunk of whole blocks in the two-level row loops (>= MAXK2) */

#if defined(__GNUC__)
#define AINLINE static inline __attribute__((always_inline))
#define NOINLINE __attribute__((noinline))
#else
#define AINLINE static inline
#define NOINLINE
#endif

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2, DT_F64 = 3 };
enum { R_EVEN = 0, R_AWAY = 1, R_ZERO = 2, R_STOCH = 3 };
enum { S_FLOOR = 0, S_CEIL = 1, S_EVEN = 2, S_RCEIL = 3 };
enum { ENC_FP = 0, ENC_TWOS = 1, ENC_SIGNMAG = 2 };

typedef struct {
    /* element (ints are described as fp-like: emin = emax_int, mbits = int_bits - 2) */
    int32_t emin, mbits, maxmag, inf_mag, nmax, pmaxbase, enc, bits;
    /* shared scale */
    int32_t emax, even_m, flm, sigm, s_emin, s_emax, s_bias, s_nan;
    int32_t k;
    /* second level (BDR two-level formats): k2-element sub-blocks with a d2-bit microexponent; k2 = 0: none */
    int32_t k2, d2, beta;       /* beta = 2^d2 - 1, the largest microexponent */
    uint32_t half_mask, even;   /* deterministic rounding: set per call from the rounding mode */
} fmt_t;

typedef struct {
    const void *in;
    void *out;          /* fake-quantize / dequantize output (dtype odt) */
    uint8_t *codes;     /* packed codes (quantize) or input codes (dequantize) */
    uint8_t *scales;
    uint8_t *micro;     /* two-level: unpacked microexponents, one byte per sub-block (quantize) or the
                         * packed d2-bit stream (dequantize) */
    int64_t outer, L, inner, nb;   /* nb: blocks per vector */
    int idt, odt, rnd, smode;
    uint32_t seed;
    fmt_t f;
} job_t;

/* ---- scalar helpers -------------------------------------------------------------------------- */
AINLINE uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
AINLINE uint64_t d2u(double f) { uint64_t u; memcpy(&u, &f, 8); return u; }

AINLINE uint32_t f16_to_f32bits(uint32_t h) {
    uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1F, m = h & 0x3FF;
    uint32_t norm = ((e + 112u) << 23) | (m << 13);
    uint32_t sub = f2u((float)(int32_t)m) - (24u << 23);
    uint32_t spec = 0x7F800000u | (m << 13);
    uint32_t r = e == 31 ? spec : (e == 0 ? (m ? sub : 0u) : norm);
    return r | sign;
}

AINLINE uint32_t f32bits_to_bf16(uint32_t u) {
    uint32_t isnan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return isnan ? 0x7FC0u : r;
}

/* Round-to-nearest-even fp32 -> fp16 (IEEE; NaN -> 0x7E00 with the sign, like torch). */
AINLINE uint32_t f32bits_to_f16(uint32_t u) {
    uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
    int32_t e = (int32_t)(a >> 23) - 127;
    uint32_t m24 = (a & 0x7FFFFFu) | 0x800000u;
    int32_t rs = -e - 1;               /* units of 2^-24: m24 * 2^(e+1) */
    rs = rs < 0 ? 0 : (rs > 31 ? 31 : rs);
    uint32_t sub = (m24 + ((1u << rs) >> 1) - 1u + ((m24 >> rs) & 1u)) >> rs;
    uint32_t hb = a - (112u << 23);
    uint32_t norm = (hb + 0xFFFu + ((hb >> 13) & 1u)) >> 13;
    uint32_t r = a < 0x38800000u ? sub : norm;
    r = a >= 0x477FF000u ? 0x7C00u : r;
    r = a > 0x7F800000u ? 0x7E00u : r;
    return r | sign;
}

AINLINE uint32_t load_bits(const void *p, int64_t i, const int dt) {
    if (dt == DT_F32) return ((const uint32_t *)p)[i];
    if (dt == DT_BF16) return (uint32_t)((const uint16_t *)p)[i] << 16;
    return f16_to_f32bits(((const uint16_t *)p)[i]);
}

/* out bits: fp32 bits of the value (fp64 outputs are handled by store_val64). */
AINLINE void store_bits(void *p, int64_t i, uint32_t u, const int dt) {
    if (dt == DT_F32) ((uint32_t *)p)[i] = u;
    else if (dt == DT_BF16) ((uint16_t *)p)[i] = (uint16_t)f32bits_to_bf16(u);
    else ((uint16_t *)p)[i] = (uint16_t)f32bits_to_f16(u);
}

AINLINE uint32_t lowbias32(uint32_t x) {
    x ^= x >> 16; x *= 0x7FEB352Du; x ^= x >> 15; x *= 0x846CA68Bu; x ^= x >> 16;
    return x;
}

/* Shared exponent X of a block from its amax bits (finite, >= 0); see reference.shared_exponent. */
AINLINE int32_t shared_exp(uint32_t amax, int smode, const fmt_t *f) {
    if (amax == 0) return f->s_emin;
    int32_t fl; uint32_t sig;
    if (amax >> 23) { fl = (int32_t)(amax >> 23) - 127; sig = (amax & 0x7FFFFFu) | 0x800000u; }
    else {
        int p = 31 - __builtin_clz(amax);
        fl = p - 149; sig = amax << (23 - p);
    }
    int32_t x;
    switch (smode) {
    case S_FLOOR: x = fl - f->emax; break;
    case S_CEIL: x = fl + (sig != 0x800000u) - f->emax; break;
    case S_EVEN: x = fl + (int32_t)((sig + (1u << (22 - f->even_m))) >> 24) - f->emax; break;
    default: x = fl - f->flm + (sig > (uint32_t)f->sigm); break;
    }
    return x < f->s_emin ? f->s_emin : (x > f->s_emax ? f->s_emax : x);
}

/* shared_exp in a branch-free form for loops over many blocks: every scale mode is
 *   X = floor(log2 amax) - off + ((sig + addc) >> 24)    (sig: amax's 24-bit significand)
 * with off = emax_elem and addc = 0 (floor), 2^23 - 1 (ceil: +1 unless a power of two), 2^(22 - even_m)
 * (even: the significand rounded to even_m bits carries), or off = floor(log2 max_normal) and
 * addc = 2^24 - 1 - sigm (rceil: +1 when sig > sigm); see smode_consts. A subnormal amax is normalized by
 * an exact int->float conversion instead of clz (which does not vectorize). */
typedef struct { int32_t off; uint32_t addc; } smode_t;

static inline smode_t smode_consts(int smode, const fmt_t *f) {
    smode_t c;
    c.off = smode == S_RCEIL ? f->flm : f->emax;
    c.addc = smode == S_FLOOR ? 0u : smode == S_CEIL ? 0x7FFFFFu : smode == S_EVEN ? (1u << (22 - f->even_m))
                                                                                    : 0xFFFFFFu - (uint32_t)f->sigm;
    return c;
}

AINLINE int32_t shared_exp_c(uint32_t amax, smode_t c, const fmt_t *f) {
    uint32_t fb = f2u((float)(int32_t)(amax & 0x7FFFFFu));
    int norm = (amax >> 23) != 0;
    int32_t fl = norm ? (int32_t)(amax >> 23) - 127 : (int32_t)(fb >> 23) - 276;
    uint32_t sig = ((norm ? amax : fb) & 0x7FFFFFu) | 0x800000u;
    int32_t x = fl - c.off + (int32_t)((sig + c.addc) >> 24);
    x = x < f->s_emin ? f->s_emin : (x > f->s_emax ? f->s_emax : x);
    return amax ? x : f->s_emin;
}

/* One element: fp32 bits b (finite), shared exponent X, random word u (stochastic only).
 * Returns the element code in *code and the fp32 bits of its dequantized value in *val. */
AINLINE void quant_elem(uint32_t b, int32_t X, uint32_t u, const int RND, const fmt_t *f, uint32_t *code, uint32_t *val) {
    const int32_t emin = f->emin, mb = f->mbits;
    uint32_t sign = b & 0x80000000u, a = b & 0x7FFFFFFFu;
    uint32_t ef = a >> 23, man = a & 0x7FFFFFu;
    uint32_t fb = f2u((float)(int32_t)man);
    int32_t ev = ef ? (int32_t)ef - 127 : (int32_t)(fb >> 23) - 276;
    uint32_t sig = (ef ? man : (fb & 0x7FFFFFu)) | 0x800000u;
    int32_t d = ev - X - emin;
    int32_t sh = 23 - mb + (d < 0 ? -d : 0);
    uint32_t r;
    if (RND == R_STOCH) {
        int32_t sl = 24 - sh, sr = sh - 24;
        sl = sl < 0 ? 0 : sl; sr = sr > 63 ? 63 : (sr < 0 ? 0 : sr);
        uint64_t T = (uint64_t)sig << 30;                 /* t * 2^54 = sig * 2^(54 - sh) */
        uint64_t W = sh <= 24 ? (T << sl) : (T >> sr);
        uint64_t frac = W & ((1ull << 54) - 1);
        /* reference: floor(t + u * 2^-32) in float64: the sum rounds to 53 bits, so it reaches 1
         * from below once the exact sum is >= 1 - 2^-54 (see module docstring) */
        r = (uint32_t)(W >> 54) + (((uint64_t)u << 22) + frac >= (1ull << 54) - 1);
    } else {
        /* even: + half - 1 + lsb; away: + half; zero: + 0 (rnd is a runtime constant of the call) */
        sh = sh > 25 ? 25 : sh;
        uint32_t half = (1u << (sh - 1)) & f->half_mask;
        r = (sig + half - f->even + (((sig >> sh) & 1u) & f->even)) >> sh;
    }
    int32_t dd = d > 0 ? d : 0;
    int32_t cm = (dd << mb) + (int32_t)r;
    int sat = cm > f->maxmag;
    cm = sat ? f->maxmag : cm;
    uint32_t N = sat ? (uint32_t)f->nmax : r;
    int32_t P = (sat ? f->pmaxbase : dd + emin - mb) + X;
    /* value N * 2^P as fp32 bits */
    uint32_t nb = f2u((float)(int32_t)N);
    int32_t fe = (int32_t)(nb >> 23) + P;
    int32_t s2 = P + 149; s2 = s2 < 0 ? 0 : (s2 > 31 ? 31 : s2);
    uint32_t v = fe >= 1 ? nb + ((uint32_t)P << 23) : (N << s2);
    v = fe >= 255 ? 0x7F800000u : v;
    v = N == 0 ? 0u : v;
    /* fp elements keep the sign of zero; int codes decode to +0 */
    *val = v | ((f->enc == ENC_FP || N) ? sign : 0u);
    uint32_t twos = (sign ? (uint32_t)(-cm) : (uint32_t)cm) & ((1u << f->bits) - 1u);
    *code = f->enc == ENC_TWOS ? twos : ((uint32_t)cm | (sign >> (32 - f->bits)));
}


/* Fast deterministic path (RND != R_STOCH) for blocks whose element-subnormal threshold is a normal fp32
 * exponent: T = X + emin + 127 >= 1. Then every fp32-subnormal input lies below the element's normal
 * range, so all inputs share one formulation without normalizing subnormals: with E the biased exponent
 * field, Ee = max(E, 1) and sig = mantissa | (E ? 2^23 : 0), |v| = sig * 2^(Ee - 150), d = Ee - T, and
 * the element rounds sig at sh = 23 - mb + max(-d, 0) bits (same rounding as quant_elem). The rounded
 * value is (Ee - 1) * 2^23 + (r << sh) as fp32 bits (a carry into the exponent is exact), 0 when r == 0;
 * saturation is a clamp at the fp32 bits of the largest element value times 2^X (monotone). */
AINLINE void quant_fast(uint32_t b, int32_t T, uint32_t maxb, const fmt_t *f, uint32_t *code, uint32_t *val,
                        const int WANTV, const int WANTC) {
    const int32_t mb = f->mbits;
    const uint32_t fpm = f->enc == ENC_FP ? ~0u : 0u;
    uint32_t sign = b & 0x80000000u, a = b & 0x7FFFFFFFu;
    uint32_t hasimp = (uint32_t)((int32_t)(0x7FFFFFu - a) >> 31) & 0x800000u;   /* a >= 2^23 */
    uint32_t am = a > 0x800000u ? a : 0x800000u;
    int32_t Ee = (int32_t)(am >> 23);
    uint32_t sig = (a & 0x7FFFFFu) | hasimp;
    int32_t d = Ee - T;
    int32_t nd = -d;
    nd = nd > 0 ? nd : 0;
    int32_t sh = 23 - mb + nd;
    sh = sh < 25 ? sh : 25;
    uint32_t half = (1u << (sh - 1)) & f->half_mask;
    uint32_t r = (sig + half - f->even + ((sig >> sh) & f->even)) >> sh;
    if (WANTV) {
        uint32_t rz = (uint32_t)((int32_t)(0u - r) >> 31);                     /* r != 0 */
        uint32_t v = (((uint32_t)(Ee - 1) << 23) + (r << sh)) & rz;
        v = v < maxb ? v : maxb;
        uint32_t vz = (uint32_t)((int32_t)(0u - v) >> 31);                     /* v != 0 */
        *val = v | (sign & (fpm | vz));
    }
    if (WANTC) {
        int32_t dd = d > 0 ? d : 0;
        int32_t cm = (dd << mb) + (int32_t)r;
        cm = cm < f->maxmag ? cm : f->maxmag;
        uint32_t twos = (sign ? (uint32_t)(-cm) : (uint32_t)cm) & ((1u << f->bits) - 1u);
        *code = f->enc == ENC_TWOS ? twos : ((uint32_t)cm | (sign >> (32 - f->bits)));
    }
}

/* Store of a quant_fast value (or the NaN 0x7FC00000): element values have at most 7 significant bits,
 * so they (and Inf/NaN) are exact in bf16 and the bf16 rounding reduces to taking the high half. */
AINLINE void store_fast(void *p, int64_t i, uint32_t u, const int dt) {
    if (dt == DT_BF16) ((uint16_t *)p)[i] = (uint16_t)(u >> 16);
    else store_bits(p, i, u, dt);
}

/* ---- runs of values with a runtime dtype (two-level paths: the dtype only changes these loops, so it
 * is not a compile-time parameter of the heavy ones, which keeps the build small) ------------------ */
/* fp32 bits of in[base .. base + n) */
AINLINE void load_run(const void *in, int64_t base, int n, int dt, uint32_t *dst) {
    if (dt == DT_BF16) {
#pragma omp simd
        for (int i = 0; i < n; i++) dst[i] = load_bits(in, base + i, DT_BF16);
    } else if (dt == DT_F16) {
#pragma omp simd
        for (int i = 0; i < n; i++) dst[i] = load_bits(in, base + i, DT_F16);
    } else {
        memcpy(dst, (const uint32_t *)in + base, (size_t)n * 4);
    }
}

/* out[base .. base + n) from fp32 bits; exact: every value is exact in bf16 (quant_fast values and NaN),
 * so the bf16 rounding is a truncation (store_fast) */
AINLINE void store_run(void *out, int64_t base, int n, int dt, const uint32_t *v, int exact) {
    if (dt == DT_BF16 && exact) {
#pragma omp simd
        for (int i = 0; i < n; i++) store_fast(out, base + i, v[i], DT_BF16);
    } else if (dt == DT_BF16) {
#pragma omp simd
        for (int i = 0; i < n; i++) store_bits(out, base + i, v[i], DT_BF16);
    } else if (dt == DT_F16) {
#pragma omp simd
        for (int i = 0; i < n; i++) store_bits(out, base + i, v[i], DT_F16);
    } else {
        memcpy((uint32_t *)out + base, v, (size_t)n * 4);
    }
}


/* fp32 bits of the largest element value times 2^X (Inf when it overflows fp32). */
AINLINE uint32_t max_bits(int32_t X, const fmt_t *f) {
    uint32_t N = (uint32_t)f->nmax;
    int32_t P = f->pmaxbase + X;
    uint32_t nb = f2u((float)(int32_t)N);
    int32_t fe = (int32_t)(nb >> 23) + P;
    int32_t s2 = P + 149; s2 = s2 < 0 ? 0 : (s2 > 31 ? 31 : s2);
    uint32_t v = fe >= 1 ? nb + ((uint32_t)P << 23) : (N << s2);
    v = fe >= 255 ? 0x7F800000u : v;
    return N == 0 ? 0u : v;
}

/* Decode a code with shared exponent X (scale not NaN) to fp32 bits (*v32) and/or fp64 bits (*v64).
 * The value is N * 2^P (N < 2^9); fp32 results overflow to Inf like float64 -> float32 rounding does. */
AINLINE void decode_elem(uint32_t code, int32_t X, const int WANT64, const fmt_t *f,
                         uint32_t *v32, uint64_t *v64) {
    const int32_t mb = f->mbits, bits = f->bits;
    uint32_t sbit = (code & (1u << (bits - 1))) != 0u, cm;
    int32_t sv = (int32_t)code - (int32_t)((code & (1u << (bits - 1))) << 1);  /* sign-extended */
    cm = f->enc == ENC_TWOS ? (uint32_t)(sv < 0 ? -sv : sv) : code & ((1u << (bits - 1)) - 1u);
    int32_t ef = (int32_t)(cm >> mb);
    int32_t e1 = ef > 1 ? ef - 1 : 0;
    uint32_t N = cm - ((uint32_t)e1 << mb);
    int32_t P = e1 + f->emin - mb + X;
    uint32_t sgn = (f->enc == ENC_FP || N) ? sbit : 0u;
    /* codes above the largest finite magnitude are Inf/NaN codes of the element format (fp only) */
    int special = f->enc == ENC_FP && (int32_t)cm > f->maxmag;
    int isinf = special && (int32_t)cm == f->inf_mag;
    if (WANT64) {
        uint64_t nb = d2u((double)(int32_t)N) + ((uint64_t)(int64_t)P << 52);
        nb = N == 0 ? 0 : nb;
        nb = isinf ? 0x7FF0000000000000ull : (special ? 0x7FF8000000000000ull : nb);
        *v64 = nb | ((uint64_t)((special && !isinf) ? 0u : sgn) << 63);
    } else {
        /* fp32 bits of N (< 2^9) by comparisons: GCC does not vectorize the int->float conversion here */
        uint32_t p = (N >= 2u) + (N >= 4u) + (N >= 8u) + (N >= 16u) + (N >= 32u) + (N >= 64u) + (N >= 128u)
                   + (N >= 256u);
        uint32_t nb = ((p + 127u) << 23) | ((N << (23u - p)) & 0x7FFFFFu);
        int32_t fe = (int32_t)(nb >> 23) + P;
        int32_t s2 = P + 149; s2 = s2 < 0 ? 0 : (s2 > 31 ? 31 : s2);
        uint32_t v = fe >= 1 ? nb + ((uint32_t)P << 23) : (N << s2);
        v = fe >= 255 ? 0x7F800000u : v;
        v = N == 0 ? 0u : v;
        v = isinf ? 0x7F800000u : (special ? 0x7FC00000u : v);
        *v32 = v | (((special && !isinf) ? 0u : sgn) << 31);
    }
}

/* Packing of codes (pack_block / unpack_block and the SWAR helpers) lives in _mxpack.h; it is included
 * here so that a kernel file including only this header keeps them. */
#include "_mxpack.h"

#endif /* MICROSCALE_MXSCALAR_H */

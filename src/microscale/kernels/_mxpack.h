/* Packing of MX element codes and microexponents into the little-endian bit streams of packing.py
 * (codes of `bits` bits, code i at bit i * bits; a block's codes start on a byte boundary because
 * k * bits is a multiple of 8). Part of the C kernels: included through _mxscalar.h (needs AINLINE). */
#ifndef MICROSCALE_MXPACK_H
#define MICROSCALE_MXPACK_H
#include <stdint.h>
#include <string.h>

/* ---- one block's codes (k codes, k * bits a multiple of 8) ------------------------------------ */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define MX_LE 1
#else
#define MX_LE 0
#endif

/* SWAR packing of 8 codes held in the bytes of a little-endian word: 8 x 6 bits -> 48 bits, 8 x 4 -> 32. */
AINLINE uint64_t pack8x6(uint64_t x) {
    x = (x & 0x003F003F003F003Full) | ((x >> 2) & 0x0FC00FC00FC00FC0ull);
    x = (x & 0x00000FFF00000FFFull) | ((x >> 4) & 0x00FFF00000FFF000ull);
    return (x & 0x0000000000FFFFFFull) | ((x >> 8) & 0x0000FFFFFF000000ull);
}
AINLINE uint64_t pack8x4(uint64_t x) {
    x = (x & 0x000F000F000F000Full) | ((x >> 4) & 0x00F000F000F000F0ull);
    x = (x & 0x000000FF000000FFull) | ((x >> 8) & 0x0000FF000000FF00ull);
    return (x & 0x000000000000FFFFull) | ((x >> 16) & 0x00000000FFFF0000ull);
}
AINLINE uint64_t unpack8x6(uint64_t x) {
    x = (x & 0x0000000000FFFFFFull) | ((x << 8) & 0x00FFFFFF00000000ull);
    x = (x & 0x00000FFF00000FFFull) | ((x << 4) & 0x0FFF00000FFF0000ull);
    return (x & 0x003F003F003F003Full) | ((x << 2) & 0x3F003F003F003F00ull);
}
AINLINE uint64_t unpack8x4(uint64_t x) {
    x = (x & 0x000000000000FFFFull) | ((x << 16) & 0x0000FFFF00000000ull);
    x = (x & 0x000000FF000000FFull) | ((x << 8) & 0x00FF000000FF0000ull);
    return (x & 0x000F000F000F000Full) | ((x << 4) & 0x0F000F000F000F00ull);
}

/* The same for any width b < 8 (runtime): 8 codes of b bits -> 8b bits, in three pairwise merges. */
AINLINE uint64_t pack8xb(uint64_t x, int b) {
    const uint64_t m1 = 0x0001000100010001ull * ((1u << b) - 1u), m2 = 0x0000000100000001ull * ((1ull << 2 * b) - 1u);
    const uint64_t m3 = (1ull << 4 * b) - 1u;
    x = (x & m1) | ((x >> (8 - b)) & (m1 << b));
    x = (x & m2) | ((x >> (16 - 2 * b)) & (m2 << 2 * b));
    return (x & m3) | ((x >> (32 - 4 * b)) & (m3 << 4 * b));
}
AINLINE uint64_t unpack8xb(uint64_t x, int b) {
    const uint64_t m1 = 0x0001000100010001ull * ((1u << b) - 1u), m2 = 0x0000000100000001ull * ((1ull << 2 * b) - 1u);
    const uint64_t m3 = (1ull << 4 * b) - 1u;
    x = (x & m3) | ((x << (32 - 4 * b)) & (m3 << 32));
    x = (x & m2) | ((x << (16 - 2 * b)) & (m2 << 16));
    return (x & m1) | ((x << (8 - b)) & (m1 << 8));
}

AINLINE void pack_block(const uint8_t *c, int64_t stride, int k, int bits, uint8_t *dst) {
    if (MX_LE && stride == 1 && bits < 8 && k % 8 == 0) {
        /* groups of 8 codes; a group is stored as a full 8-byte word (whose excess the next group
         * overwrites) while that stays inside this block's bytes, else as its own bytes only */
        const int nbytes = bits, total = k / 8 * bits;   /* bytes per group of 8 codes, per block */
        for (int g = 0; g < k / 8; g++) {
            uint64_t x, y;
            memcpy(&x, c + 8 * g, 8);
            y = bits == 6 ? pack8x6(x) : (bits == 4 ? pack8x4(x) : pack8xb(x, bits));
            if (nbytes * g + 8 <= total) memcpy(dst + nbytes * g, &y, 8);
            else memcpy(dst + nbytes * g, &y, (size_t)nbytes);
        }
        return;
    }
    if (bits == 8) { for (int j = 0; j < k; j++) dst[j] = c[j * stride]; }
    else if (bits == 4) {
        for (int j = 0; j < k / 2; j++) dst[j] = (uint8_t)(c[2 * j * stride] | (c[(2 * j + 1) * stride] << 4));
    } else if (bits == 6) {
        for (int j = 0; j < k / 4; j++) {
            uint32_t w = c[4 * j * stride] | ((uint32_t)c[(4 * j + 1) * stride] << 6)
                       | ((uint32_t)c[(4 * j + 2) * stride] << 12) | ((uint32_t)c[(4 * j + 3) * stride] << 18);
            dst[3 * j] = (uint8_t)w; dst[3 * j + 1] = (uint8_t)(w >> 8); dst[3 * j + 2] = (uint8_t)(w >> 16);
        }
    } else {  /* generic little-endian bit stream */
        uint64_t acc = 0; int nbits = 0, o = 0;
        for (int j = 0; j < k; j++) {
            acc |= (uint64_t)c[j * stride] << nbits; nbits += bits;
            while (nbits >= 8) { dst[o++] = (uint8_t)acc; acc >>= 8; nbits -= 8; }
        }
    }
}

AINLINE void unpack_block(const uint8_t *src, int k, int bits, uint8_t *c) {
    if (MX_LE && bits < 8 && k % 8 == 0) {
        const int nbytes = bits, total = k / 8 * bits;
        for (int g = 0; g < k / 8; g++) {
            uint64_t x = 0, y;
            if (nbytes * g + 8 <= total) memcpy(&x, src + nbytes * g, 8);   /* inside this block's bytes */
            else memcpy(&x, src + nbytes * g, (size_t)nbytes);
            x &= (1ull << (8 * bits)) - 1u;
            y = bits == 6 ? unpack8x6(x) : (bits == 4 ? unpack8x4(x) : unpack8xb(x, bits));
            memcpy(c + 8 * g, &y, 8);
        }
        return;
    }
    if (bits == 8) { for (int j = 0; j < k; j++) c[j] = src[j]; }
    else if (bits == 4) {
        for (int j = 0; j < k / 2; j++) { c[2 * j] = src[j] & 15; c[2 * j + 1] = src[j] >> 4; }
    } else if (bits == 6) {
        for (int j = 0; j < k / 4; j++) {
            uint32_t w = src[3 * j] | ((uint32_t)src[3 * j + 1] << 8) | ((uint32_t)src[3 * j + 2] << 16);
            c[4 * j] = w & 63; c[4 * j + 1] = (w >> 6) & 63; c[4 * j + 2] = (w >> 12) & 63; c[4 * j + 3] = w >> 18;
        }
    } else {
        uint64_t acc = 0; int nbits = 0, i = 0;
        for (int j = 0; j < k; j++) {
            while (nbits < bits) { acc |= (uint64_t)src[i++] << nbits; nbits += 8; }
            c[j] = (uint8_t)(acc & ((1u << bits) - 1)); acc >>= bits; nbits -= bits;
        }
    }
}

/* ---- microexponent streams (d2 bits each) ---------------------------------------------------- */
/* Microexponent idx of the packed little-endian d2-bit stream p (packing.py); reads no byte past it. */
AINLINE uint32_t get_micro(const uint8_t *p, int64_t idx, int d2) {
    int64_t bit = idx * d2, by = bit >> 3;
    int sh = (int)(bit & 7);
    uint32_t v = p[by];
    if (sh + d2 > 8) v |= (uint32_t)p[by + 1] << 8;
    return (v >> sh) & ((1u << d2) - 1u);
}

/* The nbits (<= 32) bits of the little-endian stream p from bit offset bitoff; reads no byte past them. */
AINLINE uint32_t get_bits32(const uint8_t *p, int64_t bitoff, int nbits) {
    const uint8_t *q = p + (bitoff >> 3);
    const int sh = (int)(bitoff & 7), nbytes = (sh + nbits + 7) >> 3;
    uint64_t v = 0;
    for (int i = 0; i < nbytes; i++) v |= (uint64_t)q[i] << (8 * i);
    return (uint32_t)((v >> sh) & ((1ull << nbits) - 1u));
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

/* Pack n one-byte codes of `bits` bits (< 8) into the little-endian bit stream of packing.py: groups of 8
 * codes fill `bits` bytes; the last group writes only the bytes the stream has (ceil(n * bits / 8)). */
static inline void pack_stream(const uint8_t *src, uint8_t *dst, int64_t n, int bits, int nthreads) {
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

#endif /* MICROSCALE_MXPACK_H */

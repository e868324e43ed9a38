"""Triton kernel sources of the ``triton`` backend (imported only when that backend runs; see
triton_kernels.py for the method and the data layout)."""

import triton
import triton.language as tl


@triton.jit
def split(a):
    ef = a >> 23
    man = a & 0x7FFFFF
    fb = man.to(tl.float32).to(tl.int32, bitcast=True)
    e = tl.where(ef > 0, ef - 127, (fb >> 23) - 276)
    sig = tl.where(ef > 0, man, fb & 0x7FFFFF) | 0x800000
    return e, sig

@triton.jit
def value_bits(n, p):
    nb = n.to(tl.float32).to(tl.int32, bitcast=True)
    fe = (nb >> 23) + p
    normal = (tl.minimum(tl.maximum(fe, 1), 254) << 23) | (nb & 0x7FFFFF)
    sub = n << tl.minimum(tl.maximum(p + 149, 0), 22)
    v = tl.where(fe >= 1, normal, sub)
    v = tl.where(fe >= 255, 0x7F800000, v)
    return tl.where(n == 0, 0, v)

@triton.jit
def quant_kernel(x_ptr, idx_ptr, val_ptr, code_ptr, scale_ptr, shift_ptr, n_blocks, seed,
                 ROWS: tl.constexpr, K: tl.constexpr, K2: tl.constexpr, D2: tl.constexpr,
                 EMIN: tl.constexpr, MBITS: tl.constexpr, MAXMAG: tl.constexpr, MAX_N: tl.constexpr,
                 MAX_P: tl.constexpr, FP: tl.constexpr, TWOS: tl.constexpr, BITS: tl.constexpr,
                 EMAX: tl.constexpr, EVEN_M: tl.constexpr, FLM: tl.constexpr, SIGM: tl.constexpr,
                 S_EMIN: tl.constexpr, S_EMAX: tl.constexpr, S_BIAS: tl.constexpr, S_NAN: tl.constexpr,
                 SMODE: tl.constexpr, RND: tl.constexpr, WANT_VAL: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, K)
    rmask = rows < n_blocks
    offs = rows[:, None] * K + cols[None, :]
    mask = rmask[:, None]
    b = tl.load(x_ptr + offs, mask=mask, other=0)
    a = b & 0x7FFFFFFF
    amax = tl.max(a, axis=1)
    special = amax >= 0x7F800000
    amax = tl.where(special, 0, amax)
    # shared exponent X (reference.shared_exponent), clamped to the scale's range
    e, sig = split(amax)
    if SMODE == 0:
        x = e - EMAX
    elif SMODE == 1:
        x = e + (sig != 0x800000).to(tl.int32) - EMAX
    elif SMODE == 2:
        x = e + ((sig + (1 << (22 - EVEN_M))) >> 24) - EMAX
    else:
        x = e - FLM + (sig > SIGM).to(tl.int32)
    x = tl.minimum(tl.maximum(x, S_EMIN), S_EMAX)
    x = tl.where(amax == 0, S_EMIN, x)
    if D2 > 0:
        sub = tl.max(tl.reshape(a, (ROWS, K // K2, K2)), axis=2)
        e_sub, _s = split(sub)
        shift = tl.minimum(tl.maximum(x[:, None] + EMAX - e_sub, 0), (1 << D2) - 1)
        shift = tl.where(sub > 0, shift, (1 << D2) - 1)
        shift = tl.where(special[:, None], 0, shift)
        xs = x[:, None] - shift
        xe = tl.reshape(tl.broadcast_to(xs[:, :, None], (ROWS, K // K2, K2)), (ROWS, K))
        soffs = rows[:, None] * (K // K2) + tl.arange(0, K // K2)[None, :]
        if not WANT_VAL:
            tl.store(shift_ptr + soffs, shift, mask=mask)
    else:
        xe = tl.broadcast_to(x[:, None], (ROWS, K))
    # elements
    neg = b < 0
    ev, esig = split(a)
    d = ev - xe - EMIN
    sh = 23 - MBITS + tl.maximum(-d, 0)
    if RND == 3:
        idx = tl.load(idx_ptr + offs, mask=mask, other=0)
        h = (idx * 0x9E3779B9 + seed) & 0xFFFFFFFF
        h = h ^ (h >> 16)
        h = (h * 0x7FEB352D) & 0xFFFFFFFF
        h = h ^ (h >> 15)
        h = (h * 0x846CA68B) & 0xFFFFFFFF
        u = h ^ (h >> 16)
        s64 = esig.to(tl.int64)
        sh64 = sh.to(tl.int64)
        w = tl.where(sh64 <= 54, s64 << tl.minimum(tl.maximum(54 - sh64, 0), 62),
                     s64 >> tl.minimum(tl.maximum(sh64 - 54, 0), 62))
        carry = ((u << 22) + (w & ((1 << 54) - 1))) >= (1 << 54) - 1
        r = ((w >> 54) + carry.to(tl.int64)).to(tl.int32)
    else:
        shc = tl.minimum(sh, 25)
        if RND == 2:
            r = esig >> shc
        else:
            half = tl.full(shc.shape, 1, tl.int32) << (shc - 1)
            if RND == 1:
                r = (esig + half) >> shc
            else:
                r = (esig + half - 1 + ((esig >> shc) & 1)) >> shc
    r = tl.where(a == 0, 0, r)
    dd = tl.minimum(tl.maximum(d, 0), 255)
    cm = (dd << MBITS) + r
    sat = cm > MAXMAG
    if WANT_VAL:
        n = tl.where(sat, MAX_N, r)
        p = tl.where(sat, MAX_P, dd + EMIN - MBITS) + xe
        v = value_bits(n, p)
        if FP:
            signed = neg
        else:
            signed = neg & (n != 0)
        v = v | (signed.to(tl.int32) << 31)
        v = tl.where(special[:, None], 0x7FC00000, v)
        tl.store(val_ptr + offs, v, mask=mask)
    else:
        cm = tl.minimum(cm, MAXMAG)
        if TWOS:
            code = tl.where(neg, -cm, cm) & ((1 << BITS) - 1)
        else:
            code = cm | (neg.to(tl.int32) << (BITS - 1))
        code = tl.where(special[:, None], 0, code)
        tl.store(code_ptr + offs, code, mask=mask)
        tl.store(scale_ptr + rows, tl.where(special, S_NAN, x + S_BIAS), mask=rmask)

@triton.jit
def dequant_kernel(code_ptr, scale_ptr, micro_ptr, out_ptr, n_blocks,
                   ROWS: tl.constexpr, K: tl.constexpr, K2: tl.constexpr, D2: tl.constexpr,
                   EMIN: tl.constexpr, MBITS: tl.constexpr, MAXMAG: tl.constexpr, INF_MAG: tl.constexpr,
                   FP: tl.constexpr, TWOS: tl.constexpr, BITS: tl.constexpr, S_BIAS: tl.constexpr,
                   S_NAN: tl.constexpr, OUT64: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, K)
    rmask = rows < n_blocks
    offs = rows[:, None] * K + cols[None, :]
    mask = rmask[:, None]
    code = tl.load(code_ptr + offs, mask=mask, other=0)
    sc = tl.load(scale_ptr + rows, mask=rmask, other=0)
    x = sc - S_BIAS
    if D2 > 0:
        moffs = rows[:, None] * (K // K2) + tl.arange(0, K // K2)[None, :]
        m = tl.load(micro_ptr + moffs, mask=mask, other=0)
        xe = tl.reshape(tl.broadcast_to((x[:, None] - m)[:, :, None], (ROWS, K // K2, K2)), (ROWS, K))
    else:
        xe = tl.broadcast_to(x[:, None], (ROWS, K))
    sbit = (code >> (BITS - 1)) & 1
    if TWOS:
        sv = code - (sbit << BITS)
        cm = tl.where(sv < 0, -sv, sv)
    else:
        cm = code & ((1 << (BITS - 1)) - 1)
    e1 = tl.maximum((cm >> MBITS) - 1, 0)
    n = cm - (e1 << MBITS)
    p = e1 + EMIN - MBITS + xe
    if FP:
        neg = sbit == 1
        elem_special = cm > MAXMAG
        inf = elem_special & (cm == INF_MAG)
        nan = (sc == S_NAN)[:, None] | (elem_special & (cm != INF_MAG))
    else:
        neg = (sbit == 1) & (n != 0)
        inf = cm < 0
        nan = (sc == S_NAN)[:, None] | inf
    if OUT64:
        nb = n.to(tl.float64).to(tl.int64, bitcast=True) + (p.to(tl.int64) << 52)
        v = tl.where(n == 0, 0, nb)
        v = tl.where(inf, 0x7FF0000000000000, v)
        v = v | (neg.to(tl.int64) << 63)
        v = tl.where(nan, 0x7FF8000000000000, v)
    else:
        v = value_bits(n, p)
        v = tl.where(inf, 0x7F800000, v)
        v = v | (neg.to(tl.int32) << 31)
        v = tl.where(nan, 0x7FC00000, v)
    tl.store(out_ptr + offs, v, mask=mask)

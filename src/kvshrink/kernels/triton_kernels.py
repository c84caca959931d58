"""Triton kernels: quantize-and-pack into the `grouped` codec's declared layout, and decode attention over the packed store.

Imported only through `kvshrink.kernels` (which checks that Triton is there). Both kernels follow the layout of
`codecs.quant.encode_block` exactly (decode attention also reads the `rotated` codec's Lloyd-Max and fp8 rows): a token's codes are one row of packed bytes over its channels (2/4/8 bits:
8/bits codes per byte; 3 bits: 8 codes per 3-byte word), fp16 scales and zero points per group (per-token groups
along the channels, or per-channel groups along `group` tokens), an fp16 per-token head mean or per-head channel mean.

Code and scale loads are gathers computed per element (byte = bit offset // 8), so one kernel body serves every
width; the dequantized block lives only in registers.
"""
from __future__ import annotations

import triton
import triton.language as tl


# -- quantize and pack ----------------------------------------------------------------------------------------------
@triton.jit
def _round_half_even(y):
    """torch.round (half to even) for y >= 0, with exact float operations (floor and the fraction are exact)."""
    r = tl.floor(y)
    f = y - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return r + tl.where((f > 0.5) | ((f == 0.5) & odd), 1.0, 0.0)


@triton.jit
def _fp16_down(z16, lo):
    """fp16 z rounded from lo; one fp16 step down where it came out above lo (torch.nextafter towards -inf)."""
    bits = z16.to(tl.int16, bitcast=True)
    zf = z16.to(tl.float32)
    stepped = tl.where(zf > 0.0, bits - 1, tl.where(zf == 0.0, -32767, bits + 1))  # -32767 = 0x8001: -min subnormal
    return tl.where(zf > lo, stepped.to(tl.int16).to(tl.float16, bitcast=True), z16)


@triton.jit
def _fp16_up(s16, exact):
    """fp16 s (>= 0) rounded from exact; one fp16 step up where it came out below exact."""
    bits = s16.to(tl.int16, bitcast=True)
    return tl.where(s16.to(tl.float32) < exact, (bits + 1).to(tl.int16).to(tl.float16, bitcast=True), s16)


@triton.jit
def _quantize_pack_kernel(
    X, CODES, SCALE, ZERO, HEAD_MEAN, CHANNEL_MEAN,
    T,
    H: tl.constexpr, D: tl.constexpr, TB: tl.constexpr,
    BITS: tl.constexpr, GROUP: tl.constexpr, TOKEN_AXIS: tl.constexpr, CENTER: tl.constexpr,
):
    """One program: TB tokens of one sequence, all heads. CENTER: 0 none, 1 head mean, 2 channel mean."""
    # constants first: a compiled kernel may not define a constexpr again in each unrolled head (the interpreter
    # allowed it); P codes to a word of W bytes, code i of a word at bits [i*BITS, (i+1)*BITS)
    LEVELS: tl.constexpr = (1 << BITS) - 1
    NG: tl.constexpr = D // GROUP
    P: tl.constexpr = 8 if BITS == 3 else (8 // BITS if BITS <= 8 else 1)  # BITS 16 packs nothing
    W: tl.constexpr = 3 if BITS == 3 else 1
    ROW_BYTES: tl.constexpr = D // P * W
    b = tl.program_id(1).to(tl.int64)  # offsets past 2**31 elements (a long prefill of a large batch)
    t0 = tl.program_id(0) * TB
    t = t0 + tl.arange(0, TB)
    d = tl.arange(0, D)
    tmask = t < T
    row = t[:, None] * D + d[None, :]
    m2 = tmask[:, None]
    if CENTER == 1:
        s = tl.load(X + (b * H * T) * D + row, mask=m2, other=0.0).to(tl.float32)
        for h in tl.static_range(1, H):
            s = s + tl.load(X + ((b * H + h) * T) * D + row, mask=m2, other=0.0).to(tl.float32)
        mean16 = tl.div_rn(s, H * 1.0).to(tl.float16)
        tl.store(HEAD_MEAN + (b * T) * D + row, mean16, mask=m2)
        mean = mean16.to(tl.float32)
    for h in tl.static_range(H):
        bh = b * H + h
        x = tl.load(X + (bh * T) * D + row, mask=m2, other=0.0).to(tl.float32)
        if CENTER == 1:
            x = x - mean
        if CENTER == 2:
            x = x - tl.load(CHANNEL_MEAN + bh * D + d).to(tl.float32)[None, :]
        if BITS == 16:
            tl.store(CODES + (bh * T) * D + row, x.to(tl.float16), mask=m2)
        else:
            if TOKEN_AXIS:
                g = tl.reshape(x, (TB, NG, GROUP))
                lo = tl.min(g, 2)
                hi = tl.max(g, 2)
            else:
                lo = tl.min(x, 0)
                hi = tl.max(x, 0)
            zero16 = _fp16_down(lo.to(tl.float16), lo)
            zf = zero16.to(tl.float32)
            exact = tl.div_rn(hi - zf, LEVELS * 1.0)
            scale16 = _fp16_up(exact.to(tl.float16), exact)
            sf = scale16.to(tl.float32)
            inv = tl.where(sf > 0.0, tl.div_rn(tl.full(sf.shape, 1.0, tl.float32), sf), 0.0)
            if TOKEN_AXIS:
                y = (g - zf[:, :, None]) * inv[:, :, None]
                code = tl.minimum(tl.maximum(_round_half_even(y), 0.0), LEVELS * 1.0).to(tl.int32)
                code = tl.reshape(code, (TB, D))
                gi = tl.arange(0, NG)
                sidx = (bh * T + t[:, None]) * NG + gi[None, :]
                tl.store(SCALE + sidx, scale16, mask=tmask[:, None])
                tl.store(ZERO + sidx, zero16, mask=tmask[:, None])
            else:
                y = (x - zf[None, :]) * inv[None, :]
                code = tl.minimum(tl.maximum(_round_half_even(y), 0.0), LEVELS * 1.0).to(tl.int32)
                sidx = (bh * (T // GROUP) + t0 // GROUP) * D + d
                tl.store(SCALE + sidx, scale16)
                tl.store(ZERO + sidx, zero16)
            words = tl.sum(tl.reshape(code, (TB, D // P, P)) << (tl.arange(0, P) * BITS)[None, None, :], 2)
            j = tl.arange(0, D // P)
            base = CODES + (bh * T + t[:, None]) * ROW_BYTES + j[None, :] * W
            for k in tl.static_range(W):
                tl.store(base + k, ((words >> (8 * k)) & 0xFF).to(tl.uint8), mask=tmask[:, None])


# -- decode attention -------------------------------------------------------------------------------------------------
@triton.jit
def _dequant_block(CODES, SCALE, ZERO, HMEAN, CB, cmean, bh, b, t, tvalid, d,
                   T, n_scale_rows,
                   D: tl.constexpr, BITS: tl.constexpr, GT: tl.constexpr, GD: tl.constexpr, CENTER: tl.constexpr,
                   KIND: tl.constexpr):
    """Tokens t (a block) of one head of a packed store, dequantized to float32 [BT, D] in registers.

    KIND 0: grouped codes with an fp16 scale and zero per group; 1: Lloyd-Max codes of a rotated direction, each
    the codebook entry CB[code] (already divided by sqrt(D)) times the token's norm (SCALE, one per token); 2: fp8
    e4m3 bytes times the token's scale. Rotated kinds stay in the rotated space (the wrapper turns the query)."""
    m2 = tvalid[:, None]
    if BITS == 16:
        x = tl.load(CODES + (bh * T + t[:, None]) * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
    elif KIND == 2:
        byte = tl.load(CODES + (bh * T + t[:, None]) * D + d[None, :], mask=m2, other=0).to(tl.int32)
        e = (byte >> 3) & 15
        man = (byte & 7).to(tl.float32)
        mag = tl.where(e == 0, man * 0.001953125, (man + 8.0) * tl.exp2((e - 10).to(tl.float32)))  # 2^-9, 2^(e-10)
        norm = tl.load(SCALE + bh * T + t, mask=tvalid, other=0.0).to(tl.float32)
        x = tl.where(byte >= 128, -mag, mag) * norm[:, None]
    else:
        P: tl.constexpr = 8 if BITS == 3 else 8 // BITS
        W: tl.constexpr = 3 if BITS == 3 else 1
        ROW_BYTES: tl.constexpr = D // P * W
        MASK: tl.constexpr = (1 << BITS) - 1
        bit = (d // P) * (W * 8) + (d % P) * BITS
        row = CODES + (bh * T + t[:, None]) * ROW_BYTES
        byte = row + (bit // 8)[None, :]
        word = tl.load(byte, mask=m2, other=0).to(tl.int32)
        if BITS == 3:  # a 3-bit code may straddle two bytes of its word
            spill = ((bit % 8) + BITS > 8)[None, :]
            word = word | (tl.load(byte + 1, mask=m2 & spill, other=0).to(tl.int32) << 8)
        code = (word >> (bit % 8)[None, :]) & MASK
        if KIND == 1:
            norm = tl.load(SCALE + bh * T + t, mask=tvalid, other=0.0).to(tl.float32)
            x = tl.load(CB + code) * norm[:, None]
        else:
            NGD: tl.constexpr = D // GD
            sidx = (bh * n_scale_rows + t[:, None] // GT) * NGD + (d // GD)[None, :]
            scale = tl.load(SCALE + sidx, mask=m2, other=0.0).to(tl.float32)
            zero = tl.load(ZERO + sidx, mask=m2, other=0.0).to(tl.float32)
            x = zero + code.to(tl.float32) * scale
    if CENTER == 1:
        x = x + tl.load(HMEAN + (b * T + t[:, None]) * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
    if CENTER == 2:
        x = x + cmean[None, :]
    return x


@triton.jit
def _online_step(q, k, v, allowed, m_i, l_i, acc, qscale, DOT_IEEE: tl.constexpr):
    """Fold one block of keys/values into the running max, normaliser and output (scores in log2 units)."""
    if DOT_IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k.to(q.dtype)))
    s = tl.where(allowed, s * qscale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DOT_IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
    return m_new, l_i, acc


@triton.jit
def _load_query(Q, b, hk, HQ, QN, D: tl.constexpr, N_REP: tl.constexpr, BQ: tl.constexpr):
    """The query rows of one KV head: row r = query token r // N_REP of query head hk * N_REP + r % N_REP."""
    r = tl.arange(0, BQ)
    qi = r // N_REP
    hq = hk * N_REP + r % N_REP
    rvalid = r < QN * N_REP
    d = tl.arange(0, D)
    q = tl.load(Q + ((b * HQ + hq[:, None]) * QN + qi[:, None]) * D + d[None, :], mask=rvalid[:, None], other=0.0)
    return q, qi, rvalid


@triton.jit
def _store_partial(M, L, ACC, slot, n_slots, bhk, m_i, l_i, acc, D: tl.constexpr, BQ: tl.constexpr):
    r = tl.arange(0, BQ)
    base = (bhk * n_slots + slot) * BQ
    tl.store(M + base + r, m_i)
    tl.store(L + base + r, l_i)
    tl.store(ACC + (base + r[:, None]) * D + tl.arange(0, D)[None, :], acc)


@triton.jit
def _packed_split_kernel(
    Q, KC, KS, KZ, KHM, KCM, KCB, VC, VS, VZ, VHM, VCM, VCB, MASK, M, L, ACC,
    T, k_scale_rows, v_scale_rows, HQ, QN, TK, mask_q_stride, mask_b_stride, key0, per_split, n_slots, qscale,
    HKV: tl.constexpr, D: tl.constexpr, N_REP: tl.constexpr, BQ: tl.constexpr, BT: tl.constexpr,
    K_BITS: tl.constexpr, K_GT: tl.constexpr, K_GD: tl.constexpr, K_CENTER: tl.constexpr, K_KIND: tl.constexpr,
    V_BITS: tl.constexpr, V_GT: tl.constexpr, V_GD: tl.constexpr, V_CENTER: tl.constexpr, V_KIND: tl.constexpr,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DOT_IEEE: tl.constexpr,
):
    """One split of the packed store's tokens for one (sequence, KV head): partial max, normaliser, output."""
    split = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)  # offsets into a store past 2**31 bytes (long contexts, large batches)
    b = bhk // HKV
    hk = bhk % HKV
    q, qi, rvalid = _load_query(Q, b, hk, HQ, QN, D, N_REP, BQ)
    d = tl.arange(0, D)
    kcm = tl.zeros((D,), tl.float32)
    vcm = tl.zeros((D,), tl.float32)
    if K_CENTER == 2:
        kcm = tl.load(KCM + bhk * D + d).to(tl.float32)
    if V_CENTER == 2:
        vcm = tl.load(VCM + bhk * D + d).to(tl.float32)
    m_i = tl.full((BQ,), float("-inf"), tl.float32)
    l_i = tl.zeros((BQ,), tl.float32)
    acc = tl.zeros((BQ, D), tl.float32)
    start = split * per_split
    end = tl.minimum(start + per_split, T)
    for t0 in range(start, end, BT):
        t = t0 + tl.arange(0, BT)
        tvalid = t < end
        k = _dequant_block(KC, KS, KZ, KHM, KCB, kcm, bhk, b, t, tvalid, d, T, k_scale_rows, D, K_BITS, K_GT, K_GD,
                           K_CENTER, K_KIND)
        v = _dequant_block(VC, VS, VZ, VHM, VCB, vcm, bhk, b, t, tvalid, d, T, v_scale_rows, D, V_BITS, V_GT, V_GD,
                           V_CENTER, V_KIND)
        allowed = rvalid[:, None] & tvalid[None, :]
        if HAS_MASK:
            allowed = allowed & (tl.load(MASK + b * mask_b_stride + qi[:, None] * mask_q_stride + key0 + t[None, :],
                                         mask=allowed, other=0) != 0)
        if CAUSAL:  # a window shorter than the query leaves some of this step's tokens in the store
            allowed = allowed & ((key0 + t)[None, :] <= (TK - QN + qi)[:, None])
        m_i, l_i, acc = _online_step(q, k, v, allowed, m_i, l_i, acc, qscale, DOT_IEEE)
    _store_partial(M, L, ACC, split, n_slots, bhk, m_i, l_i, acc, D, BQ)


@triton.jit
def _exact_split_kernel(
    Q, K, V, KEY_INDEX, MASK, M, L, ACC,
    TE, HQ, QN, TK, mask_q_stride, mask_b_stride, slot, n_slots, qscale,
    HKV: tl.constexpr, D: tl.constexpr, N_REP: tl.constexpr, BQ: tl.constexpr, BT: tl.constexpr,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DOT_IEEE: tl.constexpr,
):
    """The full-precision tokens (sinks, window, this step's) for one (sequence, KV head), into partial slot `slot`."""
    bhk = tl.program_id(0).to(tl.int64)
    b = bhk // HKV
    hk = bhk % HKV
    q, qi, rvalid = _load_query(Q, b, hk, HQ, QN, D, N_REP, BQ)
    d = tl.arange(0, D)
    m_i = tl.full((BQ,), float("-inf"), tl.float32)
    l_i = tl.zeros((BQ,), tl.float32)
    acc = tl.zeros((BQ, D), tl.float32)
    for t0 in range(0, TE, BT):
        t = t0 + tl.arange(0, BT)
        tvalid = t < TE
        off = (bhk * TE + t[:, None]) * D + d[None, :]
        k = tl.load(K + off, mask=tvalid[:, None], other=0.0).to(tl.float32)
        v = tl.load(V + off, mask=tvalid[:, None], other=0.0).to(tl.float32)
        key = tl.load(KEY_INDEX + t, mask=tvalid, other=0)
        allowed = rvalid[:, None] & tvalid[None, :]
        if HAS_MASK:
            allowed = allowed & (tl.load(MASK + b * mask_b_stride + qi[:, None] * mask_q_stride + key[None, :],
                                         mask=allowed, other=0) != 0)
        if CAUSAL:
            allowed = allowed & (key[None, :] <= (TK - QN + qi)[:, None])
        m_i, l_i, acc = _online_step(q, k, v, allowed, m_i, l_i, acc, qscale, DOT_IEEE)
    _store_partial(M, L, ACC, slot, n_slots, bhk, m_i, l_i, acc, D, BQ)


@triton.jit
def _reduce_kernel(M, L, ACC, OUT, HQ, QN, n_slots,
                   HKV: tl.constexpr, D: tl.constexpr, N_REP: tl.constexpr, BQ: tl.constexpr, BS: tl.constexpr):
    """Merge the partial results of every split (log-sum-exp) and write [B, HQ, QN, D] in the output's dtype."""
    bhk = tl.program_id(0).to(tl.int64)
    b = bhk // HKV
    hk = bhk % HKV
    s = tl.arange(0, BS)
    svalid = s < n_slots
    r = tl.arange(0, BQ)
    idx = (bhk * n_slots + s[:, None]) * BQ + r[None, :]
    m = tl.load(M + idx, mask=svalid[:, None], other=float("-inf"))
    l = tl.load(L + idx, mask=svalid[:, None], other=0.0)
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_safe[None, :])
    denom = tl.sum(w * l, 0)
    d = tl.arange(0, D)
    out = tl.zeros((BQ, D), tl.float32)
    for i in range(0, n_slots):
        wi = tl.exp2(tl.load(M + (bhk * n_slots + i) * BQ + r) - m_safe)
        out += wi[:, None] * tl.load(ACC + ((bhk * n_slots + i) * BQ + r[:, None]) * D + d[None, :])
    out = out / tl.where(denom > 0.0, denom, 1.0)[:, None]
    qi = r // N_REP
    hq = hk * N_REP + r % N_REP
    rvalid = r < QN * N_REP
    tl.store(OUT + ((b * HQ + hq[:, None]) * QN + qi[:, None]) * D + d[None, :], out.to(OUT.dtype.element_ty),
             mask=rvalid[:, None])

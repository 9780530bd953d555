"""Triton kernels for the fused LARS / LAMB / MERIT steps (imported only on a fused step), and
beside each kernel the host function that launches it on a pack (``launch_lars``, ``launch_lamb``,
``launch_merit``: the ``launch`` of each optimizer's ``FusedSpec``).

Every kernel runs over *all* tensors of a pack in one launch: a table maps each program to
(tensor id, chunk); parameters and gradients are reached through tables of raw pointers
(``tl.load(table + tid).to(pointer)``, the pattern of Triton's grouped-GEMM tutorial); moments,
step counters and float32 master weights live in one flat buffer per pack.

Two passes per step:

* pass 1 reads g, m, v, w, forms the new moments and ``u`` in registers (nothing of the state is
  written) and reduces the per-tensor quantities the ratio needs, plus a non-finite flag
  (an atomic only in a program that saw a bad value):

  - LARS, LAMB: sums of squares per tensor, with one float32 atomic per program and tensor;
  - MERIT: each [BM × BN] tile stores its partial row maxima and column maxima of |w| and |u|
    with plain stores into scratch (rows: [n_col_tiles, rest, d0], columns: [n_row_tiles, rest,
    d1] per tensor); ``merit_reduce_kernel`` then takes the max over the partials into the final
    row / column maxima and the whole-tensor maxima (integer atomics on the float bit patterns,
    which order like the floats for values ≥ 0; at most ``ceil(parts / RED_PARTS)`` atomics per
    address, e.g. 25 on a 50257-row embedding, instead of one per tile);

* pass 2 reads the flag (set ⇒ every store is masked off, the step is skipped), recomputes
  the moments and ``u``, applies the ratio, and writes m, v and w.

Writing the moments only in pass 2 costs one extra read of g, m, v (44 instead of 40 bytes per
float32 parameter for LAMB/MERIT) but is what lets a nan/inf gradient leave the state untouched
without a host synchronisation.

``VEC`` (a per-launch constexpr the host sets only when it holds) promises that every pointer is
16-byte aligned, every flat-buffer offset and every length (LAMB/LARS numel, MERIT row length
d1 or vector length) is a multiple of 4 and MERIT's tensors are 1-D or plain contiguous 2-D (no
trailing dims): the hints let Triton emit 16-byte vector loads and stores, and MERIT's tile index
math becomes one int64 tile base plus int32 offsets inside the tile. Without them every access
is a scalar one (about 4× slower on an H200), so MERIT launches the tiles of the tensors that
qualify with VEC=True and the others (odd row length, conv weights) separately.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

BLOCK = 4096  # elements per program for the per-tensor (LARS/LAMB) kernels
BLOCK_WARPS = 8  # (2048-8192 elements, 2-8 warps measured within ±5 % of this on an H200)
# MERIT tile: rows × columns per program (pass 1 and 2). 32 × 64 on 4 warps: 64 divides GPT-2's
# widths (768, 1024, 1280, 1600 and their 3× and 4×), so no column tile is half empty. On an
# H200 at 1.5B parameters the tile alone made the step 1.3× faster than 32 × 128 on 8 warps
# (sweep in BENCHMARKS.md).
TILE_M, TILE_N = 32, 64
TILE_WARPS = 4
RED_PARTS = 64  # MERIT reduce: partials (tiles) one program folds ⇒ ≤ ceil(n/64) atomics per address
RED_ROWS, RED_COLS = 8, 256  # MERIT reduce: block of partials × positions loaded per iteration


@triton.jit
def _ptr(table, tid, PDT: tl.constexpr, VEC: tl.constexpr):
    a = tl.load(table + tid)
    if PDT == 1:
        p = a.to(tl.pointer_type(tl.bfloat16))
    elif PDT == 2:
        p = a.to(tl.pointer_type(tl.float16))
    else:
        p = a.to(tl.pointer_type(tl.float32))
    if VEC:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _is_bad(g):
    return ((g != g) | (tl.abs(g) == float("inf"))).to(tl.int32)


@triton.jit
def _load_w(pp, MASTER, off, idx, mask, HAS_MASTER: tl.constexpr):
    if HAS_MASTER:
        w = tl.load(MASTER + off + idx, mask=mask, other=0.0)
    else:
        w = tl.load(pp + idx, mask=mask, other=0.0).to(tl.float32)
    return w


@triton.jit
def _store_w(pp, MASTER, off, idx, mask, w, HAS_MASTER: tl.constexpr):
    if HAS_MASTER:
        tl.store(MASTER + off + idx, w, mask=mask)
    tl.store(pp + idx, w.to(pp.dtype.element_ty), mask=mask)


@triton.jit
def _adam_u(g, m, v, w, BC, tid, beta1, beta2, omb1, omb2, eps, wd, BIAS: tl.constexpr):
    # omb = 1 − β, formed in float64 on the host: 1 − 0.999 in float32 is off by 1.3e-5 relative,
    # a systematic bias in v that the foreach reference (double scalars) does not have.
    m = beta1 * m + omb1 * g
    v = beta2 * v + omb2 * g * g
    # Bias corrections come precomputed in float64 (1 − β^t cancels badly in float32).
    if BIAS:
        bc1 = tl.load(BC + 2 * tid)
        rbc2 = tl.load(BC + 2 * tid + 1)
        u = m / (tl.sqrt_rn(v) / rbc2 + eps) / bc1 + wd * w
    else:
        u = m / (tl.sqrt_rn(v) + eps) + wd * w
    return m, v, u


# The per-tensor (LARS/LAMB) kernels share their frame: a program's chunk and its gradient
# (_chunk), pass 1's sums of squares and non-finite flag (_sumsq_and_flag), pass 2's norms (_norms).
@triton.jit
def _chunk(P, G, CH_TID, CH_START, NUMEL, OFF, FLAG, PASS: tl.constexpr, PDT: tl.constexpr, VEC: tl.constexpr,
           BLOCK: tl.constexpr):
    c = tl.program_id(0)
    tid = tl.load(CH_TID + c)
    start = tl.multiple_of(tl.load(CH_START + c), BLOCK)
    n = tl.load(NUMEL + tid)
    off = tl.load(OFF + tid)
    if VEC:
        n = tl.multiple_of(n, 4)
        off = tl.multiple_of(off, 4)
    idx = start + tl.arange(0, BLOCK)
    mask = idx < n
    if PASS == 2:
        mask = mask & (tl.load(FLAG) == 0)
    pp = _ptr(P, tid, PDT, VEC)
    g = tl.load(_ptr(G, tid, PDT, VEC) + idx, mask=mask, other=0.0).to(tl.float32)
    return tid, off, idx, mask, pp, g


@triton.jit
def _sumsq_and_flag(ACC, FLAG, tid, w, x, g, ADAPT: tl.constexpr):
    """Pass 1: add Σw² and Σx² into the tensor's ACC pair; raise FLAG if g holds a nan/inf."""
    if ADAPT:
        tl.atomic_add(ACC + 2 * tid, tl.sum(w * w, axis=0))
        tl.atomic_add(ACC + 2 * tid + 1, tl.sum(x * x, axis=0))
    nbad = tl.sum(_is_bad(g), axis=0)
    if nbad > 0:
        tl.atomic_max(FLAG, 1)


@triton.jit
def _norms(ACC, tid):
    """Pass 2: the two norms ‖w‖, ‖x‖ of the tensor, from pass 1's (all-reduced) sums."""
    return tl.sqrt_rn(tl.load(ACC + 2 * tid)), tl.sqrt_rn(tl.load(ACC + 2 * tid + 1))


# ------------------------------------------------------------------------------------ LAMB
@triton.jit
def lamb_kernel(P, G, M, V, MASTER, OFF, NUMEL, BC, CH_TID, CH_START, ACC, FLAG, GSCALE,
                lr, beta1, beta2, omb1, omb2, eps, wd, clip_lo, clip_hi,
                PASS: tl.constexpr, BIAS: tl.constexpr, ADAPT: tl.constexpr, CLIP: tl.constexpr,
                HAS_MASTER: tl.constexpr, HAS_GSCALE: tl.constexpr, PDT: tl.constexpr, VEC: tl.constexpr,
                BLOCK: tl.constexpr):
    tid, off, idx, mask, pp, g = _chunk(P, G, CH_TID, CH_START, NUMEL, OFF, FLAG, PASS, PDT, VEC, BLOCK)
    if HAS_GSCALE:
        g = g * tl.load(GSCALE)
    m = tl.load(M + off + idx, mask=mask, other=0.0)
    v = tl.load(V + off + idx, mask=mask, other=0.0)
    w = _load_w(pp, MASTER, off, idx, mask, HAS_MASTER)
    m, v, u = _adam_u(g, m, v, w, BC, tid, beta1, beta2, omb1, omb2, eps, wd, BIAS)
    u = tl.where(mask, u, 0.0)
    if PASS == 1:
        _sumsq_and_flag(ACC, FLAG, tid, w, u, g, ADAPT)
    else:
        ratio = 1.0
        if ADAPT:
            wn, un = _norms(ACC, tid)
            phi = wn
            if CLIP:
                phi = tl.minimum(tl.maximum(wn, clip_lo), clip_hi)
            ok = (wn > 0) & (un > 0)
            ratio = tl.where(ok, phi / tl.where(ok, un, 1.0), 1.0)
        w = w - lr * ratio * u
        tl.store(M + off + idx, m, mask=mask)
        tl.store(V + off + idx, v, mask=mask)
        _store_w(pp, MASTER, off, idx, mask, w, HAS_MASTER)


def launch_lamb(pack: Any, group: dict, pass_: int, flag: Any, gscale: Any) -> None:
    """One pass of LAMB on a ``"chunks"`` pack."""
    b1, b2 = group["betas"]
    clip = group["trust_clip"]
    if pass_ == 1:  # (1 − β1^t, √(1 − β2^t)) per tensor, in float64: no host sync, no cancellation
        t = pack.steps.double() + 1
        pack.bc = torch.stack([1 - torch.pow(b1, t), (1 - torch.pow(b2, t)).sqrt()], 1).float().reshape(-1)
    lamb_kernel[(pack.ch_tid.numel(),)](
        pack.p_table, pack.g_table, pack.bufs["exp_avg"], pack.bufs["exp_avg_sq"], pack.master_arg,
        pack.off, pack.numel, pack.bc, pack.ch_tid, pack.ch_start, pack.acc, flag,
        gscale if gscale is not None else pack.steps,
        float(group["lr"]), b1, b2, 1.0 - b1, 1.0 - b2, group["eps"], group["weight_decay"],
        clip[0] if clip else 0.0, clip[1] if clip else 0.0,
        PASS=pass_, BIAS=group["bias_correction"], ADAPT=group["adapt"], CLIP=clip is not None,
        HAS_MASTER=pack.master is not None, HAS_GSCALE=gscale is not None, PDT=pack.pdt, VEC=pack.vec,
        BLOCK=pack.block, num_warps=pack.warps,
    )


# ------------------------------------------------------------------------------------ LARS
@triton.jit
def lars_kernel(P, G, BUF, MASTER, OFF, NUMEL, CH_TID, CH_START, ACC, FLAG,
                lr, lr_in, lr_out, momentum, wd, eta, eps,
                PASS: tl.constexpr, ADAPT: tl.constexpr, CLIP: tl.constexpr, NESTEROV: tl.constexpr,
                HAS_MOM: tl.constexpr, HAS_MASTER: tl.constexpr, PDT: tl.constexpr, VEC: tl.constexpr,
                BLOCK: tl.constexpr):
    tid, off, idx, mask, pp, g = _chunk(P, G, CH_TID, CH_START, NUMEL, OFF, FLAG, PASS, PDT, VEC, BLOCK)
    w = _load_w(pp, MASTER, off, idx, mask, HAS_MASTER)
    if PASS == 1:
        _sumsq_and_flag(ACC, FLAG, tid, w, g, g, ADAPT)
    else:
        ratio = 1.0
        if ADAPT:
            wn, gn = _norms(ACC, tid)
            ok = (wn > 0) & (gn > 0)
            ratio = tl.where(ok, eta * wn / tl.where(ok, gn + wd * wn + eps, 1.0), 1.0)
            if CLIP:
                ratio = tl.minimum(ratio / lr, 1.0)
        # Momentum convention: "paper" has (lr_in, lr_out) = (lr, 1), the LR inside the buffer;
        # "torch" has (1, lr), the LR applied to the buffer. Multiplying by 1.0 is exact.
        d = lr_in * ratio * (g + wd * w)
        if HAS_MOM:
            b = momentum * tl.load(BUF + off + idx, mask=mask, other=0.0) + d
            tl.store(BUF + off + idx, b, mask=mask)
            if NESTEROV:
                d = d + momentum * b
            else:
                d = b
        _store_w(pp, MASTER, off, idx, mask, w - lr_out * d, HAS_MASTER)


def launch_lars(pack: Any, group: dict, pass_: int, flag: Any, gscale: Any) -> None:
    """One pass of LARS on a ``"chunks"`` pack (LARS takes no gradient pre-normalisation)."""
    lr = float(group["lr"])
    lr_in, lr_out = (lr, 1.0) if group.get("momentum_convention", "paper") == "paper" else (1.0, lr)
    lars_kernel[(pack.ch_tid.numel(),)](
        pack.p_table, pack.g_table, pack.bufs["momentum_buffer"], pack.master_arg, pack.off, pack.numel,
        pack.ch_tid, pack.ch_start, pack.acc, flag,
        lr, lr_in, lr_out, group["momentum"], group["weight_decay"], group["trust_coefficient"], group["eps"],
        PASS=pass_, ADAPT=group["adapt"], CLIP=group["clip"], NESTEROV=group["nesterov"],
        HAS_MOM=group["momentum"] != 0, HAS_MASTER=pack.master is not None, PDT=pack.pdt, VEC=pack.vec,
        BLOCK=pack.block, num_warps=pack.warps,
    )


# ----------------------------------------------------------------------------------- MERIT
# META[16 * tid + k], int64:
#   0 d0  1 d1  2 s0  3 s1  4 is_vec  5 rest  6 row_w  7 row_u  8 col_w  9 col_u  10 tot_w  11 tot_u
#   12 prow_w  13 prow_u  14 pcol_w  15 pcol_u
# row_* / col_* / tot_*: offsets into MAXB (int32 float bits), prow_* / pcol_*: into PART (float32).
# A vector is laid out as rows of BN (d1 = BN, d0 = ceil(numel / BN)); only its whole-tensor max
# is used (its "row" maxima are formed on the way there).
@triton.jit
def _f(bits):
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _bits(x):
    return x.to(tl.int32, bitcast=True)


@triton.jit
def _max_ratio(num, den, pn, pd):
    """``max(num / den, pn / pd)`` as a (num, den) pair, compared by float64 cross products (the
    products of a subnormal and a normal float32 neither under- nor overflow there); where ``den``
    is 0 the pair is (pn, pd)."""
    take = (den > 0) & (num.to(tl.float64) * pd.to(tl.float64) >= pn.to(tl.float64) * den.to(tl.float64))
    return tl.where(take, num, pn), tl.where(take, den, pd)


TINY_DEN: tl.constexpr = tl.constexpr(8.673617379884035e-19)  # 2^-60


@triton.jit
def _ratio_parts(num, den):
    """``num / den`` as (scale, factor) with ``|u| · num / den = (|u| · scale) · factor`` for any
    |u| ≤ den, free of overflow: scale is 2^64 where ``den`` < 2^-60 (so that the ratio itself
    could overflow float32), else 1; both multiplications by it are exact."""
    sc = tl.where(den < TINY_DEN, 1.8446744073709552e19, 1.0)
    return sc, num / (den * sc)


@triton.jit
def merit_kernel(P, G, M, V, MASTER, OFF, NUMEL, META, TL_TID, TL_R, TL_I, TL_J, TILE0, PART, MAXB, FLAG,
                 lr, beta1, beta2, omb1, omb2, eps, wd,
                 PASS: tl.constexpr, ADAPT: tl.constexpr, HAS_MASTER: tl.constexpr, PDT: tl.constexpr,
                 VEC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    c = TILE0 + tl.program_id(0)
    tid = tl.load(TL_TID + c)
    r = tl.load(TL_R + c)
    i0 = tl.load(TL_I + c)
    j0 = tl.multiple_of(tl.load(TL_J + c), BN)
    base = META + 16 * tid
    d0 = tl.load(base)
    d1 = tl.load(base + 1)
    is_vec = tl.load(base + 4)
    n = tl.load(NUMEL + tid)
    off = tl.load(OFF + tid)
    ii = i0 + tl.arange(0, BM)
    jj = j0 + tl.arange(0, BN)
    rmask = ii < d0
    if VEC:
        # Contiguous rows of length d1 (a multiple of 4): one int64 tile base, int32 offsets.
        d1 = tl.multiple_of(d1, 4)
        n = tl.multiple_of(n, 4)
        off = tl.multiple_of(off, 4)
        d1_32 = d1.to(tl.int32)
        tbase = i0.to(tl.int64) * d1
        loc = tl.arange(0, BM)[:, None] * d1_32 + jj[None, :]
        cmask = jj < d1_32
        mask = rmask[:, None] & cmask[None, :] & (tbase + loc < n)
        gp = _ptr(G, tid, PDT, VEC) + tbase
        pp = _ptr(P, tid, PDT, VEC) + tbase
        sbase = off + tbase
    else:
        s0 = tl.load(base + 2)
        s1 = tl.load(base + 3)
        loc = ii.to(tl.int64)[:, None] * s0 + jj.to(tl.int64)[None, :] * s1 + r
        cmask = jj < d1
        mask = rmask[:, None] & cmask[None, :] & (loc < n)
        gp = _ptr(G, tid, PDT, VEC)
        pp = _ptr(P, tid, PDT, VEC)
        sbase = off
    if PASS == 2:
        mask = mask & (tl.load(FLAG) == 0)
    g = tl.load(gp + loc, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(M + sbase + loc, mask=mask, other=0.0)
    v = tl.load(V + sbase + loc, mask=mask, other=0.0)
    w = _load_w(pp, MASTER, sbase, loc, mask, HAS_MASTER)
    m = beta1 * m + omb1 * g
    v = beta2 * v + omb2 * g * g
    u = tl.where(mask, m / (tl.sqrt_rn(v) + eps) + wd * w, 0.0)
    if PASS == 1:
        if ADAPT:
            aw = tl.abs(w)
            au = tl.abs(u)
            rest = tl.load(base + 5)
            # Plain stores of this tile's partial maxima; merit_reduce_kernel folds them.
            prow = (j0 // BN) * (rest * d0) + r * d0 + ii
            tl.store(PART + tl.load(base + 12) + prow, tl.max(aw, axis=1), mask=rmask)
            tl.store(PART + tl.load(base + 13) + prow, tl.max(au, axis=1), mask=rmask)
            if is_vec == 0:
                pcol = (i0 // BM) * (rest * d1) + r * d1 + jj
                tl.store(PART + tl.load(base + 14) + pcol, tl.max(aw, axis=0), mask=cmask)
                tl.store(PART + tl.load(base + 15) + pcol, tl.max(au, axis=0), mask=cmask)
        nbad = tl.sum(tl.sum(_is_bad(g), axis=1), axis=0)
        if nbad > 0:
            tl.atomic_max(FLAG, 1)
    else:
        a = tl.abs(u)  # |step| before the clip to 1
        if ADAPT:
            # MERIT's t = num / den overflows float32 when a row's momentum has decayed into the
            # subnormal range (a dead unit): max|w_row| / max|u_row| ~ 1e40 → inf, and 0 · inf = NaN.
            # So t is never formed: ratios stay (num, den) pairs (max(R, ρ) picked by float64 cross
            # products) and a den below 2^-60 is scaled by 2^64 together with |u| (_ratio_parts).
            # Every tile takes this one path: a per-tile test for tiny denominators with a faster
            # branch measured slower.
            tw = _f(tl.load(MAXB + tl.load(base + 10)))
            tu = _f(tl.load(MAXB + tl.load(base + 11)))
            okt = (tw > 0) & (tu > 0)
            pn = tl.where(okt, tw, 1.0)
            pd = tl.where(okt, tu, 1.0)
            if is_vec != 0:
                sc, f = _ratio_parts(pn, pd)
                a = (a * sc) * f
            else:
                ri = r * d0 + ii
                cj = r * d1 + jj
                rw = _f(tl.load(MAXB + tl.load(base + 6) + ri, mask=rmask, other=0))
                ru = _f(tl.load(MAXB + tl.load(base + 7) + ri, mask=rmask, other=0))
                cw = _f(tl.load(MAXB + tl.load(base + 8) + cj, mask=cmask, other=0))
                cu = _f(tl.load(MAXB + tl.load(base + 9) + cj, mask=cmask, other=0))
                zero = ((rw == 0) | (ru == 0))[:, None] | ((cw == 0) | (cu == 0))[None, :]  # t = 1 there
                rn, rd = _max_ratio(rw, ru, pn, pd)
                cn, cd = _max_ratio(cw, cu, pn, pd)
                rs, rf = _ratio_parts(rn, rd)
                cs, cf = _ratio_parts(cn, cd)
                ar = (a * rs[:, None]) * rf[:, None]
                ac = (a * cs[None, :]) * cf[None, :]
                a = tl.where(zero, a, tl.maximum(ar, ac))
        a = tl.minimum(a, 1.0)
        s = tl.where(u < 0, -a, a)
        tl.store(M + sbase + loc, m, mask=mask)
        tl.store(V + sbase + loc, v, mask=mask)
        _store_w(pp, MASTER, sbase, loc, mask, w - lr * s, HAS_MASTER)


# ITEMS[10 * c + k], int64: 0 src_w  1 src_u  2 nparts  3 stride  4 pos0  5 npos  6 dst_w  7 dst_u
#   8 tot_w  9 tot_u (−1: this item does not feed the whole-tensor max).
# Program c folds partials [src + p * stride + pos] over p < nparts for pos in [pos0, pos0 + RC)
# and atomic-maxes the result into MAXB[dst + pos] (and its max into MAXB[tot]).
@triton.jit
def merit_reduce_kernel(PART, MAXB, ITEMS, PCH: tl.constexpr, RR: tl.constexpr, RC: tl.constexpr):
    c = tl.program_id(0)
    base = ITEMS + 10 * c
    src_w = tl.load(base)
    src_u = tl.load(base + 1)
    nparts = tl.load(base + 2)
    stride = tl.load(base + 3)
    pos = tl.load(base + 4) + tl.arange(0, RC)
    pmask = pos < tl.load(base + 5)
    accw = tl.zeros([RC], dtype=tl.float32)
    accu = tl.zeros([RC], dtype=tl.float32)
    for p in range(0, PCH, RR):  # nparts ≤ PCH (a constant bound: rows past nparts are masked)
        rows = p + tl.arange(0, RR)
        m2 = (rows < nparts)[:, None] & pmask[None, :]
        o = rows.to(tl.int64)[:, None] * stride + pos[None, :]
        accw = tl.maximum(accw, tl.max(tl.load(PART + src_w + o, mask=m2, other=0.0), axis=0))
        accu = tl.maximum(accu, tl.max(tl.load(PART + src_u + o, mask=m2, other=0.0), axis=0))
    tl.atomic_max(MAXB + tl.load(base + 6) + pos, _bits(accw), mask=pmask)
    tl.atomic_max(MAXB + tl.load(base + 7) + pos, _bits(accu), mask=pmask)
    tot_w = tl.load(base + 8)
    if tot_w >= 0:
        tl.atomic_max(MAXB + tot_w, _bits(tl.max(accw, axis=0)))
        tl.atomic_max(MAXB + tl.load(base + 9), _bits(tl.max(accu, axis=0)))


def fold_tile_maxima(pack: Any) -> None:
    """The ``"tiles"`` layout's reduction after pass 1: fold the tiles' partial row / column maxima
    (``pack.part``) into ``pack.maxbuf`` (row, column and whole-tensor maxima)."""
    if pack.n_items:
        merit_reduce_kernel[(pack.n_items,)](
            pack.part, pack.maxbuf, pack.items, PCH=pack.pch, RR=RED_ROWS, RC=pack.rc, num_warps=4,
        )


def launch_merit(pack: Any, group: dict, pass_: int, flag: Any, gscale: Any) -> None:
    """One pass of MERIT on a ``"tiles"`` pack: the VEC-able tiles first, then the others."""
    b1, b2 = group["betas"]
    nv = pack.n_vec_tiles if pack.vec else 0
    for first, count, v in ((0, nv, True), (nv, pack.n_tiles - nv, False)):
        if count == 0:
            continue
        merit_kernel[(count,)](
            pack.p_table, pack.g_table, pack.bufs["exp_avg"], pack.bufs["exp_avg_sq"], pack.master_arg,
            pack.off, pack.numel, pack.meta, pack.t_tid, pack.t_r, pack.t_i, pack.t_j, first,
            pack.part, pack.maxbuf, flag,
            float(group["lr"]), b1, b2, 1.0 - b1, 1.0 - b2, group["eps"], group["weight_decay"],
            PASS=pass_, ADAPT=group["adapt"], HAS_MASTER=pack.master is not None, PDT=pack.pdt, VEC=v,
            BM=pack.bm, BN=pack.bn, num_warps=pack.warps,
        )
    if pass_ == 1 and group["adapt"]:
        fold_tile_maxima(pack)

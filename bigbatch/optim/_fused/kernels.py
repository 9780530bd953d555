"""Triton kernels for the fused LARS / LAMB / MERIT steps (imported only on a fused step).

Every kernel runs over *all* tensors of a pack in one launch: a table maps each program to
(tensor id, chunk); parameters and gradients are reached through tables of raw pointers
(``tl.load(table + tid).to(pointer)``, the pattern of Triton's grouped-GEMM tutorial); moments,
step counters and float32 master weights live in one flat buffer per pack.

Two passes per step:

* pass 1 reads g, m, v, w, forms the new moments and ``u`` in registers (nothing is written),
  and reduces the per-tensor quantities the ratio needs — sums of squares (LARS, LAMB, with
  float32 atomics) or row / column / whole-tensor max-norms (MERIT, with integer atomics on the
  float bit patterns, which order like the floats for values ≥ 0) — plus a non-finite flag;
* pass 2 reads the flag (set ⇒ every store is masked off, the step is skipped), recomputes
  the moments and ``u``, applies the ratio, and writes m, v and w.

Writing the moments only in pass 2 costs one extra read of g, m, v (44 instead of 40 bytes per
float32 parameter for LAMB/MERIT) but is what lets a nan/inf gradient leave the state untouched
without a host synchronisation.
"""

from __future__ import annotations

import triton
import triton.language as tl

BLOCK = 4096  # elements per program for the per-tensor (LARS/LAMB) kernels
TILE_M, TILE_N = 32, 128  # MERIT tile: rows × columns per program


@triton.jit
def _ptr(table, tid, PDT: tl.constexpr):
    a = tl.load(table + tid)
    if PDT == 1:
        return a.to(tl.pointer_type(tl.bfloat16))
    elif PDT == 2:
        return a.to(tl.pointer_type(tl.float16))
    else:
        return a.to(tl.pointer_type(tl.float32))


@triton.jit
def _is_bad(g):
    return ((g != g) | (tl.abs(g) == float("inf"))).to(tl.int32)


@triton.jit
def _load_w(P, MASTER, tid, off, idx, mask, HAS_MASTER: tl.constexpr, PDT: tl.constexpr):
    if HAS_MASTER:
        w = tl.load(MASTER + off + idx, mask=mask, other=0.0)
    else:
        w = tl.load(_ptr(P, tid, PDT) + idx, mask=mask, other=0.0).to(tl.float32)
    return w


@triton.jit
def _store_w(P, MASTER, tid, off, idx, mask, w, HAS_MASTER: tl.constexpr, PDT: tl.constexpr):
    pp = _ptr(P, tid, PDT)
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


# ------------------------------------------------------------------------------------ LAMB
@triton.jit
def lamb_kernel(P, G, M, V, MASTER, OFF, NUMEL, BC, CH_TID, CH_START, ACC, FLAG, GSCALE,
                lr, beta1, beta2, omb1, omb2, eps, wd, clip_lo, clip_hi,
                PASS: tl.constexpr, BIAS: tl.constexpr, ADAPT: tl.constexpr, CLIP: tl.constexpr,
                HAS_MASTER: tl.constexpr, HAS_GSCALE: tl.constexpr, PDT: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    tid = tl.load(CH_TID + c)
    start = tl.load(CH_START + c)
    n = tl.load(NUMEL + tid)
    off = tl.load(OFF + tid)
    idx = start + tl.arange(0, BLOCK)
    mask = idx < n
    if PASS == 2:
        mask = mask & (tl.load(FLAG) == 0)
    g = tl.load(_ptr(G, tid, PDT) + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_GSCALE:
        g = g * tl.load(GSCALE)
    m = tl.load(M + off + idx, mask=mask, other=0.0)
    v = tl.load(V + off + idx, mask=mask, other=0.0)
    w = _load_w(P, MASTER, tid, off, idx, mask, HAS_MASTER, PDT)
    m, v, u = _adam_u(g, m, v, w, BC, tid, beta1, beta2, omb1, omb2, eps, wd, BIAS)
    u = tl.where(mask, u, 0.0)
    if PASS == 1:
        if ADAPT:
            tl.atomic_add(ACC + 2 * tid, tl.sum(w * w, axis=0))
            tl.atomic_add(ACC + 2 * tid + 1, tl.sum(u * u, axis=0))
        nbad = tl.sum(_is_bad(g), axis=0)
        if nbad > 0:
            tl.atomic_max(FLAG, 1)
    else:
        ratio = 1.0
        if ADAPT:
            wn = tl.sqrt_rn(tl.load(ACC + 2 * tid))
            un = tl.sqrt_rn(tl.load(ACC + 2 * tid + 1))
            phi = wn
            if CLIP:
                phi = tl.minimum(tl.maximum(wn, clip_lo), clip_hi)
            ok = (wn > 0) & (un > 0)
            ratio = tl.where(ok, phi / tl.where(ok, un, 1.0), 1.0)
        w = w - lr * ratio * u
        tl.store(M + off + idx, m, mask=mask)
        tl.store(V + off + idx, v, mask=mask)
        _store_w(P, MASTER, tid, off, idx, mask, w, HAS_MASTER, PDT)


# ------------------------------------------------------------------------------------ LARS
@triton.jit
def lars_kernel(P, G, BUF, MASTER, OFF, NUMEL, CH_TID, CH_START, ACC, FLAG,
                lr, momentum, wd, eta, eps,
                PASS: tl.constexpr, ADAPT: tl.constexpr, CLIP: tl.constexpr, NESTEROV: tl.constexpr,
                HAS_MOM: tl.constexpr, HAS_MASTER: tl.constexpr, PDT: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    tid = tl.load(CH_TID + c)
    start = tl.load(CH_START + c)
    n = tl.load(NUMEL + tid)
    off = tl.load(OFF + tid)
    idx = start + tl.arange(0, BLOCK)
    mask = idx < n
    if PASS == 2:
        mask = mask & (tl.load(FLAG) == 0)
    g = tl.load(_ptr(G, tid, PDT) + idx, mask=mask, other=0.0).to(tl.float32)
    w = _load_w(P, MASTER, tid, off, idx, mask, HAS_MASTER, PDT)
    if PASS == 1:
        if ADAPT:
            tl.atomic_add(ACC + 2 * tid, tl.sum(w * w, axis=0))
            tl.atomic_add(ACC + 2 * tid + 1, tl.sum(g * g, axis=0))
        nbad = tl.sum(_is_bad(g), axis=0)
        if nbad > 0:
            tl.atomic_max(FLAG, 1)
    else:
        ratio = 1.0
        if ADAPT:
            wn = tl.sqrt_rn(tl.load(ACC + 2 * tid))
            gn = tl.sqrt_rn(tl.load(ACC + 2 * tid + 1))
            ok = (wn > 0) & (gn > 0)
            ratio = tl.where(ok, eta * wn / tl.where(ok, gn + wd * wn + eps, 1.0), 1.0)
            if CLIP:
                ratio = tl.minimum(ratio / lr, 1.0)
        d = lr * ratio * (g + wd * w)
        if HAS_MOM:
            b = momentum * tl.load(BUF + off + idx, mask=mask, other=0.0) + d
            tl.store(BUF + off + idx, b, mask=mask)
            if NESTEROV:
                d = d + momentum * b
            else:
                d = b
        _store_w(P, MASTER, tid, off, idx, mask, w - d, HAS_MASTER, PDT)


# ----------------------------------------------------------------------------------- MERIT
@triton.jit
def _f(bits):
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def merit_kernel(P, G, M, V, MASTER, OFF, NUMEL, META, TL_TID, TL_R, TL_I, TL_J,
                 ROWW, ROWU, COLW, COLU, TOTW, TOTU, FLAG,
                 lr, beta1, beta2, omb1, omb2, eps, wd,
                 PASS: tl.constexpr, ADAPT: tl.constexpr, HAS_MASTER: tl.constexpr, PDT: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr):
    # META[tid] = (d0, d1, s0, s1, is_vec, row_off, col_off, rest) as int64.
    c = tl.program_id(0)
    tid = tl.load(TL_TID + c)
    r = tl.load(TL_R + c).to(tl.int64)
    i0 = tl.load(TL_I + c).to(tl.int64)
    j0 = tl.load(TL_J + c).to(tl.int64)
    base = META + 8 * tid
    d0 = tl.load(base)
    d1 = tl.load(base + 1)
    s0 = tl.load(base + 2)
    s1 = tl.load(base + 3)
    is_vec = tl.load(base + 4)
    row_off = tl.load(base + 5)
    col_off = tl.load(base + 6)
    n = tl.load(NUMEL + tid)
    off = tl.load(OFF + tid)
    ii = i0 + tl.arange(0, BM)
    jj = j0 + tl.arange(0, BN)
    idx = ii[:, None] * s0 + jj[None, :] * s1 + r
    rmask = ii < d0
    cmask = jj < d1
    mask = rmask[:, None] & cmask[None, :] & (idx < n)
    if PASS == 2:
        mask = mask & (tl.load(FLAG) == 0)
    g = tl.load(_ptr(G, tid, PDT) + idx, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(M + off + idx, mask=mask, other=0.0)
    v = tl.load(V + off + idx, mask=mask, other=0.0)
    w = _load_w(P, MASTER, tid, off, idx, mask, HAS_MASTER, PDT)
    m = beta1 * m + omb1 * g
    v = beta2 * v + omb2 * g * g
    u = tl.where(mask, m / (tl.sqrt_rn(v) + eps) + wd * w, 0.0)
    aw = tl.abs(w)
    au = tl.abs(u)
    if PASS == 1:
        if ADAPT:
            rw = tl.max(aw, axis=1)
            ru = tl.max(au, axis=1)
            cw = tl.max(aw, axis=0)
            cu = tl.max(au, axis=0)
            mat = is_vec == 0
            ridx = row_off + r * d0 + ii
            cidx = col_off + r * d1 + jj
            tl.atomic_max(ROWW + ridx, rw.to(tl.int32, bitcast=True), mask=rmask & mat)
            tl.atomic_max(ROWU + ridx, ru.to(tl.int32, bitcast=True), mask=rmask & mat)
            tl.atomic_max(COLW + cidx, cw.to(tl.int32, bitcast=True), mask=cmask & mat)
            tl.atomic_max(COLU + cidx, cu.to(tl.int32, bitcast=True), mask=cmask & mat)
            tl.atomic_max(TOTW + tid, tl.max(rw, axis=0).to(tl.int32, bitcast=True))
            tl.atomic_max(TOTU + tid, tl.max(ru, axis=0).to(tl.int32, bitcast=True))
        nbad = tl.sum(tl.sum(_is_bad(g), axis=1), axis=0)
        if nbad > 0:
            tl.atomic_max(FLAG, 1)
    else:
        s = u
        if ADAPT:
            tw = _f(tl.load(TOTW + tid))
            tu = _f(tl.load(TOTU + tid))
            okt = (tw > 0) & (tu > 0)
            rho = tl.where(okt, tw / tl.where(okt, tu, 1.0), 1.0)
            if is_vec != 0:
                s = u * rho
            else:
                mr = rmask
                mc = cmask
                rw = _f(tl.load(ROWW + row_off + r * d0 + ii, mask=mr, other=0))
                ru = _f(tl.load(ROWU + row_off + r * d0 + ii, mask=mr, other=0))
                cw = _f(tl.load(COLW + col_off + r * d1 + jj, mask=mc, other=0))
                cu = _f(tl.load(COLU + col_off + r * d1 + jj, mask=mc, other=0))
                rr = rw / tl.where(ru == 0, 1.0, ru)
                cc = cw / tl.where(cu == 0, 1.0, cu)
                t = tl.maximum(tl.maximum(rr[:, None], cc[None, :]), rho)
                zr = (rw == 0) | (ru == 0)
                zc = (cw == 0) | (cu == 0)
                t = tl.where(zr[:, None] | zc[None, :], 1.0, t)
                s = u * t
        s = tl.minimum(tl.maximum(s, -1.0), 1.0)
        tl.store(M + off + idx, m, mask=mask)
        tl.store(V + off + idx, v, mask=mask)
        _store_w(P, MASTER, tid, off, idx, mask, w - lr * s, HAS_MASTER, PDT)

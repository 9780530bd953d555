"""Fused CUDA path for LARS / LAMB / MERIT (Triton). Imported only when a fused step runs.

A *pack* is one param group's parameters of one dtype. On first use it moves their state into
flat float32 buffers (moments, master weights) and a step vector, and leaves ``optimizer.state``
entries as views into them, so ``state_dict`` / ``load_state_dict`` and the reference path keep
working unchanged. Per step the host work is: gather the gradients' data pointers (a list
comprehension; uploaded only when they changed, asynchronously from pinned memory), zero the
reduction buffers, and launch pass 1 and pass 2 of each pack (kernels in ``kernels.py``). No host
synchronisation, except ``nonfinite="raise"``, which reads one flag after the step to raise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bigbatch.optim._common import all_finite, tensor_norms
from bigbatch.optim._fused import kernels as K

__all__ = ["fused_step"]

_PDT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _ptr_table(tensors: list[Tensor], device: torch.device) -> Tensor:
    host = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)
    return host.pin_memory().to(device, non_blocking=True)


def _chunks(numels: list[int], block: int) -> tuple[Tensor, Tensor]:
    tid, start = [], []
    for i, n in enumerate(numels):
        k = max(1, -(-n // block))
        tid += [i] * k
        start += [j * block for j in range(k)]
    return torch.tensor(tid, dtype=torch.int32), torch.tensor(start, dtype=torch.int64)


class _Pack:
    def __init__(self, opt: Any, group: dict, params: list[Tensor]) -> None:
        p0 = params[0]
        dev = p0.device
        for p in params:
            if not p.is_contiguous():
                raise ValueError("the fused path needs contiguous parameters; pass fused=False")
        self.algo = opt._algorithm
        self.params = params
        self.pdt = _PDT[p0.dtype]
        numels = [p.numel() for p in params]
        offs = [0]
        for n in numels[:-1]:
            offs.append(offs[-1] + n)
        total = sum(numels)
        self.n = len(params)
        self.off = torch.tensor(offs, dtype=torch.int64, device=dev)
        self.numel = torch.tensor(numels, dtype=torch.int64, device=dev)
        self.p_key = tuple(p.data_ptr() for p in params)
        self.p_table = _ptr_table(params, dev)
        self.g_key: tuple = ()
        self.g_table: Tensor | None = None

        states = [opt._state_for(p, group) for p in params]
        keys = opt._state_keys
        self.bufs = {k: torch.empty(total, dtype=torch.float32, device=dev) for k in keys}
        has_master = "master" in states[0]
        self.master = torch.empty(total, dtype=torch.float32, device=dev) if has_master else None
        self.steps = torch.tensor([float(st["step"]) for st in states], dtype=torch.float32, device=dev)
        for i, (p, st, o, n) in enumerate(zip(params, states, offs, numels)):
            for k in keys:
                view = self.bufs[k][o:o + n].view_as(p)
                view.copy_(st[k])
                st[k] = view
            if has_master:
                view = self.master[o:o + n].view_as(p)
                view.copy_(st["master"])
                st["master"] = view
            st["step"] = self.steps[i]  # 0-d view: pass 2's counter update shows in state_dict

        if self.algo == "merit":
            self._merit_tables(params, dev)
        else:
            tid, start = _chunks(numels, K.BLOCK)
            self.ch_tid, self.ch_start = tid.to(dev), start.to(dev)
            self.acc = torch.zeros(2 * self.n, dtype=torch.float32, device=dev)

    def _merit_tables(self, params: list[Tensor], dev: torch.device) -> None:
        BM, BN = K.TILE_M, K.TILE_N
        meta, t_tid, t_r, t_i, t_j = [], [], [], [], []
        row_total = col_total = 0
        for k, p in enumerate(params):
            if p.dim() >= 2:
                d0, d1 = p.shape[0], p.shape[1]
                rest = p.numel() // max(1, d0 * d1)
                s0, s1, vec = d1 * rest, rest, 0
            else:  # a vector is laid out as rows of BN; only its whole-tensor max is used
                rest, d1 = 1, BN
                d0, s0, s1, vec = max(1, -(-p.numel() // BN)), BN, 1, 1
            meta.append([d0, d1, s0, s1, vec, row_total, col_total, rest])
            if not vec:
                row_total += d0 * rest
                col_total += d1 * rest
            for r in range(rest):
                for i in range(0, d0, BM):
                    for j in range(0, d1, BN):
                        t_tid.append(k), t_r.append(r), t_i.append(i), t_j.append(j)
        self.meta = torch.tensor(meta, dtype=torch.int64, device=dev).reshape(-1)
        as32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=dev)  # noqa: E731
        self.t_tid, self.t_r, self.t_i, self.t_j = as32(t_tid), as32(t_r), as32(t_i), as32(t_j)
        # One int32 buffer holds every running max (float bits), so one memset clears them.
        R, C = max(row_total, 1), max(col_total, 1)
        self.maxbuf = torch.zeros(2 * R + 2 * C + 2 * self.n, dtype=torch.int32, device=dev)
        mb = self.maxbuf
        self.roww, self.rowu = mb[:R], mb[R:2 * R]
        self.colw, self.colu = mb[2 * R:2 * R + C], mb[2 * R + C:2 * R + 2 * C]
        self.totw, self.totu = mb[2 * R + 2 * C:2 * R + 2 * C + self.n], mb[2 * R + 2 * C + self.n:]

    def set_grads(self, params: list[Tensor]) -> list[Tensor]:
        grads = [p.grad if p.grad.is_contiguous() else p.grad.contiguous() for p in params]
        key = tuple(g.data_ptr() for g in grads)
        if key != self.g_key:  # the caching allocator usually hands back the same blocks
            self.g_table = _ptr_table(grads, params[0].device)
            self.g_key = key
        return grads  # keep any contiguous copies alive until the kernels have been queued

    def zero(self) -> None:
        (self.maxbuf if self.algo == "merit" else self.acc).zero_()

    def launch(self, group: dict, pass_: int, flag: Tensor, gscale: Tensor | None) -> None:
        master = self.master if self.master is not None else self.steps  # dummy when unused
        if self.algo == "lamb":
            b1, b2 = group["betas"]
            clip = group["trust_clip"]
            if pass_ == 1:  # (1 − β1^t, √(1 − β2^t)) per tensor, in float64: no host sync, no cancellation
                t = self.steps.double() + 1
                self.bc = torch.stack([1 - torch.pow(b1, t), (1 - torch.pow(b2, t)).sqrt()], 1).float().reshape(-1)
            K.lamb_kernel[(self.ch_tid.numel(),)](
                self.p_table, self.g_table, self.bufs["exp_avg"], self.bufs["exp_avg_sq"], master,
                self.off, self.numel, self.bc, self.ch_tid, self.ch_start, self.acc, flag,
                gscale if gscale is not None else self.steps,
                float(group["lr"]), b1, b2, 1.0 - b1, 1.0 - b2, group["eps"], group["weight_decay"],
                clip[0] if clip else 0.0, clip[1] if clip else 0.0,
                PASS=pass_, BIAS=group["bias_correction"], ADAPT=group["adapt"], CLIP=clip is not None,
                HAS_MASTER=self.master is not None, HAS_GSCALE=gscale is not None, PDT=self.pdt,
                BLOCK=K.BLOCK, num_warps=8,
            )
        elif self.algo == "lars":
            K.lars_kernel[(self.ch_tid.numel(),)](
                self.p_table, self.g_table, self.bufs["momentum_buffer"], master, self.off, self.numel,
                self.ch_tid, self.ch_start, self.acc, flag,
                float(group["lr"]), group["momentum"], group["weight_decay"], group["trust_coefficient"], group["eps"],
                PASS=pass_, ADAPT=group["adapt"], CLIP=group["clip"], NESTEROV=group["nesterov"],
                HAS_MOM=group["momentum"] != 0, HAS_MASTER=self.master is not None, PDT=self.pdt,
                BLOCK=K.BLOCK, num_warps=8,
            )
        else:
            b1, b2 = group["betas"]
            K.merit_kernel[(self.t_tid.numel(),)](
                self.p_table, self.g_table, self.bufs["exp_avg"], self.bufs["exp_avg_sq"], master,
                self.off, self.numel, self.meta, self.t_tid, self.t_r, self.t_i, self.t_j,
                self.roww, self.rowu, self.colw, self.colu, self.totw, self.totu, flag,
                float(group["lr"]), b1, b2, 1.0 - b1, 1.0 - b2, group["eps"], group["weight_decay"],
                PASS=pass_, ADAPT=group["adapt"], HAS_MASTER=self.master is not None, PDT=self.pdt,
                BM=K.TILE_M, BN=K.TILE_N, num_warps=8,
            )


def _pack_for(opt: Any, gi: int, group: dict, params: list[Tensor]) -> _Pack:
    key = (gi, params[0].dtype, tuple(id(p) for p in params))
    pack = opt._fused_packs.get(key)
    if pack is None or pack.p_key != tuple(p.data_ptr() for p in params):
        pack = _Pack(opt, group, params)
        opt._fused_packs[key] = pack
    return pack


def fused_step(opt: Any, fused_groups: list, run_reference: bool, ref_grads: list[Tensor] | None = None) -> Tensor:
    """One fused step over ``fused_groups``; returns the device flag (nonzero: step skipped)."""
    dev = fused_groups[0][1][0].device
    if opt._fused_skipped is None or opt._fused_skipped.device != dev:
        opt._fused_flag = torch.zeros(1, dtype=torch.int32, device=dev)
        opt._fused_skipped = torch.zeros((), dtype=torch.float32, device=dev)
    flag = opt._fused_flag
    flag.zero_()
    if ref_grads:  # non-fused groups in the same optimizer: one verdict for the whole step
        flag.copy_((~all_finite(ref_grads)).to(torch.int32).to(dev).reshape(1))
    packs, keep = [], []
    index = {id(g): i for i, g in enumerate(opt.param_groups)}
    all_grads = []
    for group, params in fused_groups:
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for p in params:
            if p.grad.dtype != p.dtype:
                raise ValueError(f"fused path needs grad dtype == param dtype, got {p.grad.dtype} vs {p.dtype}")
            by_dtype.setdefault(p.dtype, []).append(p)
        for ps in by_dtype.values():
            pack = _pack_for(opt, index[id(group)], group, ps)
            keep.append(pack.set_grads(ps))
            all_grads += keep[-1]
            packs.append((group, pack))
    gscale = None
    if getattr(opt, "grad_prenorm", None) is not None:
        c = opt.grad_prenorm
        gscale = (c / torch.clamp(tensor_norms(all_grads).square().sum().sqrt(), min=c)).reshape(1).to(dev)
    for _, pack in packs:
        pack.zero()
    for group, pack in packs:
        pack.launch(group, 1, flag, gscale)
    for group, pack in packs:
        pack.launch(group, 2, flag, gscale)
    skipped = (flag != 0).to(torch.float32)
    for _, pack in packs:
        pack.steps.add_(1.0 - skipped)
    opt._fused_skipped.add_(skipped[0])
    if opt.nonfinite == "raise" and bool(flag.item()):
        opt._fused_skipped.sub_(1.0)
        raise FloatingPointError(
            f"{type(opt).__name__}: non-finite (nan/inf) gradient; the step was not applied and the "
            "optimizer state is unchanged (pass nonfinite='skip' to skip such steps)"
        )
    return flag
